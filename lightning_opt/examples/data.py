"""Offline datasets and DataModules for the examples.

Nothing here touches the network unless asked to:

* :class:`DigitsDataModule` -- scikit-learn's bundled handwritten digits (1,797 real 8x8 images shipped inside
  the sklearn wheel), resized for timm CNNs; CIFAR-10 through torchvision is opt-in (``dataset="cifar10"``,
  downloaded only with ``download=True``).
* :class:`CharDataModule` -- a character-level corpus that exists offline on every Python install (the
  standard library's own ``*.py`` sources), or any text file the user names.

Splits and sampling are seeded, so two runs with the same arguments see the same batches in the same order.
For step-by-step trajectory comparisons under DDP-family strategies, pass ``shard=True`` together with
``Trainer(use_distributed_sampler=False)``: the train loader is then sharded with a non-shuffling
``DistributedSampler`` built here, instead of the shuffling one Lightning would inject.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset, TensorDataset

_EXTRA_HINT = "install the examples extra: pip install 'lightning-opt[examples]'"

# Per-channel statistics of the CIFAR-10 training set (the usual published values).
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_FOLDER = "cifar-10-batches-py"  # what torchvision.datasets.CIFAR10 extracts into data_dir


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_real(name: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = True) -> None:
    """A finite real number in the given interval (``ValueError`` naming the argument otherwise)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        rng = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a float in the open interval (0, 1), got {value!r}")


