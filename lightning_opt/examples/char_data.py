"""Character-level language-modelling data for the examples: the standard library's sources (offline) or a text
file."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_opt._validation import check_bool, check_float, check_int
from lightning_opt.examples._loaders import _ShardMixin


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
        check_int("block_size", block_size, 1)
        check_int("batch_size", batch_size, 1)
        check_int("max_chars", max_chars, 2 * (block_size + 1))
        check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int("seed", seed, 0)
        check_int("samples_per_epoch", samples_per_epoch, 1, optional=True)
        check_int("num_workers", num_workers, 0)
        self.save_hyperparameters()
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        check_bool("shard", shard)
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
