"""Rank script (issue 26 §4): resuming says what it does. argv: out_dir. Saves rank{r}.pt with, per case, the
warnings or the error each resume produced and the strategy counters after it."""

import sys
import warnings
from pathlib import Path

import torch
from _common import TinyModel, pl, rank, trainer

from lightning_opt.strategies import LocalSGDStrategy, LookaheadStrategy

out = Path(sys.argv[1])
results: dict = {}


def fit(strategy, max_steps, ckpt_path=None, save_to=None):
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=save_to, every_n_train_steps=max_steps, save_top_k=-1,
                                              filename="last")] if save_to else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer(strategy, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(save_to)).fit(
                TinyModel(), ckpt_path=ckpt_path)
            error = None
        except ValueError as err:
            error = str(err)
    return {"warnings": [str(w.message) for w in caught], "error": error,
            "steps": dict(getattr(getattr(strategy, "clock", None), "steps", {}))}


def local_sgd():
    return LocalSGDStrategy(period=4, outer_lr=0.7, outer_momentum=0.9, timeout=60)


# a Local SGD checkpoint (outer momentum and anchor in its state) and a plain-DDP one
fit(local_sgd(), 6, save_to=out / "local")
fit("ddp", 6, save_to=out / "ddp")
ckpt = out / "local" / "last.ckpt"
results["other_strategy"] = fit(LookaheadStrategy(period=4, alpha=0.5, mode="local", timeout=60), 8, ckpt)
results["no_entry"] = fit(local_sgd(), 8, out / "ddp" / "last.ckpt")
results["same_strategy"] = fit(local_sgd(), 8, ckpt)

if rank() == 0:
    (out / "empty.ckpt").write_bytes(b"")
    (out / "text.ckpt").write_text("hello, I am not a checkpoint\n")
    damaged = torch.load(ckpt, weights_only=False)
    name = next(iter(damaged["lightning_opt"]["ranks"][1]["module"]))
    damaged["lightning_opt"]["ranks"][1]["module"][name].view(-1)[0] = float("nan")
    torch.save(damaged, out / "nan.ckpt")
torch.distributed.barrier()
for case in ("empty", "text", "nan"):
    results[case] = fit(local_sgd(), 8, out / f"{case}.ckpt")
torch.save(results, out / f"rank{rank()}.pt")
