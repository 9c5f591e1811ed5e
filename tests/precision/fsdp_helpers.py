"""Two-process FSDP2 runs (Lightning's ``ModelParallelStrategy`` on the CPU with gloo) for the FP8 plugin tests.

Each rank is a process started with the environment a launcher such as ``torchrun`` sets (so Lightning starts no
processes itself); it trains a small GPT-style LM whose blocks and root are sharded with ``fully_shard`` in
``configure_model``, and saves what the test compares into ``out_dir/rank{r}.pt``.
"""

from __future__ import annotations

import importlib
import os
import socket
import traceback

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from precision_helpers import Block, RankInterleavedSampler, trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, DIM, CONTEXT = 64, 32, 16


def lm_data(n: int) -> TensorDataset:
    """Sequences of 17 tokens following a fixed random successor table, with 10 % random tokens."""
    g = torch.Generator().manual_seed(0)
    table = torch.randint(VOCAB, (VOCAB,), generator=g)
    seqs = [torch.randint(VOCAB, (n,), generator=g)]
    for _ in range(CONTEXT):
        nxt = table[seqs[-1]]
        noise = torch.rand(n, generator=g) < 0.1
        seqs.append(torch.where(noise, torch.randint(VOCAB, (n,), generator=g), nxt))
    return TensorDataset(torch.stack(seqs, 1))


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, DIM))
        self.blocks = nn.ModuleList([Block(DIM, 2), Block(DIM, 2)])
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class ShardedLM(pl.LightningModule):
    """The GPT above; ``configure_model`` applies FSDP2 per block and at the root when a device mesh exists."""

    def __init__(self, lr: float = 3e-3, optimizer: str = "adamw") -> None:
        super().__init__()
        self.model = GPT()
        self.lr = lr
        self.optimizer_name = optimizer
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def configure_model(self) -> None:
        if self._device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # sharded by an earlier fit
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        self.val_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, kwargs: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    importlib.import_module("lightning_plugins")  # registers the string flag in the fresh process

    try:
        result = fn(rank=rank, world=world, **kwargs)
    except BaseException as err:  # noqa: BLE001 - the parent reads it
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_ranks(fn, out_dir, world: int = 2, **kwargs) -> list[dict]:
    """``fn(rank=, world=, **kwargs)`` in ``world`` fresh processes; returns each rank's result dict."""
    mp.start_processes(_worker, args=(world, free_port(), fn, kwargs, str(out_dir)), nprocs=world,
                       start_method="spawn", join=True)
    results = [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=True) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}\n{res.get('traceback', '')}"
    return results


def lm_loader(n: int, batch_size: int, distributed: bool) -> DataLoader:
    data = lm_data(n)
    if distributed:
        return DataLoader(data, batch_size=batch_size, sampler=RankInterleavedSampler(len(data)))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def fit_lm(plugin, steps: int, batch_size: int, distributed: bool, strategy=None, seed: int = 0, callbacks=(),
           model: ShardedLM | None = None, val_batches: int = 0, **trainer_overrides):
    """Train :class:`ShardedLM` for ``steps`` optimizer steps (global batch = ``batch_size`` x ranks x
    ``accumulate_grad_batches``); with ``val_batches``, validate on that many batches at the end of the epoch."""
    pl.seed_everything(seed, verbose=False)
    model = model or ShardedLM()
    kwargs = trainer_kwargs(max_steps=steps, limit_val_batches=val_batches, deterministic=False,
                            callbacks=list(callbacks), use_distributed_sampler=False)
    if distributed:
        kwargs.update(devices=2, strategy=strategy)
    kwargs.update(trainer_overrides)
    trainer = pl.Trainer(plugins=[plugin] if plugin is not None else None, **kwargs)
    world = 2 if distributed else 1
    micro = kwargs.get("accumulate_grad_batches", 1)
    train = lm_loader(batch_size * world * steps * micro, batch_size, distributed)
    trainer.fit(model, train, lm_loader(batch_size * world * val_batches, batch_size, distributed) if val_batches
                else None)
    return model, trainer
