"""CPU step time of the emulated FP8 recipe (``fp8-msamp`` O1/O2) vs ``32-true`` on the GPT-style model.

    .venv/bin/python benchmarks/fp8_overhead.py                      # d_model 512, 4 layers, 1 thread
    .venv/bin/python benchmarks/fp8_overhead.py --threads 2 --rounds 8

All three runs live in one process and are interleaved: each round times ``--steps`` training steps
of every precision in a rotated order (after warm-up steps), and the per-step median over the
rounds is reported, so drifting machine load hits every precision alike. A training step is
forward + loss + backward + optimizer step + zero_grad through Lightning Fabric with the precision
plugin (``MSAMPFabricPrecision``; O2 swaps AdamW for ``FP8AdamW`` via ``convert_optimizer``), i.e.
everything the plugin adds, without the Trainer's per-step bookkeeping. Backend: ``emulated``
(auto on CPU). Goal (issue 3): step-time ratio <= 2.5x ``32-true``.

Writes ``benchmarks/results/fp8_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402

from _gpt import (  # noqa: E402
    GPT,
    GPTConfig,
    environment,
    lm_loss,
    markdown_table,
    quiet_lightning,
    random_token_batches,
    write_results,
)
from lightning_plugins.precision import MSAMPFabricPrecision  # noqa: E402

MODES = ("32-true", "fp8-msamp O1", "fp8-msamp O2")


class Runner:
    """One model + optimizer + Fabric for one precision; ``step()`` is one training step."""

    def __init__(self, mode: str, cfg: GPTConfig, lr: float = 1e-3) -> None:
        torch.manual_seed(0)
        model = GPT(cfg)
        optimizer_fn = lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)  # noqa: E731
        if mode == "32-true":
            self.fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
            optimizer = optimizer_fn(model)
        else:
            plugin = MSAMPFabricPrecision(level=mode.split()[-1])
            self.fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
            model = plugin.convert_module(model)
            optimizer = plugin.convert_optimizer(optimizer_fn(model), model)
        self.model, self.optimizer = self.fabric.setup(model, optimizer)
        self.mode = mode
        self.times: list[float] = []
        self.last_loss = float("nan")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = lm_loss(self.model(x), y)
        self.fabric.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())

    def timed(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        start = time.perf_counter()
        for x, y in batches:
            self.step(x, y)
        self.times.append((time.perf_counter() - start) / len(batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per precision first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision per round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_lightning()
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                    n_heads=max(1, args.d_model // 64))
    batches = random_token_batches(cfg, args.batch_size, args.steps)
    runners = [Runner(mode, cfg) for mode in MODES]
    for r in runners:
        for x, y in (batches * args.warmup)[: args.warmup]:
            r.step(x, y)
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners) :] + runners[: rnd % len(runners)]
        for r in order:
            r.timed(batches)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{r.mode} {1e3 * r.times[-1]:.0f} ms" for r in runners),
              flush=True)

    base = runners[0]
    base_med = statistics.median(base.times)
    rows, runs = [], []
    for r in runners:
        med = statistics.median(r.times)
        ratios = [t / b for t, b in zip(r.times, base.times)]  # same-round ratios
        runs.append({"mode": r.mode, "optimizer": type(r.optimizer.optimizer if hasattr(r.optimizer, "optimizer")
                                                          else r.optimizer).__name__,
                     "step_s": r.times, "median_step_s": med, "ratio_of_medians": med / base_med,
                     "round_ratios": ratios, "last_loss": r.last_loss})
        goal = "-" if r is base else ("met" if med / base_med <= 2.5 else "MISSED")
        rows.append([r.mode, runs[-1]["optimizer"], f"{1e3 * med:.1f}", f"{1e3 * min(r.times):.1f}",
                     f"{1e3 * max(r.times):.1f}", f"{med / base_med:.2f}x",
                     f"{min(ratios):.2f}-{max(ratios):.2f}x", f"{r.last_loss:.3f}", goal])
    headers = ["precision", "optimizer", "median step (ms)", "min (ms)", "max (ms)", "ratio vs 32-true",
               "per-round ratio range", "loss (last step)", "goal <= 2.5x"]
    env = environment()
    tokens = args.batch_size * args.seq_len
    md = "\n".join([
        f"# FP8 CPU emulation overhead (torch {env['torch']}, {args.threads} CPU thread(s), backend emulated)", "",
        f"GPT d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, seq {cfg.seq_len}, batch "
        f"{args.batch_size} ({tokens} tokens/step), AdamW; {args.rounds} interleaved rounds x {args.steps} steps "
        f"after {args.warmup} warm-up steps; Fabric + precision plugin, one process.", "",
        markdown_table(headers, rows), "",
    ])
    write_results("fp8_overhead", {"environment": env, "config": vars(args), "model": cfg.__dict__, "runs": runs}, md)
    print(md)


if __name__ == "__main__":
    main()
