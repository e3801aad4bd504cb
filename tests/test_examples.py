"""Example models and offline datamodules: shapes, determinism, no network, short real training runs."""

from __future__ import annotations

import math
import socket
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DistributedSampler

from lightning_opt.examples import (
    DEFAULT_MODEL,
    CharDataModule,
    CharTransformerLM,
    DigitsDataModule,
    ImageClassifier,
    adapt_to_small_inputs,
)

TRAINER_KW = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI box is a shared 2-core CPU: multi-threaded kernels under contention are far slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


class _LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_normalisation(no_network):
    dm = DigitsDataModule(batch_size=16, image_size=24, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == round(1797 * 0.2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) <= 9
    assert torch.equal(x[:, 0], x[:, 2])  # grey digits replicated to 3 channels
    train_x = dm.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-3
    assert len(dm.test_dataloader().dataset) == len(dm.val_set)


def test_digits_deterministic_split_and_order():
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[0], c.val_set.tensors[0])
    # Seeded shuffle: same batches in the same order, for every epoch-iteration of a fresh loader.
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_digits_shard_uses_non_shuffling_distributed_sampler():
    shards = []
    for rank in (0, 1):
        dm = DigitsDataModule(batch_size=8, shard=True)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what an attached Trainer exposes
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)
        assert (loader.sampler.num_replicas, loader.sampler.rank, loader.sampler.shuffle) == (2, rank, False)
        shards.append(list(loader.sampler))
    n = len(dm.train_set)
    assert len(shards[0]) == len(shards[1]) == math.ceil(n / 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert shards[0] == list(range(0, n, 2))  # deterministic, unshuffled order
    # Not attached to a trainer: world 1, rank 0.
    single = DigitsDataModule(shard=True).train_dataloader().sampler
    assert (single.num_replicas, single.rank) == (1, 0)


def test_cifar10_is_opt_in_and_never_downloads_by_default(tmp_path, no_network):
    # no data: refused at construction (before any process is launched), naming the directory and the way out
    with pytest.raises(ValueError, match=r"data_dir='.*' holds no CIFAR-10 \(cifar-10-batches-py/\); pass download"):
        DigitsDataModule(dataset="cifar10", data_dir=str(tmp_path))
    (tmp_path / "cifar-10-batches-py").mkdir()  # a folder without the files: found damaged at setup
    dm = DigitsDataModule(dataset="cifar10", data_dir=str(tmp_path))
    dm.prepare_data()  # download=False: nothing happens
    with pytest.raises(RuntimeError, match="download=True"):
        dm.setup("fit")


def test_a_missing_text_file_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"text_path='.*nope.txt' is not a file"):
        CharDataModule(text_path=str(tmp_path / "nope.txt"))


# ------------------------------------------------------------------------------------------------ text


def test_char_corpus_offline_vocab_and_blocks(no_network):
    dm = CharDataModule(block_size=32, batch_size=8, max_chars=20_000, val_fraction=0.1)
    assert len(dm.text) == 20_000
    assert dm.vocab_size == len(set(dm.text)) and dm.vocab_size > 20
    assert dm.decode(dm.encode(dm.text[:200])) == dm.text[:200]
    assert len(dm.val_tokens) == 2_000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    assert int(x.max()) < dm.vocab_size
    # Validation: consecutive non-overlapping blocks of the held-out tail.
    vx, vy = next(iter(dm.val_dataloader()))
    assert torch.equal(vx[0], dm.val_tokens[:32]) and torch.equal(vx[1], dm.val_tokens[32:64])


