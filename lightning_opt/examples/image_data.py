"""Small-image classification data for the examples: sklearn's bundled digits (offline), CIFAR-10 opt-in."""

from __future__ import annotations

import os
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_opt._validation import check_bool, check_choice, check_float, check_int
from lightning_opt.examples._loaders import _seeded_split, _ShardMixin

_EXTRA_HINT = "install the examples extra: pip install 'lightning-opt[examples]'"

# Per-channel statistics of the CIFAR-10 training set (the usual published values).
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_FOLDER = "cifar-10-batches-py"  # what torchvision.datasets.CIFAR10 extracts into data_dir


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
        check_int("batch_size", batch_size, 1)
        check_int("image_size", image_size, 8, 512)
        check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int("seed", seed, 0)
        check_int("num_workers", num_workers, 0)
        check_choice("dataset", dataset, ("digits", "cifar10"))
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.dataset = dataset
        self.data_dir = data_dir
        check_bool("download", download)
        if dataset == "cifar10" and not download and not os.path.isdir(os.path.join(data_dir, _CIFAR_FOLDER)):
            # here, before any process is launched, rather than in every rank's setup
            raise ValueError(f"data_dir={data_dir!r} holds no CIFAR-10 ({_CIFAR_FOLDER}/); pass download=True "
                             "(--data.download=true) to fetch it, or use dataset='digits' for the offline default")
        check_bool("shard", shard)
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
