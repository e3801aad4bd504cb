"""Image classifier example: a timm model adapted to small inputs, with torchmetrics accuracy."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_opt._validation import check_bool, check_float, check_int, invalid

DEFAULT_MODEL = "test_efficientnet"


def _get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted)


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child.isdigit() and isinstance(parent, nn.Sequential | nn.ModuleList):
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def adapt_to_small_inputs(model: nn.Module) -> list[str]:
    """Remove the early downsampling of a timm CNN so 32x32-ish inputs keep useful spatial resolution.

    ImageNet stems shrink the input 4x (a strided conv, often followed by a max-pool) before the first
    stage, which leaves a 32x32 image only 8x8 pixels of feature map. The usual CIFAR-style fix, applied
    generically here:

    * the stem conv named by timm's ``pretrained_cfg["first_conv"]`` is replaced by a 3x3 stride-1 conv with
      the same channels, when it is an *overlapping* strided conv (kernel > stride). Patchify stems
      (kernel == stride: ViT, ConvNeXt) are left alone -- for those pass ``img_size`` / ``patch_size``
      through ``model_kwargs`` instead;
    * a top-level ``maxpool`` ``nn.MaxPool2d`` (ResNet family) is replaced by ``nn.Identity``.

    The replaced conv is freshly initialised, so this is meant for training from scratch. Returns the names of
    the modules that were changed (empty when the model was left as is).
    """
    changed: list[str] = []
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(first, list | tuple):
        first = first[0] if first else None
    if first:
        try:
            conv = _get_submodule(model, first)
        except AttributeError:
            conv = None
        if (
            conv is not None
            and not isinstance(conv, nn.Conv2d)
            and isinstance(getattr(conv, "conv", None), nn.Conv2d)
        ):
            # timm wraps some stems (ConvNormAct / ScaledStdConv containers): the conv is the ``.conv`` child.
            first, conv = f"{first}.conv", conv.conv
        if isinstance(conv, nn.Conv2d) and max(conv.stride) > 1 and max(conv.kernel_size) > max(conv.stride):
            new = nn.Conv2d(
                conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1,
                groups=conv.groups, bias=conv.bias is not None,
            )  # fmt: skip
            _set_submodule(model, first, new)
            changed.append(first)
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
        changed.append("maxpool")
    return changed


class ImageClassifier(pl.LightningModule):
    """A timm classifier for small images (digits / CIFAR-10), trained with cross-entropy.

    The default model, ``test_efficientnet`` (a 0.1M-parameter EfficientNet from timm's own model zoo), is
    chosen so that a few hundred steps at 32x32 on a 2-core CPU take seconds; any ``timm.create_model`` name
    works (e.g. ``resnet18``, ``resnet10t``, ``lcnet_050``), optionally with ``model_kwargs``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    ``configure_optimizers`` returns ``SGD(lr, momentum, weight_decay)`` from the hyperparameters; the
    Lightning CLI's ``--optimizer`` / ``--lr_scheduler`` replace it.

    Args:
        model_name: timm model name.
        num_classes: output classes, >= 2.
        lr: SGD learning rate, > 0.
        momentum: SGD momentum, in [0, 1).
        weight_decay: SGD weight decay, >= 0.
        pretrained: load timm's pretrained weights (downloads; off by default).
        small_input: apply :func:`adapt_to_small_inputs` (stride-1 3x3 stem, no max-pool).
        in_chans: input channels.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``{"drop_rate": 0.1}``).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        pretrained: bool = False,
        small_input: bool = True,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 2)
        check_float("lr", lr, 0.0, low_open=True)
        check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        check_float("weight_decay", weight_decay)
        check_int("in_chans", in_chans, 1)
        check_bool("pretrained", pretrained)
        check_bool("small_input", small_input)
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise invalid("model_kwargs", model_kwargs, "None or a dict of timm.create_model arguments")
        if not timm.is_model(model_name):
            raise invalid("model_name", model_name, "a timm model name (see timm.list_models())")
        self.save_hyperparameters()
        self.model = timm.create_model(
            model_name,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=in_chans,
            **(model_kwargs or {}),
        )
        self.adapted_modules = adapt_to_small_inputs(self.model) if small_input else []
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
