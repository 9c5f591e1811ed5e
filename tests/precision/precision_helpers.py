"""Tiny models, data and Trainer settings shared by the precision-plugin tests (all dims multiples of 16)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

IN, HIDDEN, CLASSES = 32, 64, 16


def make_data(n: int = 256, seed: int = 0) -> TensorDataset:
    """A learnable synthetic classification task: labels from a fixed random linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    w = torch.randn(IN, CLASSES, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


def loader(n: int = 256, batch_size: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


class RankInterleavedSampler(Sampler):
    """Rank r of w reads samples r, r+w, r+2w, ... in order: w ranks' batches of b = one process's batch of w*b.

    (Lightning's own distributed sampler always shuffles training data.) Rank and world are read when iterating,
    so the sampler can be built before the processes start (ddp_spawn).
    """

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


def ddp_loader(n: int = 256, batch_size: int = 16, seed: int = 0) -> DataLoader:
    data = make_data(n, seed)
    return DataLoader(data, batch_size=batch_size, sampler=RankInterleavedSampler(len(data)))


class TinyMLP(pl.LightningModule):
    """Three nn.Linear layers; records every training loss in ``self.losses``.

    Args:
        lr: learning rate.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"``.
        step_lr: if set, a StepLR(step_size=1, gamma=step_lr) stepped every optimizer step.
        weight_decay: for the optimizer.
    """

    def __init__(self, lr: float = 1e-2, optimizer: str = "adamw", step_lr: float | None = None,
                 weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES)
        )
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.val_losses.append(loss.item())
        return loss

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.step_lr is None:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=hp.step_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer_kwargs(**overrides):
    """Quiet single-CPU Trainer settings."""
    kwargs = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


class KeepFP8Layers(pl.Callback):
    """Leave the FP8 layers in the model after the run (``restore_layers=False``), so a test can inspect the FP8
    training state (masters, scales, optimizer) as it was at the end of training."""

    def setup(self, trainer, pl_module, stage):
        trainer.precision_plugin.restore_layers = False


def fit(
    precision=None, plugins=None, steps: int = 20, seed: int = 0, model: TinyMLP | None = None, keep_fp8=True, **kw
):
    """Train a TinyMLP for ``steps`` optimizer steps; returns (model, trainer). ``keep_fp8``: see KeepFP8Layers."""
    pl.seed_everything(seed, verbose=False)
    model = model or TinyMLP()
    if keep_fp8 and (precision == "fp8-msamp" or plugins):
        kw["callbacks"] = [*kw.get("callbacks", []), KeepFP8Layers()]
    args = trainer_kwargs(max_steps=steps, limit_val_batches=0, **kw)
    if precision is not None:
        args["precision"] = precision
    if plugins is not None:
        args["plugins"] = plugins
    trainer = pl.Trainer(**args)
    trainer.fit(model, loader())
    return model, trainer


class Block(nn.Module):
    """Pre-norm Transformer block from nn.Linear layers (causal self-attention + MLP)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(pl.LightningModule):
    """A 2-block causal LM (dim 32, vocab 64, context 16) whose ``lm_head`` stays high precision by default."""

    def __init__(self, vocab: int = 64, dim: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(16, dim))
        self.blocks = nn.Sequential(Block(dim, 2), Block(dim, 2))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(tokens) + self.pos)))

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def lm_loader(n: int = 128, vocab: int = 64) -> DataLoader:
    """Sequences of 17 tokens following a fixed random successor table (learnable next-token task)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randint(vocab, (vocab,), generator=g)
    start = torch.randint(vocab, (n,), generator=g)
    seqs = [start]
    for _ in range(16):
        seqs.append(table[seqs[-1]])
    return DataLoader(TensorDataset(torch.stack(seqs, 1)), batch_size=16, shuffle=False)
