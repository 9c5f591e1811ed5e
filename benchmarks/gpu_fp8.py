"""FP8 on an H100/H200: GEMM throughput and a ~1B-parameter GPT training step, bf16 vs MS-AMP O1/O2.

    python benchmarks/gpu_fp8.py                  # on a CUDA GPU with compute capability >= 8.9
    python benchmarks/gpu_fp8.py --smoke          # tiny sizes on CPU: checks that the script runs
    python benchmarks/gpu_fp8.py --skip-compile   # eager only

Part 1, GEMM: ``M = N = K`` in ``--gemm-sizes`` (default 4096, 8192, 16384): bf16 ``torch.mm`` vs FP8
E4M3 x E4M3 -> bf16 through the project's ``"torch"`` backend (``torch._scaled_mm``, per-tensor
scales, fast accumulation as in the FP8Linear forward); operands are quantized once, outside the
timing; ``b`` is passed column-major (a transposed row-major weight, as FP8Linear does), so the
backend makes no copy. CUDA events, median of ``--gemm-iters`` after warm-up; TFLOP/s = 2MNK/t.

Part 2, training step: a GPT-style decoder (``benchmarks/_gpt.py``; default d_model 2048, 18 layers,
16 heads, vocab 32768, seq 2048, batch 4: 1.04 B parameters), AdamW, through Lightning Fabric with
``bf16-mixed`` or ``MSAMPFabricPrecision(level=O1|O2, backend="torch")``; eager, then with
``torch.compile`` applied per Transformer block (identical blocks share one compiled graph, which
keeps compile time inside the budget). Median step time over ``--steps`` timed steps after warm-up, and
``torch.cuda.max_memory_allocated`` (model, optimizer state, activations) per configuration. A
configuration that fails (e.g. a torch.compile error) is recorded with its error and the run goes
on; configurations that would start after ``--budget-s`` are recorded as skipped (whole script
targets < 5 minutes on an H100). Nothing is downloaded.

Goals (issue 3): FP8 GEMM >= 1.5x bf16 at 8192^3; training step >= 1.15x ``bf16-mixed`` with
torch.compile; peak memory <= 0.75x at O2.

Writes ``gpu_fp8.{json,md}`` (``gpu_fp8_smoke.*`` with ``--smoke``) to ``--out-dir``, else ``$OUT``
if set, else ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _gpt import (  # noqa: E402
    GPT,
    RESULTS,
    GPTConfig,
    environment,
    lm_loss,
    markdown_table,
    quiet_lightning,
    write_results,
)

TRAIN_MODES = ("bf16-mixed", "fp8-msamp O1", "fp8-msamp O2")


# ---------------------------------------------------------------------------------------------- device


def fp8_gpu_reason() -> str | None:
    """None if this machine has a CUDA GPU that runs FP8 GEMMs, else why not (for the message)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    if torch.version.hip is not None:
        return "this is a ROCm build; the benchmark targets CUDA (H100/H200)"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return f"GPU {torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]}; FP8 GEMMs need >= 8.9"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    return None


class Timer:
    """Wall time of a callable on ``device``: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark(self, fn: Callable[[], Any]) -> Callable[[], float]:
        """Run ``fn`` once; returns a function that gives its time later (no device sync in between)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return lambda: start.elapsed_time(end) / 1e3  # valid once the stream has passed `end`
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        return lambda: elapsed

    def __call__(self, fn: Callable[[], Any], iters: int) -> list[float]:
        times = []
        for _ in range(iters):
            span = self.mark(fn)
            self.sync()
            times.append(span())
        return times


# ---------------------------------------------------------------------------------------------- GEMM


def bench_gemm(sizes: list[int], device: torch.device, iters: int, warmup: int, fp8_backend: str) -> list[dict]:
    from lightning_plugins.fp8 import get_backend, quantize

    backend = get_backend(fp8_backend, device)
    timer = Timer(device)
    rows = []
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)  # (N, K), row-major like a weight
        a8, _ = quantize(a, "e4m3")
        w8, _ = quantize(w, "e4m3")
        b8 = w8.t()  # (K, N) column-major view: the layout _scaled_mm wants, no copy
        bt = w.t()
        bf16 = lambda: torch.mm(a, bt)  # noqa: E731
        fp8 = lambda: backend.mm(a8, b8, torch.bfloat16, use_fast_accum=True)  # noqa: E731
        # correctness guard: FP8 result close to bf16 (relative Frobenius error of E4M3 inputs ~ a few %)
        ref, out = bf16().float(), fp8().float()
        rel_err = float((out - ref).norm() / ref.norm())
        timer(bf16, warmup)
        t_bf16 = statistics.median(timer(bf16, iters))
        timer(fp8, warmup)
        t_fp8 = statistics.median(timer(fp8, iters))
        flop = 2.0 * n**3
        rows.append({"size": n, "bf16_s": t_bf16, "fp8_s": t_fp8, "bf16_tflops": flop / t_bf16 / 1e12,
                     "fp8_tflops": flop / t_fp8 / 1e12, "speedup": t_bf16 / t_fp8, "fp8_rel_err": rel_err})
        print(f"gemm {n}: bf16 {rows[-1]['bf16_tflops']:.1f} TFLOP/s, fp8 {rows[-1]['fp8_tflops']:.1f} TFLOP/s, "
              f"{rows[-1]['speedup']:.2f}x (rel err {rel_err:.3f})", flush=True)
        del a, w, a8, w8, b8, bt, ref, out
    return rows


