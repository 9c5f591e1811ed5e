"""fp8-msamp under Lightning DDP on 2 CPU processes (gloo, ddp_spawn): FP8 gradient communication gives the same
gradients on every rank, within FP8 tolerance of an fp32 all-reduce, and training matches one process with the
same global batch."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from precision_helpers import TinyMLP, ddp_loader, fit, trainer_kwargs

from lightning_plugins import MSAMPPrecision
from lightning_plugins.fp8 import get_fp8_grad, quantize

STEPS = 6
E4M3_REL = 2.0**-4


def _grads(module):
    out = {}
    for name, p in module.named_parameters():
        side = get_fp8_grad(p)
        if side is not None:
            out[name] = side.dequantize(torch.float32).clone()
        elif p.grad is not None:
            out[name] = p.grad.detach().float().clone()
    return out


class RecordGrads(pl.Callback):
    """Per rank and step: gradients after backward (before the FP8 reduction of O2) and before the optimizer step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.local: list[dict] = []
        self.reduced: list[dict] = []
        self.losses: list[float] = []

    def on_after_backward(self, trainer, pl_module):
        self.local.append(_grads(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.reduced.append(_grads(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        state = {"local": self.local, "reduced": self.reduced, "losses": self.losses,
                 "params": {k: v.detach().float().clone() for k, v in pl_module.state_dict().items()},
                 "optimizer": type(trainer.optimizers[0]).__name__}
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def _ddp_run(level, out_dir):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(
        devices=2, strategy="ddp_spawn", max_steps=STEPS, limit_val_batches=0, deterministic=False,
        callbacks=[RecordGrads(str(out_dir))], use_distributed_sampler=False,
    ), plugins=[MSAMPPrecision(level=level)])
    trainer.fit(TinyMLP(), ddp_loader(batch_size=16))  # 2 ranks x 16 = the single-process batch of 32
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _sqnr(ref, got):
    return float(10 * torch.log10(ref.pow(2).sum() / (got - ref).pow(2).sum().clamp_min(1e-30)))


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_ddp_two_processes(level, tmp_path):
    ranks = _ddp_run(level, tmp_path)
    assert ranks[0]["optimizer"] == ("FP8AdamW" if level == "O2" else "AdamW")
    # 1. every rank sees bit-identical reduced gradients and ends with identical weights
    for step in range(STEPS):
        a, b = ranks[0]["reduced"][step], ranks[1]["reduced"][step]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"step {step}"
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])

    # 2. the FP8 weight gradients travelled as E4M3: the averages lie on the E4M3 grid (an fp32 mean of two E4M3
    # values usually needs more mantissa bits), while the fp32-reduced biases do not
    fp8_weights = [f"net.{i}.weight" for i in (0, 2, 4)]
    for step in range(STEPS):
        reduced = ranks[0]["reduced"][step]
        assert all(torch.equal(quantize(reduced[w], "e4m3")[0].dequantize(), reduced[w]) for w in fp8_weights)
        assert not all(torch.equal(quantize(reduced[b], "e4m3")[0].dequantize(), reduced[b])
                       for b in ("net.0.bias", "net.2.bias"))

    # 3. O2: the FP8 weight gradients (reduced by the plugin) are within FP8 tolerance of the fp32 average
    if level == "O2":
        for step in range(STEPS):
            for name in fp8_weights:
                local = [r["local"][step][name] for r in ranks]
                fp32_mean = (local[0] + local[1]) / 2
                mean_abs = (local[0].abs() + local[1].abs()) / 2
                got = ranks[0]["reduced"][step][name]
                assert ((got - fp32_mean).abs() <= 1.01 * E4M3_REL * (mean_abs + fp32_mean.abs())
                        + 1e-6 * mean_abs.max()).all(), (step, name)
                assert _sqnr(fp32_mean, got) > 25

    # 4. training matches one process with the same global batch (32)
    single, _ = fit(plugins=[MSAMPPrecision(level=level)], steps=STEPS)
    ddp_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    # (per-tensor FP8 scales follow each rank's half batch, so even step 0 differs slightly)
    assert max(abs(a - b) for a, b in zip(ddp_losses, single.losses)) < 0.03
    for name, p in single.state_dict().items():
        assert _sqnr(p.float(), ranks[0]["params"][name]) > 30, name