def test_char_deterministic_sampling_and_text_path(tmp_path):
    a = CharDataModule(block_size=16, batch_size=4, max_chars=5_000, seed=1)
    b = CharDataModule(block_size=16, batch_size=4, max_chars=5_000, seed=1)
    c = CharDataModule(block_size=16, batch_size=4, max_chars=5_000, seed=2)
    first = [next(iter(dm.train_dataloader()))[0] for dm in (a, b, c)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])

    path = tmp_path / "corpus.txt"
    path.write_text("abcab" * 100, encoding="utf-8")
    dm = CharDataModule(block_size=8, batch_size=2, text_path=str(path), shard=True)
    assert dm.vocab_size == 3 and dm.chars == ["a", "b", "c"]
    assert isinstance(dm.train_dataloader().sampler, DistributedSampler)
    with pytest.raises(ValueError, match="block_size"):
        CharDataModule(block_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        CharDataModule(val_fraction=1.5)


# -------------------------------------------------------------------------------------------- models


def test_adapt_to_small_inputs_resnet_and_patchify_stems():
    import timm

    resnet = timm.create_model("test_resnet", num_classes=10)
    assert adapt_to_small_inputs(resnet) == ["conv1.0", "maxpool"]
    assert resnet.conv1[0].stride == (1, 1) and isinstance(resnet.maxpool, torch.nn.Identity)
    vit = timm.create_model("test_vit", num_classes=10)
    assert adapt_to_small_inputs(vit) == []  # patch embedding left alone
    model = ImageClassifier()
    assert model.hparams.model_name == DEFAULT_MODEL and model.adapted_modules == ["conv_stem"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_image_classifier_loss_decreases_on_digits():
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, image_size=16)
    model = ImageClassifier(lr=0.05)
    rec = _LossRecorder()
    trainer = pl.Trainer(max_steps=30, limit_val_batches=2, callbacks=[rec], **TRAINER_KW)
    trainer.fit(model, dm)
    assert len(rec.losses) == 30 and all(math.isfinite(v) for v in rec.losses)
    assert sum(rec.losses[-5:]) / 5 < 0.7 * sum(rec.losses[:5]) / 5, rec.losses
    assert {"train/loss", "train/acc"} <= set(trainer.callback_metrics)
    trainer.validate(model, dm, verbose=False)
    assert {"val/loss", "val/acc"} <= set(trainer.callback_metrics)


def test_char_lm_trains_and_logs_bits_per_char():
    pl.seed_everything(0, verbose=False)
    dm = CharDataModule(block_size=32, batch_size=16, max_chars=20_000)
    model = CharTransformerLM(vocab_size=dm.vocab_size, d_model=32, n_layers=1, n_heads=2, block_size=32, lr=3e-3)
    rec = _LossRecorder()
    trainer = pl.Trainer(max_steps=30, limit_val_batches=3, callbacks=[rec], **TRAINER_KW)
    trainer.fit(model, dm)
    trainer.validate(model, dm, verbose=False)
    m = trainer.callback_metrics
    assert math.isclose(float(m["val/bpc"]), float(m["val/loss"]) / math.log(2), rel_tol=1e-5)
    assert sum(rec.losses[-5:]) < sum(rec.losses[:5])
    assert abs(rec.losses[0] - math.log(dm.vocab_size)) < 0.5  # small init: near-uniform predictions
    out = model.generate(dm.encode("def ")[None], 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 9)


def test_lightning_cli_optimizer_override_and_vocab_link(monkeypatch):
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["lightning-opt"])  # args= only; pytest's own argv is not for the CLI

    class _CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    cli = _CLI(
        CharTransformerLM,
        CharDataModule,
        run=False,
        args=["--data.max_chars=3000", "--data.block_size=16", "--model.block_size=16", "--optimizer=Adam"],
    )
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size
    cli.trainer.strategy.connect(cli.model)
    opt = cli.model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    assert isinstance(opt, torch.optim.Adam)

    cli = LightningCLI(
        run=False,
        args=[
            "--model=lightning_opt.examples.ImageClassifier",
            "--data=lightning_opt.examples.DigitsDataModule",
            "--model.init_args.lr=0.01",
        ],
    )
    assert isinstance(cli.model, ImageClassifier) and cli.model.hparams.lr == 0.01
    assert isinstance(cli.model.configure_optimizers(), torch.optim.SGD)