def _seeded_split(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random (train, val) index split of ``range(n)``."""
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


class _ShardMixin:
    """Builds the train loader, optionally sharded by a non-shuffling ``DistributedSampler`` made here."""

    trainer: pl.Trainer | None
    shard: bool
    seed: int
    batch_size: int
    num_workers: int

    def _world_and_rank(self) -> tuple[int, int]:
        # ``LightningDataModule.trainer`` is None until the Trainer attaches the datamodule.
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, ds: Dataset, *, train: bool, shuffle: bool, sampler=None) -> DataLoader:
        kwargs: dict = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if train and self.shard:
            world, rank = self._world_and_rank()
            # shuffle=False: the order is already a seeded permutation, and Lightning's injected sampler
            # would reshuffle with its own seed (breaking step-by-step comparisons between runs).
            kwargs["sampler"] = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        elif sampler is not None:
            kwargs["sampler"] = sampler
        elif shuffle:
            # A seeded generator makes the per-epoch shuffle reproducible across runs.
            kwargs["shuffle"] = True
            kwargs["generator"] = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, **kwargs)


# --------------------------------------------------------------------------------------------- images


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """Return sklearn's bundled digits as ``(images[N, 1, 8, 8] in [0, 1], labels[N])`` (no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"DigitsDataModule(dataset='digits') needs scikit-learn; {_EXTRA_HINT}") from err
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images, labels


class DigitsDataModule(_ShardMixin, pl.LightningDataModule):
    """Small-image classification data for timm CNNs, offline by default.

    ``dataset="digits"`` (default): scikit-learn's 1,797 real 8x8 handwritten digits, bilinearly resized to
    ``image_size``, replicated to 3 channels and normalised with the training split's mean and std. The
    train/val split is a seeded random permutation; ``test_dataloader`` serves the validation split (the
    set is too small for a third split).

    ``dataset="cifar10"`` (opt-in): torchvision's CIFAR-10 in ``data_dir``; the official training set is split
    into train/val with the same seeded permutation and the official test set is the test split. The archive
    is downloaded only when ``download=True``.

    Args:
        batch_size: samples per batch (per process).
        image_size: side of the square images fed to the model, in [8, 512].
        val_fraction: fraction of the (training) data held out for validation, in (0, 1).
        seed: seed of the split and of the train-loader shuffle.
        num_workers: DataLoader worker processes.
        dataset: ``"digits"`` or ``"cifar10"``.
        data_dir: where CIFAR-10 lives / is downloaded to.
        download: allow downloading CIFAR-10 (never done by default).
        shard: build the train loader with ``DistributedSampler(ds, world, rank, shuffle=False)`` (world and
            rank from the attached trainer); pair with ``Trainer(use_distributed_sampler=False)``.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 32,
        image_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        dataset: Literal["digits", "cifar10"] = "digits",
        data_dir: str = "data",
        download: bool = False,
        shard: bool = False,
    ) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("image_size", image_size, 8, 512)
        _check_fraction("val_fraction", val_fraction)
        _check_int("seed", seed, 0)
        _check_int("num_workers", num_workers, 0)
        if dataset not in ("digits", "cifar10"):
            raise ValueError(f"dataset must be one of ('digits', 'cifar10'), got {dataset!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.dataset = dataset
        self.data_dir = data_dir
        _check_bool("download", download)
        if dataset == "cifar10" and not download and not os.path.isdir(os.path.join(data_dir, _CIFAR_FOLDER)):
            # here, before any process is launched, rather than in every rank's setup
            raise ValueError(f"data_dir={data_dir!r} holds no CIFAR-10 ({_CIFAR_FOLDER}/); pass download=True "
                             "(--data.download=true) to fetch it, or use dataset='digits' for the offline default")
        _check_bool("shard", shard)
        self.download = download
        self.shard = shard
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- CIFAR-10 (opt-in) ---------------------------------------------------------------------------
    def _cifar(self, train: bool, download: bool):
        try:
            from torchvision import transforms
            from torchvision.datasets import CIFAR10
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"DigitsDataModule(dataset='cifar10') needs torchvision; {_EXTRA_HINT}"
            ) from err
        steps = [transforms.ToTensor()]
        if self.image_size != 32:
            steps.append(transforms.Resize(self.image_size, antialias=True))
        steps.append(transforms.Normalize(_CIFAR_MEAN, _CIFAR_STD))
        try:
            return CIFAR10(self.data_dir, train=train, download=download, transform=transforms.Compose(steps))
        except RuntimeError as err:
            if download:
                raise
            raise RuntimeError(
                f"CIFAR-10 not found under data_dir={self.data_dir!r}; pass download=True "
                "(--data.download=true) to fetch it, or use dataset='digits' for the offline default"
            ) from err

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place a download may happen.
        if self.dataset == "cifar10" and self.download:
            self._cifar(train=True, download=True)
            self._cifar(train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.dataset == "cifar10":
            full = self._cifar(train=True, download=False)
            train_idx, val_idx = _seeded_split(len(full), self.val_fraction, self.seed)
            self.train_set = Subset(full, train_idx.tolist())
            self.val_set = Subset(full, val_idx.tolist())
            self.test_set = self._cifar(train=False, download=False)
            return
        images, labels = load_digits_tensors()
        if self.image_size != images.shape[-1]:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        train_idx, val_idx = _seeded_split(len(labels), self.val_fraction, self.seed)
        # Normalise with training-split statistics only (no leakage from the validation images).
        train_imgs = images[train_idx]
        mean, std = train_imgs.mean(), train_imgs.std().clamp_min(1e-6)
        images = ((images - mean) / std).expand(-1, 3, -1, -1).contiguous()
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = self.val_set

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, train=False, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, train=False, shuffle=False)


# ----------------------------------------------------------------------------------------------- text


def stdlib_source_files() -> list[str]:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name."""
    return sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))


