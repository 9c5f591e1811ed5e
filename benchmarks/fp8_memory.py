"""Memory of FP8 training (MS-AMP O1/O2) vs ``32-true`` and ``bf16-mixed`` on a GPT-style causal LM.

    .venv/bin/python benchmarks/fp8_memory.py                 # d_model 512, 4 layers, 5 steps
    .venv/bin/python benchmarks/fp8_memory.py --steps 3 --d-model 256 --layers 2

Each precision trains in its own fresh subprocess (so one run's freed memory cannot hide in the next
one's RSS), through the real ``lightning.Trainer`` path, all from this one invocation. Measured:

* persistent training state in bytes per parameter after N steps, split into the converted FP8Linear
  weights, the rest of the model, and the whole model: parameter storage (= the master weights:
  fp32, or FP16 at O2), gradients (``.grad`` plus O2's FP8 side-channel gradients), Adam's
  ``exp_avg``/``exp_avg_sq``, per-tensor scales and step counters
  (:func:`lightning_plugins.fp8.optimizer_state_bytes`; its ``master`` entry is the parameter storage
  already counted, so it is not added twice);
* saved-for-backward bytes of one training forward, by ``saved_tensors_hooks``: per element of the
  Linear inputs (the activations a Linear keeps), and the whole model's total;
* process memory: RSS after N steps minus RSS before the model was built, and the peak (VmHWM) over
  the same span.

Writes ``benchmarks/results/fp8_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("32-true", "bf16-mixed", "fp8-msamp O1", "fp8-msamp O2")
_BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _trainer_kwargs(mode: str) -> dict[str, Any]:
    # restore_layers=False: the state is measured on the model as it trained (FP8 layers, FP16 masters); by default
    # the plugin swaps the layers back to plain fp32 nn.Linear when the run ends
    if mode in ("fp8-msamp O1", "fp8-msamp O2"):
        from lightning_plugins import MSAMPPrecision

        return {"plugins": [MSAMPPrecision(level=mode[-2:], restore_layers=False)]}
    return {"precision": mode}


def _state_bytes(params: list, optimizer: Any) -> dict[str, float]:
    from lightning_plugins.fp8 import training_state_bytes

    return training_state_bytes(params, optimizer)


def _saved_activations(model: Any, precision_plugin: Any, x: Any) -> dict[str, float]:
    """Bytes that autograd saves during one training forward, attributed to Linear layers by hooks."""
    import torch
    from torch import nn

    from lightning_plugins.fp8 import FP8Linear

    param_ptrs = {p.data_ptr() for p in model.parameters()}
    current: list[Any] = []  # stack of (name, record) for the Linear being run
    calls: list[dict[str, Any]] = []
    all_saved: dict[tuple[int, int], int] = {}

    def pre(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            rec = {"name": name, "in_numel": args[0].numel(), "w_numel": mod.weight.numel(), "saved": {}}
            assert rec["in_numel"] != rec["w_numel"], "ambiguous probe: input and weight have equal sizes"
            current.append(rec)
            calls.append(rec)

        return hook

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        current.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.numel())
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() not in param_ptrs:
            all_saved[key] = nbytes
        if current:
            current[-1]["saved"][key] = (t.numel(), t.element_size(), t.untyped_storage().data_ptr() in param_ptrs)
        return t

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, FP8Linear)) and not name.endswith("lm_head"):
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post))
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision_plugin.forward_context():
            out = model(x)
        del out
    finally:
        for h in handles:
            h.remove()
    in_numel = in_bytes = w_copy = other = 0
    for rec in calls:
        in_numel += rec["in_numel"]
        for numel, size, is_param in rec["saved"].values():
            if is_param:
                continue
            if numel == rec["in_numel"]:
                in_bytes += numel * size
            elif numel == rec["w_numel"]:
                w_copy += numel * size
            else:
                other += numel * size
    return {
        "linear_input_bytes_per_element": in_bytes / in_numel if in_numel else 0.0,
        "linear_weight_copies_MiB": w_copy / 2**20,
        "linear_other_saved_bytes": other,
        "model_saved_MiB": sum(all_saved.values()) / 2**20,
    }


def worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    import lightning_plugins  # noqa: F401  (registers precision="fp8-msamp")
    from _gpt import GPTConfig, GPTModule, quiet_lightning, random_token_batches
    from lightning_plugins.fp8 import FP8Linear, fp8_linear_weights

    quiet_lightning()
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                    n_heads=args.d_model // 64)
    batches = random_token_batches(cfg, args.batch_size, args.steps)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    pl.seed_everything(0, verbose=False)
    rss0 = _status_kib("VmRSS")
    peak_ok = _reset_peak_rss()
    module = GPTModule(cfg, lr=1e-3)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **_trainer_kwargs(mode),
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - start
    rss1 = _status_kib("VmRSS")
    hwm = _status_kib("VmHWM")
    optimizer = trainer.optimizers[0]

    named = dict(module.named_parameters())
    linear_names = [n for n in named if n.endswith(".weight") and n.split(".")[-2] in _BLOCK_LINEARS]
    linear = [named[n] for n in linear_names]
    if mode.startswith("fp8"):
        converted = {id(p) for p in fp8_linear_weights(module)}
        assert converted == {id(p) for p in linear}, "conversion differs from the expected block Linears"
        n_fp8 = sum(isinstance(m, FP8Linear) for m in module.modules())
    else:
        n_fp8 = 0
    ids = {id(p) for p in linear}
    rest = [p for p in named.values() if id(p) not in ids]
    # probe batch: 3 x (seq_len - 16) tokens, so that no Linear input has a weight's element count
    acts = _saved_activations(module, trainer.precision_plugin, batches[0][0][:3, : cfg.seq_len - 16])
    return {
        "mode": mode,
        "optimizer": type(optimizer).__name__,
        "fp8_layers": n_fp8,
        "fit_seconds": fit_s,
        "linear": _state_bytes(linear, optimizer),
        "rest": _state_bytes(rest, optimizer),
        "whole": _state_bytes(list(named.values()), optimizer),
        "activations": acts,
        "rss_delta_MiB": (rss1 - rss0) / 1024,
        "peak_rss_delta_MiB": (hwm - rss0) / 1024 if peak_ok else None,
        "skipped_steps": getattr(trainer.precision_plugin, "skipped_steps", 0),
        "final_loss": module.losses[-1],
    }


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.d_model % 64 or args.vocab % 16 or args.seq_len % 16:
        parser.error("--d-model must be a multiple of 64 (64-dim heads), --vocab and --seq-len multiples of 16")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    runs = []
    passthrough = sys.argv[1:]
    if "--modes" in passthrough:  # the worker gets one mode
        i = passthrough.index("--modes")
        j = i + 1
        while j < len(passthrough) and not passthrough[j].startswith("--"):
            j += 1
        passthrough = passthrough[:i] + passthrough[j:]
    for mode in args.modes:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--worker", mode], capture_output=True, text=True, env=env
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker {mode!r} failed (rc {proc.returncode})")
        runs.append(json.loads(lines[-1][len("RESULT ") :]))
        print(f"{mode}: done in {runs[-1]['fit_seconds']:.1f} s", flush=True)

    from _gpt import GPTConfig, environment, markdown_table, write_results

    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                    n_heads=args.d_model // 64)
    headers = ["precision", "part", "params", "weights/master", "grads", "exp_avg", "exp_avg_sq", "scales+step",
               "**total B/param**"]
    rows = []
    for run in runs:
        for part, label in (("linear", "converted Linear weights"), ("rest", "rest"), ("whole", "whole model")):
            s = run[part]
            rows.append([run["mode"], label, f"{s['numel']:,}", _fmt(s["weights_Bpp"]), _fmt(s["grads_Bpp"]),
                         _fmt(s["exp_avg_Bpp"]), _fmt(s["exp_avg_sq_Bpp"]), f"{s['scales_step_other_Bpp']:.4f}",
                         f"**{_fmt(s['total_Bpp'])}**"])
    state_table = markdown_table(headers, rows)
    base = next((r for r in runs if r["mode"] == "32-true"), runs[0])
    headers2 = ["precision", "optimizer", "FP8 layers", "Linear input saved (B/elem)",
                "Linear weight copies saved (MiB)",
                "all saved activations (MiB)", "state total (MiB)", "state vs 32-true", "RSS delta (MiB)",
                "peak RSS delta (MiB)", "fit time (s)", "loss after N"]
    rows2 = []
    for run in runs:
        a = run["activations"]
        rows2.append([
            run["mode"], run["optimizer"], run["fp8_layers"], _fmt(a["linear_input_bytes_per_element"]),
            _fmt(a["linear_weight_copies_MiB"]), _fmt(a["model_saved_MiB"]),
            _fmt(run["whole"]["total_bytes"] / 2**20),
            f"{run['whole']['total_bytes'] / base['whole']['total_bytes']:.2f}x",
            f"{run['rss_delta_MiB']:.0f}",
            "n/a" if run["peak_rss_delta_MiB"] is None else f"{run['peak_rss_delta_MiB']:.0f}",
            f"{run['fit_seconds']:.1f}", f"{run['final_loss']:.3f}",
        ])
    proc_table = markdown_table(headers2, rows2)
    o2 = next((r for r in runs if r["mode"] == "fp8-msamp O2"), None)
    goal = ""
    if o2 is not None:
        bpp = o2["linear"]["total_Bpp"]
        act = o2["activations"]["linear_input_bytes_per_element"]
        goal = (f"Goal O2 converted-Linear state <= 6.5 B/param: **{bpp:.2f}** ({'met' if bpp <= 6.5 else 'MISSED'}); "
                f"saved Linear activations 1 B/element: **{act:.2f}** ({'met' if act <= 1.0 + 1e-9 else 'MISSED'}).")
    env = environment()
    env["cpu_threads"] = args.threads
    md = "\n".join([
        f"# FP8 memory: GPT-style LM, {args.steps} steps ({env['torch']}, lightning {env['lightning']}, "
        f"{args.threads} CPU thread(s))", "",
        f"Model: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}, "
        f"seq {cfg.seq_len}, batch {args.batch_size}; block Linears {cfg.linear_params():,} params; untied lm_head "
        "(excluded from FP8 by default). Optimizer AdamW. Each precision in a fresh subprocess.", "",
        "## Persistent training state (bytes per parameter after N steps)", "", state_table, "",
        "## Activations and process memory", "", proc_table, "",
        "Linear input saved: bytes autograd keeps per element of each block Linear's input (saved_tensors_hooks, "
        "one training forward). RSS delta: after fit minus before the model was built (includes allocator caching, "
        "Lightning's objects and the autograd graph of the last step, so it is noisier than the byte counts).", "",
        goal, "",
    ])
    write_results("fp8_memory", {"environment": env, "config": vars(args), "model": cfg.__dict__, "runs": runs}, md)
    print(md)


if __name__ == "__main__":
    main()
