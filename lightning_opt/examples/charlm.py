"""Character-level causal transformer language model.

The attention setting in which the thesis observed heavy-tailed stochastic-gradient noise (and ACClip ahead of
Adam); small enough to train on a CPU.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_opt._validation import check_bool, check_float, check_int, invalid

_LN2 = math.log(2.0)


class CharTransformerLM(pl.LightningModule):
    """A pre-norm causal transformer over characters: token + learned position embeddings, ``n_layers``
    ``nn.TransformerEncoderLayer`` blocks under a causal mask, a final LayerNorm and a linear head.

    Logs ``train/loss`` (nats per character), ``val/loss`` and ``val/bpc`` (bits per character,
    ``loss / ln 2``), and the same for ``test/``.

    ``configure_optimizers`` returns ``AdamW(lr, weight_decay)`` (with the default ``weight_decay=0`` this is
    Adam); the Lightning CLI's ``--optimizer`` replaces it. With ``vocab_size=None`` (the CLI configs) the layers are
    built in ``configure_model`` from the attached datamodule's ``vocab_size``, so no argument link is needed.

    Args:
        vocab_size: number of distinct tokens, >= 2 (``CharDataModule.vocab_size``); ``None``: read it from the
            trainer's datamodule in ``configure_model``.
        d_model: embedding width, >= 1 and divisible by ``n_heads``.
        n_layers: transformer blocks, >= 1.
        n_heads: attention heads, >= 1.
        block_size: longest context the model accepts (size of the position table), >= 1.
        dropout: dropout probability, in [0, 1).
        lr: learning rate, > 0.
        weight_decay: AdamW decoupled weight decay, >= 0.
        tie_weights: share the token embedding with the output head.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        block_size: int = 64,
        dropout: float = 0.0,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, 2, optional=True)
        check_int("d_model", d_model, 1)
        check_int("n_layers", n_layers, 1)
        check_int("n_heads", n_heads, 1)
        check_int("block_size", block_size, 1)
        if d_model % n_heads:
            raise invalid("d_model", d_model, f"a multiple of n_heads={n_heads}")
        check_float("dropout", dropout, 0.0, 1.0, high_open=True)
        check_float("lr", lr, 0.0, low_open=True)
        check_float("weight_decay", weight_decay)
        check_bool("tie_weights", tie_weights)
        self.save_hyperparameters()
        self.block_size = block_size
        if vocab_size is not None:
            self._build(vocab_size)

    def _build(self, vocab_size: int) -> None:
        hp = self.hparams
        d_model = hp.d_model
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(hp.block_size, d_model)
        self.drop = nn.Dropout(hp.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, hp.n_heads, dim_feedforward=4 * d_model, dropout=hp.dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        # enable_nested_tensor=False: the nested-tensor fast path does not apply to pre-norm layers anyway.
        self.blocks = nn.TransformerEncoder(layer, hp.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if hp.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.register_buffer(
            "causal_mask", nn.Transformer.generate_square_subsequent_mask(hp.block_size), persistent=False
        )

    def configure_model(self) -> None:
        """Build the layers from the datamodule's vocabulary when ``vocab_size`` was left ``None``."""
        self.attach_datamodule(self.trainer.datamodule if self._trainer is not None else None)

    def attach_datamodule(self, datamodule: Any) -> None:
        """Build the layers from ``datamodule.vocab_size`` unless they exist (the CLI calls this before it builds
        the optimizer from the parameters)."""
        if hasattr(self, "tok_emb"):
            return
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is None:
            raise ValueError("CharTransformerLM(vocab_size=None) needs a datamodule with a `vocab_size` attribute")
        self.hparams.vocab_size = int(vocab)
        self._build(int(vocab))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2-style small init keeps the initial loss near ln(vocab_size).
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``[B, T, vocab_size]`` for token ids ``idx`` ``[B, T]``, ``T <= block_size``."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        h = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        h = self.blocks(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        loss = self._loss(batch)
        # Every block has block_size targets, so Lightning's batch-size-weighted epoch mean is per character.
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/bpc", loss / _LN2, prog_bar=stage == "val", sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, generator=None) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``[B, T]`` (context cropped to block_size)."""
        if not temperature > 0:
            raise invalid("temperature", temperature, "a number > 0")
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size :])[:, -1] / temperature
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return idx
