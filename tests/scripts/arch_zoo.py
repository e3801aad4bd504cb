"""Every strategy × architectures nobody here wrote (timm, torchvision, transformers) and structural cases, on 2
ranks launched by ``run_ranks``; one fit per cell (4 optimizer steps, period 2, a validation mid-period).

Each rank writes ``<out>/<cell>.rank<r>.json``: ``{"status": "ok" | "error", "error": ..., "digest": [...]}`` where
the digest is per-tensor sums of the final ``state_dict`` (consensus weights), so ranks can be compared.
Usage: arch_zoo.py OUT [--cells model:strategy,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_opt import _flavour

pl = _flavour.lightning_module()
from lightning_opt.callbacks import GradientNoiseMonitor, SharpnessMonitor, TimeAverageMonitor  # noqa: E402
from lightning_opt.examples import CharTransformerLM  # noqa: E402
from lightning_opt.strategies import EASGDStrategy, LocalSGDStrategy, LookaheadStrategy, LSGDStrategy  # noqa: E402

VOCAB, SEQ, IMG = 48, 16, 32

STRATEGIES = {
    "local_sgd": lambda: LocalSGDStrategy(period=2, outer_lr=0.7, outer_momentum=0.6, outer_nesterov=True, timeout=60),
    "lsgd": lambda: LSGDStrategy(period=2, pull=0.25, leader_window=2, timeout=60),
    "lookahead_sync": lambda: LookaheadStrategy(period=2, alpha=0.3, mode="sync", timeout=60),
    "lookahead_local": lambda: LookaheadStrategy(period=2, alpha=0.3, mode="local", timeout=60),
    "easgd": lambda: EASGDStrategy(period=2, beta=0.43, timeout=60),
}


# ----------------------------------------------------------------------------------------------- models
def timm_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, num_classes=10)


def timm_convnext() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


class GPT2(nn.Module):
    """Hugging Face GPT-2 from a small config (causal-mask handling, tied embeddings); returns logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, x):
        return self.lm(input_ids=x).logits


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)
        self.body.requires_grad_(False)

    def forward(self, x):
        return self.head(self.body(x))


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, 16), nn.ReLU(), nn.Linear(16, 10))
        self.unused = nn.Linear(16, 16)

    def forward(self, x):
        return self.body(x)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, VOCAB, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


class WeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.body = nn.Sequential(nn.Flatten(), weight_norm(nn.Linear(3 * IMG * IMG, 16)), nn.ReLU(),
                                  weight_norm(nn.Linear(16, 10)))

    def forward(self, x):
        return self.body(x)


class SparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, sparse=True)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, x):
        return self.out(self.emb(x))


class Compiled(nn.Module):
    """``torch.compile`` on a submodule with BatchNorm (buffers mutated inside the graph). ``aot_eager`` runs
    dynamo and AOT autograd (functionalised buffer updates) without a C++ toolchain."""

    def __init__(self) -> None:
        super().__init__()
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, 16), nn.BatchNorm1d(16), nn.ReLU(),
                            nn.Linear(16, 10))
        self.net = torch.compile(net, backend="aot_eager")

    def forward(self, x):
        return self.net(x)


MODELS = {
    "timm_vit": (timm_vit, "image"), "timm_convnext": (timm_convnext, "image"), "resnet18": (resnet18, "image"),
    "gpt2": (GPT2, "tokens"), "frozen": (Frozen, "image"), "unused": (Unused, "image"), "tied": (Tied, "tokens"),
    "weight_norm": (WeightNorm, "image"), "compiled": (Compiled, "image"), "sparse_embedding": (SparseEmbedding,
                                                                                            "tokens"),
}
#: models that also run with the three stateful monitors attached
WITH_MONITORS = {"gpt2", "char_transformer"}


def dataset(kind: str, n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    if kind == "image":
        return TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, 10, (n,), generator=g))
    x = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return TensorDataset(x[:, :-1], x[:, 1:])


class Sharded:
    def _loader(self, ds: TensorDataset) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, world, rank, shuffle=False))


class ZooModule(Sharded, pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        build, self.kind = MODELS[name]
        self.net = build()

    def _loss(self, batch):
        x, y = batch
        logits = self.net(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return self._loader(dataset(self.kind))

    def val_dataloader(self):
        return self._loader(dataset(self.kind, 8))


class ZooCharLM(Sharded, CharTransformerLM):
    """The package's own char transformer (its causal mask is a ``-inf`` buffer)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, block_size=SEQ)

    def train_dataloader(self):
        return self._loader(dataset("tokens"))

    def val_dataloader(self):
        return self._loader(dataset("tokens", 8))


def monitors() -> list:
    return [SharpnessMonitor(every_n_steps=2, max_iter=4), GradientNoiseMonitor(every_n_steps=2, num_batches=2,
                                                                                bootstrap=10),
            TimeAverageMonitor()]


def run_cell(model_name: str, strategy_name: str, out: Path) -> dict:
    model = ZooCharLM() if model_name == "char_transformer" else ZooModule(model_name)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=STRATEGIES[strategy_name](), max_steps=4, val_check_interval=3,
        limit_val_batches=1, num_sanity_val_steps=0, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=monitors() if model_name in WITH_MONITORS else [],
    )
    try:
        trainer.fit(model)
    except ValueError as err:  # setup-time refusals are part of the matrix
        return {"status": "error", "error": str(err)}
    state = model.state_dict()
    return {"status": "ok", "digest": [float(t.double().sum()) for t in state.values() if t.is_floating_point()],
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--cells", default="")
    args = parser.parse_args()
    cells = [tuple(c.split(":")) for c in args.cells.split(",") if c] or [
        (m, s) for m in [*MODELS, "char_transformer"] for s in STRATEGIES]
    rank = int(os.environ.get("RANK", "0"))
    for model_name, strategy_name in cells:
        try:
            result = run_cell(model_name, strategy_name, args.out)
        except Exception as err:  # noqa: BLE001  (recorded; the test reports it with the traceback)
            result = {"status": "crash", "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
            print(result["trace"], file=sys.stderr, flush=True)
        (args.out / f"{model_name}:{strategy_name}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
