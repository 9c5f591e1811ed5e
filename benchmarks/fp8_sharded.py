"""FP8 on sharded training: per-rank persistent bytes/param and bytes on the wire, FSDP2 at 2 ranks on the CPU.

    .venv/bin/python benchmarks/fp8_sharded.py                       # d_model 256, 4 layers, 4 steps, 2 ranks
    .venv/bin/python benchmarks/fp8_sharded.py --d-model 512 --layers 8

Side by side, in one invocation, a GPT-style LM (``benchmarks/_gpt.py``) trained through Lightning's
``ModelParallelStrategy`` (FSDP2 per block + root, 2 processes started with ``torchrun``, gloo):

* ``32-true``: fp32 weights, gradients and Adam states, fp32 all-gather;
* ``bf16-mixed``: autocast + FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16)`` (bf16 all-gather, fp32 reduce),
  the usual FSDP2 bf16 set-up;
* ``fp8-msamp O2``: FP16 master shards, FP8 gradients, FP8/FP16 Adam states;
* ``fp8-msamp O3``: as O2, and the weights are all-gathered in FP8.

Measured per rank, for the block Linear weights (the layers FP8 converts; the same layers in every mode), at the
third optimizer step (after the backward, before the update, so gradients and Adam states both exist): bytes of
the local weight shard, its gradient (``.grad`` and the FP8 side channel) and its optimizer states, over the
weights' global element count. On the wire: the input bytes each rank gives to every collective during one
training step, by collective (FSDP2's weight all-gather, gradient reduce-scatter, the FP8 paths' all-to-all and
small all-reduces). The model below the table extrapolates per-rank bytes/param and weight all-gather bytes to 8,
64 and 1,024 ranks from the per-element formulas, which are first checked against the 2-rank measurement.

Writes ``benchmarks/results/fp8_sharded.{json,md}``. CPU only; 1 torch thread per rank; seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("32-true", "bf16-mixed", "fp8-msamp O2", "fp8-msamp O3")
LINEARS = ("qkv", "proj", "fc1", "fc2")
COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_to_all_single", "all_gather", "all_reduce", "broadcast")
#: per-element bytes of the block Linear weights: (sharded over the N ranks, replicated on every rank), and the
#: bytes per element of the weight all-gather
FORMULAS = {
    "32-true": {"sharded": 16.0, "replicated": 0.0, "gather": 4.0,
                "parts": "fp32 weight 4 + fp32 grad 4 + fp32 m 4 + fp32 v 4, all sharded"},
    "bf16-mixed": {"sharded": 16.0, "replicated": 0.0, "gather": 2.0,
                   "parts": "fp32 weight 4 + fp32 grad 4 + fp32 m 4 + fp32 v 4, all sharded; bf16 all-gather"},
    "fp8-msamp O2": {"sharded": 6.0, "replicated": 0.0, "gather": 2.0,
                     "parts": "FP16 master 2 + FP8 grad 1 + FP8 m 1 + FP16 v 2, all sharded; FP16 all-gather"},
    "fp8-msamp O3": {"sharded": 6.0, "replicated": 0.0, "gather": 1.0,
                     "parts": "FP16 master 2 + FP8 grad 1 + FP8 m 1 + FP16 v 2, all sharded; FP8 all-gather"},
}


# -------------------------------------------------------------------------------------------------- one rank
class _WireCounter:
    """Counts the input bytes of every ``torch.distributed`` collective this process calls, by name."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False
        self._originals = {}
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        import torch

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                # the input is the second positional argument of the *_single/_tensor/all_to_all/all_gather forms,
                # the first of all_reduce/broadcast
                position = 0 if name in ("all_reduce", "broadcast") else 1
                tensor = args[position] if len(args) > position else next(
                    (v for k, v in kwargs.items() if k in ("input", "input_tensor", "tensor")), None)
                if isinstance(tensor, torch.Tensor):
                    self.bytes[name] += tensor.numel() * tensor.element_size()
                    self.calls[name] += 1
            return original(*args, **kwargs)

        return counted


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: Any) -> int:
    import torch

    t = _local(t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _state_of(module: Any, optimizer: Any) -> dict[str, float]:
    """Per-rank bytes of the block Linear weights' shards, gradients and optimizer states, and their global size."""
    from lightning_plugins.fp8.wgrad import get_fp8_grad

    weights = [m.weight for name, m in module.named_modules() if name.rsplit(".", 1)[-1] in LINEARS]
    out = {"weight": 0, "grad": 0, "optimizer": 0, "numel": 0}
    for w in weights:
        out["numel"] += w.numel()
        out["weight"] += _nbytes(w)
        if w.grad is not None:
            out["grad"] += _nbytes(w.grad)
        side = get_fp8_grad(w)
        if side is not None:
            out["grad"] += _nbytes(side.data) + _nbytes(side.scale_inv)
        for value in optimizer.state.get(w, {}).values():
            out["optimizer"] += _nbytes(value)
    return out


def worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from _gpt import GPTConfig, GPTModule, random_token_batches
    from lightning_plugins import MSAMPPrecision

    torch.set_num_threads(1)
    counter = _WireCounter()
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                    n_heads=4)

    class ShardedGPT(GPTModule):
        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            # bf16-mixed and the FP8 modes gather the parameters FP8 does not convert (embeddings, norms, lm_head)
            # in bf16 alike, so the weight all-gathers differ only by the converted Linear weights
            policy = MixedPrecisionPolicy() if mode == "32-true" else MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(self, mesh=mesh, mp_policy=policy)

    class Probe(Callback):
        def __init__(self) -> None:
            self.state: dict[str, float] = {}
            self.wire: dict[str, int] = {}

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            counter.active = trainer.global_step == args.steps - 1  # the last step, after the first ones settled
            counter.bytes.clear()
            counter.calls.clear()

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if trainer.global_step == 2:
                self.state = _state_of(pl_module, optimizer)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if counter.active:
                self.wire = dict(counter.bytes)
                self.calls = dict(counter.calls)
            counter.active = False

    torch.manual_seed(0)
    module = ShardedGPT(cfg, lr=1e-3)
    probe = Probe()
    plugins = [MSAMPPrecision(level=mode[-2:], restore_layers=False)] if mode.startswith("fp8") else []
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices,
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        precision=None if plugins else mode, plugins=plugins, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[probe], num_sanity_val_steps=0,
    )
    data = random_token_batches(cfg, args.batch_size, 2 * args.steps)  # the sampler gives each rank its half
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return {"rank": trainer.global_rank, "world": trainer.world_size, "state": probe.state, "wire": probe.wire,
            "calls": getattr(probe, "calls", {}), "losses": module.losses}