# ---------------------------------------------------------------------------------------------- training


def _build(mode: str, cfg: GPTConfig, device: torch.device, compile_: bool, backend: str) -> tuple[Any, Any, Any]:
    from lightning.fabric import Fabric

    from lightning_plugins.precision import MSAMPFabricPrecision

    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    accel = "cuda" if device.type == "cuda" else "cpu"
    if mode == "bf16-mixed":
        fabric = Fabric(accelerator=accel, devices=1, precision="bf16-mixed")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    else:
        plugin = MSAMPFabricPrecision(level=mode.split()[-1], backend=backend)
        fabric = Fabric(accelerator=accel, devices=1, plugins=[plugin])
        model = plugin.convert_module(model)
        optimizer = plugin.convert_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01), model)
    if compile_:
        for block in model.blocks:  # same class and code: one compiled graph serves every block
            block.compile()
    model, optimizer = fabric.setup(model, optimizer)
    return fabric, model, optimizer


def bench_train(mode: str, compile_: bool, cfg: GPTConfig, batch: int, device: torch.device, warmup: int,
                steps: int, backend: str) -> dict[str, Any]:
    timer = Timer(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    counters = torch._dynamo.utils.counters
    counters.clear()
    fabric, model, optimizer = _build(mode, cfg, device, compile_, backend)
    g = torch.Generator(device=device).manual_seed(0)
    seq = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), device=device, generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    losses: list[float] = []
    optimizer_spans: list[Callable[[], float]] = []

    def step() -> None:
        loss = lm_loss(model(x), y)
        fabric.backward(loss)
        optimizer_spans.append(timer.mark(optimizer.step))  # its share of the step (O2: the FP8 Adam)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    t0 = time.perf_counter()
    step()  # first step: compilation, lazy optimizer state
    timer.sync()
    first_s = time.perf_counter() - t0
    timer(step, max(0, warmup - 1))
    times = timer(step, steps)
    out = {
        "mode": mode, "compile": compile_, "status": "ok", "first_step_s": first_s,
        "median_step_s": statistics.median(times), "step_s": times,
        "median_optimizer_step_s": statistics.median(span() for span in optimizer_spans[-steps:]),
        "tokens_per_s": batch * cfg.seq_len / statistics.median(times),
        "peak_mem_GiB": (torch.cuda.max_memory_allocated(device) - base_mem) / 2**30 if device.type == "cuda" else None,
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        "parameters": sum(p.numel() for p in model.parameters()),
        # torch.compile: FP8Linear traces into the block's graph, so both should stay 0 / 1
        "graph_breaks": sum(counters["graph_break"].values()) if compile_ else None,
        "compiled_graphs": counters["stats"]["unique_graphs"] if compile_ else None,
    }
    del fabric, model, optimizer, x, y, seq, losses
    if compile_:
        torch._dynamo.reset()  # drop compiled graphs (and what their guards hold) before the next configuration
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (or GPU): checks the script runs")
    parser.add_argument("--gemm-sizes", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--gemm-iters", type=int, default=20)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no configuration after this many s")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    reason = fp8_gpu_reason()
    if args.smoke:
        device = torch.device("cuda") if reason is None else torch.device("cpu")
        args.gemm_sizes, args.gemm_iters = [32, 64], 3
        args.d_model, args.layers, args.heads, args.vocab, args.seq_len, args.batch_size = 64, 2, 2, 256, 32, 2
        args.warmup, args.steps = 1, 2
        args.skip_compile = args.skip_compile or device.type == "cpu"  # compiling on CPU would take minutes
    elif reason is not None:
        print(f"gpu_fp8.py: cannot run the GPU benchmark: {reason}.\n"
              "It needs an NVIDIA GPU with FP8 tensor cores (H100/H200, compute capability >= 8.9) and a CUDA "
              "build of torch. Run `python benchmarks/gpu_fp8.py --smoke` to check the script on CPU, and "
              "benchmarks/fp8_overhead.py for the CPU emulation.", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    # the "torch" backend (torch._scaled_mm) on GPU; on CPU the GEMM part uses it too (torch >= 2.10 runs
    # _scaled_mm on CPU) and the training step uses the emulation, as "auto" would pick
    gemm_backend = "torch"
    train_backend = "torch" if device.type == "cuda" else "emulated"
    quiet_lightning()  # the conversion table is logged at every setup

    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                    n_heads=args.heads)
    env = environment()
    env["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {env['device']}, torch {env['torch']}", flush=True)
    gemm = bench_gemm(args.gemm_sizes, device, args.gemm_iters, 3, gemm_backend)

    train: list[dict[str, Any]] = []
    for compile_ in ([False] if args.skip_compile else [False, True]):
        for mode in TRAIN_MODES:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                train.append({"mode": mode, "compile": compile_, "status": f"skipped: {elapsed:.0f} s > budget"})
                continue
            try:
                train.append(bench_train(mode, compile_, cfg, args.batch_size, device, args.warmup, args.steps,
                                         train_backend))
            except Exception as err:  # a failing configuration is a result, not the end of the run
                msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                train.append({"mode": mode, "compile": compile_, "status": f"error: {msg}",
                              "traceback": traceback.format_exc()[-3000:]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            r = train[-1]
            if r["status"] == "ok":
                mem = "" if r["peak_mem_GiB"] is None else f", peak {r['peak_mem_GiB']:.1f} GiB"
                graphs = "" if not compile_ else f", {r['compiled_graphs']} graphs, {r['graph_breaks']} breaks"
                print(f"train {mode} compile={compile_}: {1e3 * r['median_step_s']:.1f} ms/step "
                      f"(optimizer {1e3 * r['median_optimizer_step_s']:.1f} ms){mem} "
                      f"(first step {r['first_step_s']:.1f} s{graphs})", flush=True)
            else:
                print(f"train {mode} compile={compile_}: {r['status']}", flush=True)

    # tables
    gemm_rows = [[r["size"], f"{r['bf16_tflops']:.1f}", f"{r['fp8_tflops']:.1f}", f"{r['speedup']:.2f}x",
                  f"{r['fp8_rel_err']:.3f}"] for r in gemm]
    gemm_table = markdown_table(["M=N=K", "bf16 TFLOP/s", "FP8 TFLOP/s", "FP8 speed-up", "FP8 rel. error"], gemm_rows)
    train_rows = []
    for r in train:
        if r["status"] != "ok":
            train_rows.append([r["mode"], "yes" if r["compile"] else "no", r["status"], "", "", "", "", "", "", ""])
            continue
        ref = next((b for b in train if b["mode"] == "bf16-mixed" and b["compile"] == r["compile"]
                    and b["status"] == "ok"), None)
        speed = f"{ref['median_step_s'] / r['median_step_s']:.2f}x" if ref else "n/a"
        mem_ratio = (f"{r['peak_mem_GiB'] / ref['peak_mem_GiB']:.2f}x"
                     if ref and r["peak_mem_GiB"] is not None else "n/a")
        train_rows.append([r["mode"], "yes" if r["compile"] else "no", "ok", f"{1e3 * r['median_step_s']:.1f}",
                           f"{1e3 * r['median_optimizer_step_s']:.1f}", speed,
                           "n/a" if r["peak_mem_GiB"] is None else f"{r['peak_mem_GiB']:.2f}", mem_ratio,
                           f"{r['loss_last']:.3f}", "" if r["graph_breaks"] is None else r["graph_breaks"]])
    train_table = markdown_table(["precision", "torch.compile", "status", "step (ms)", "optimizer (ms)",
                                  "speed vs bf16-mixed",
                                  "peak mem (GiB)", "mem vs bf16-mixed", "loss (last)", "graph breaks"], train_rows)
    n_params = next((r["parameters"] for r in train if r.get("status") == "ok"), None)
    total_s = time.perf_counter() - start
    md = "\n".join([
        f"# FP8 on {env['device']} (torch {env['torch']}{', SMOKE sizes' if args.smoke else ''}, "
        f"total {total_s:.0f} s)", "",
        "## GEMM (bf16 torch.mm vs FP8 E4M3 via backend 'torch' = torch._scaled_mm)", "", gemm_table, "",
        f"## Training step: GPT d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, seq "
        f"{cfg.seq_len}, batch {args.batch_size}" + (f", {n_params / 1e9:.2f} B params" if n_params else "")
        + f", FP8 backend '{train_backend}'", "", train_table, "",
        "Goals: FP8 GEMM >= 1.5x bf16 at 8192^3; step >= 1.15x bf16-mixed with torch.compile; peak memory "
        "<= 0.75x at O2.", "",
    ])
    out_dir = args.out_dir or (Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS)
    name = "gpu_fp8_smoke" if args.smoke else "gpu_fp8"
    write_results(name, {"environment": env, "config": {k: str(v) for k, v in vars(args).items()},
                         "total_seconds": total_s, "gemm": gemm, "train": train}, md, out_dir)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