def load_text(text_path: str | None = None, max_chars: int = 200_000) -> str:
    """The corpus: ``text_path`` (UTF-8) or the concatenated stdlib sources, truncated to ``max_chars``.

    The default corpus is deterministic for a given Python version (file order is sorted); other Python
    versions ship different sources, so numbers are comparable only within one version.
    """
    if text_path is not None:
        with open(text_path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(max_chars)
    else:
        parts: list[str] = []
        total = 0
        for path in stdlib_source_files():
            with open(path, encoding="utf-8", errors="replace") as fh:
                chunk = fh.read(max_chars - total)
            parts.append(chunk)
            total += len(chunk)
            if total >= max_chars:
                break
        text = "".join(parts)
        if not text:
            raise RuntimeError(
                f"no standard-library sources found under {os.path.dirname(os.__file__)!r}; "
                "pass text_path=<some text file>"
            )
    return text


class _Blocks(Dataset):
    """``(x, y)`` blocks of ``block_size`` tokens starting at ``starts``; ``y`` is ``x`` shifted by one."""

    def __init__(self, tokens: Tensor, block_size: int, starts: Sequence[int] | Tensor) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.starts = torch.as_tensor(starts, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s = int(self.starts[i])
        chunk = self.tokens[s : s + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharDataModule(_ShardMixin, pl.LightningDataModule):
    """Character-level language-modelling data, offline by default.

    The corpus (see :func:`load_text`) is read and its vocabulary built eagerly in ``__init__``, so
    :attr:`vocab_size` is available for ``LightningCLI.link_arguments("data.vocab_size", "model.vocab_size",
    apply_on="instantiate")``. The first ``1 - val_fraction`` of the text is the training split, the rest the
    validation split (a contiguous split: random windows of one text would overlap across splits).

    Training batches are random contiguous blocks: each epoch draws ``samples_per_epoch`` distinct window
    starts with a seeded generator (new blocks every epoch, same sequence on every run). With ``shard=True``
    a fixed seeded set of starts is sharded with a non-shuffling ``DistributedSampler`` instead (same blocks
    every epoch). Validation uses consecutive non-overlapping blocks of the validation split.

    Args:
        block_size: context length in characters, >= 1.
        batch_size: blocks per batch (per process).
        text_path: a UTF-8 text file to use instead of the standard-library sources.
        max_chars: corpus length cap, >= 2 * (block_size + 1) so both splits hold a block.
        val_fraction: tail fraction of the text used for validation, in (0, 1).
        seed: seed of the block sampling.
        samples_per_epoch: training blocks per epoch; default ``len(train_text) // block_size``.
        num_workers: DataLoader worker processes.
        shard: see above; pair with ``Trainer(use_distributed_sampler=False)``.
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        text_path: str | None = None,
        max_chars: int = 200_000,
        val_fraction: float = 0.1,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        shard: bool = False,
    ) -> None:
        super().__init__()
        _check_int("block_size", block_size, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("max_chars", max_chars, 2 * (block_size + 1))
        _check_fraction("val_fraction", val_fraction)
        _check_int("seed", seed, 0)
        if samples_per_epoch is not None:
            _check_int("samples_per_epoch", samples_per_epoch, 1)
        _check_int("num_workers", num_workers, 0)
        self.save_hyperparameters()
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        _check_bool("shard", shard)
        self.shard = shard

        if text_path is not None and not os.path.isfile(text_path):
            raise ValueError(f"text_path={text_path!r} is not a file; pass a UTF-8 text file, or leave it unset for "
                             "the standard-library sources")
        self.text = load_text(text_path, max_chars)
        self.chars: list[str] = sorted(set(self.text))
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        tokens = self.encode(self.text)
        n_val = round(len(tokens) * val_fraction)
        self.train_tokens = tokens[: len(tokens) - n_val]
        self.val_tokens = tokens[len(tokens) - n_val :]
        for name, part in (("train", self.train_tokens), ("validation", self.val_tokens)):
            if len(part) < block_size + 1:
                raise ValueError(
                    f"the {name} split has {len(part)} characters, fewer than block_size + 1 = "
                    f"{block_size + 1}; use a longer corpus (max_chars={max_chars}, "
                    f"text_path={text_path!r}) or a smaller block_size"
                )
        n_windows = len(self.train_tokens) - block_size
        default_samples = max(1, len(self.train_tokens) // block_size)
        self.samples_per_epoch = min(samples_per_epoch or default_samples, n_windows)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters in the corpus (the model's embedding size)."""
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Characters to token ids (every character must be in the corpus vocabulary)."""
        return torch.tensor([self._stoi[c] for c in text], dtype=torch.long)

    def decode(self, tokens: Sequence[int] | Tensor) -> str:
        """Token ids back to text."""
        return "".join(self.chars[int(t)] for t in tokens)

    def train_dataloader(self) -> DataLoader:
        n_windows = len(self.train_tokens) - self.block_size
        gen = torch.Generator().manual_seed(self.seed)
        if self.shard:
            starts = torch.randperm(n_windows, generator=gen)[: self.samples_per_epoch]
            return self._loader(
                _Blocks(self.train_tokens, self.block_size, starts), train=True, shuffle=False
            )
        # Every window start is an item; the seeded sampler draws a fresh subset each epoch.
        ds = _Blocks(self.train_tokens, self.block_size, torch.arange(n_windows))
        sampler = RandomSampler(ds, num_samples=self.samples_per_epoch, generator=gen)
        return self._loader(ds, train=True, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        starts = range(0, len(self.val_tokens) - self.block_size, self.block_size)
        return self._loader(_Blocks(self.val_tokens, self.block_size, starts), train=False, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