# -------------------------------------------------------------------------------------------------- parent
def run_mode(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.devices}", "--master-port",
                   str(args.port), __file__, "--worker", mode, "--worker-out", tmp,
                   "--d-model", str(args.d_model), "--layers", str(args.layers), "--steps", str(args.steps),
                   "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--batch-size", str(args.batch_size),
                   "--accelerator", args.accelerator, "--devices", str(args.devices)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


def summarize(mode: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    state = ranks[0]["state"]
    numel = state["numel"]
    per_param = {k: state[k] / numel for k in ("weight", "grad", "optimizer")}
    total = sum(per_param.values())
    wire = ranks[0]["wire"]
    gather = wire.get("all_gather_single", 0) + wire.get("all_gather_into_tensor", 0)
    formula = FORMULAS[mode]
    world = ranks[0]["world"]
    return {
        "mode": mode, "world": world, "bytes_per_param": total, **{f"{k}_bytes_per_param": v for k, v in
                                                                     per_param.items()},
        "formula_bytes_per_param": formula["sharded"] / world + formula["replicated"],
        "weight_gather_bytes": gather, "wire_bytes": wire, "calls": ranks[0].get("calls", {}),
        "ranks_agree": all(r["state"] == state for r in ranks),
        "final_loss": ranks[0]["losses"][-1] if ranks[0]["losses"] else None,
    }


def extrapolate(rows: list[dict[str, Any]], sizes: tuple[int, ...] = (2, 8, 64, 1024)) -> list[dict[str, Any]]:
    out = []
    bf16 = next((r for r in rows if r["mode"] == "bf16-mixed"), None)
    for row in rows:
        formula = FORMULAS[row["mode"]]
        entry = {"mode": row["mode"]}
        for n in sizes:
            entry[f"N={n}"] = formula["sharded"] / n + formula["replicated"]
        if bf16 is not None:
            entry["gather_vs_bf16"] = formula["gather"] / FORMULAS["bf16-mixed"]["gather"]
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or cuda (NCCL; benchmarks/gpu_fp8.sh)")
    parser.add_argument("--devices", type=int, default=2, help="ranks (processes started by torchrun)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        result = worker(args.worker, args)
        Path(args.worker_out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return

    rows = []
    for mode in args.modes.split(","):
        if mode not in FORMULAS:
            raise SystemExit(f"unknown mode {mode!r}; choose from {list(FORMULAS)}")
        print(f"{mode}: {args.devices} rank(s) on {args.accelerator} ...", flush=True)
        rows.append(summarize(mode, run_mode(mode, args)))
    bf16 = next((r for r in rows if r["mode"] == "bf16-mixed"), None)
    for row in rows:
        row["gather_vs_bf16"] = row["weight_gather_bytes"] / bf16["weight_gather_bytes"] \
            if bf16 and bf16["weight_gather_bytes"] else None
    table = extrapolate(rows)
    where = "CPU, gloo" if args.accelerator == "cpu" else f"{args.accelerator}, NCCL"
    lines = [f"# FP8 on FSDP2: per-rank state and wire bytes ({args.devices} ranks, {where})", "",
             f"GPT-style LM d_model {args.d_model}, {args.layers} layers, block Linear weights only; step "
             f"{args.steps} of batch {args.batch_size} x {args.seq_len} tokens per rank; 1 torch thread per rank; "
             "seed 0.", "",
             "| mode | bytes/param per rank (measured) | formula at N=2 | weight | grad | optimizer | weight "
             "all-gather bytes/step | vs bf16-mixed | ranks agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['gather_vs_bf16']:.3f}" if r["gather_vs_bf16"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['bytes_per_param']:.3f} | {r['formula_bytes_per_param']:.3f} | "
                     f"{r['weight_bytes_per_param']:.3f} | {r['grad_bytes_per_param']:.3f} | "
                     f"{r['optimizer_bytes_per_param']:.3f} | {r['weight_gather_bytes']:,} | {ratio} | "
                     f"{r['ranks_agree']} |")
    lines += ["", "Formula (per element of the block Linear weights; sharded bytes / N + replicated bytes), "
              "extrapolated:", "", "| mode | what | N=2 | N=8 | N=64 | N=1024 | all-gather vs bf16 |",
              "|---|---|---|---|---|---|---|"]
    for entry in table:
        lines.append(f"| {entry['mode']} | {FORMULAS[entry['mode']]['parts']} | " + " | ".join(
            f"{entry[f'N={n}']:.3f}" for n in (2, 8, 64, 1024)) + f" | {entry.get('gather_vs_bf16', 0):.2f} |")
    lines += ["", "Bytes each rank gave to the collectives in the measured step:", ""]
    for r in rows:
        parts = ", ".join(f"{k} {v:,} B ({r['calls'].get(k, 0)} calls)" for k, v in sorted(r["wire_bytes"].items()))
        lines.append(f"- {r['mode']}: {parts}")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "fp8_sharded" if args.accelerator == "cpu" else f"fp8_sharded_{args.accelerator}"
    (args.out / f"{stem}.md").write_text(markdown)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "rows": rows, "extrapolated": table}, indent=2))


if __name__ == "__main__":
    main()
