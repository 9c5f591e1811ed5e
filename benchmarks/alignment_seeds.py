"""The alignment pipeline's README figures over several seeds: mean and spread, with the settings they assume.

    .venv/bin/python benchmarks/alignment_seeds.py                          # seeds 0-4, 1 thread, AVX2 code path
    .venv/bin/python benchmarks/alignment_seeds.py --seeds 0 1 2 --checks   # no reproducibility checks

One run of ``examples/align_pipeline.py`` (SFT -> reward model -> rejection sampling -> DPO on the arithmetic task)
is a chaotic process: 100 epochs of training amplify a last-bit difference in one GEMM into a different greedy
accuracy. A single seed's table is therefore reproducible only with the same seed, thread count, CPU code path and
torch build, and says little about the method; this script runs the pipeline once per seed (a fresh process each,
``--seed`` drives the data, the initialisation, the data order and the sampling), and reports every figure of the
README table as mean ± standard deviation with its range over the seeds, the thread setting, and the seconds per run.

Then, on the first seed, the reproducibility checks (``--checks``, default all three):

- ``repeat``: the same settings again; every metric must be bitwise identical (the pipeline is deterministic);
- ``threads=2``: two torch threads instead of one (float reductions may be split differently);
- ``isa=native``: each library's fastest CPU code path (AVX-512 where the CPU has it) instead of the pinned AVX2 one,
  i.e. what an unpinned run on another machine would do.

Each check reports whether the metrics are bitwise identical and the largest difference in a table figure.
Writes ``benchmarks/results/alignment_seeds.{json,md}`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "examples" / "align_pipeline.py"
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "alignment_seeds"
CHECKS = {"repeat": [], "threads=2": ["--threads=2"], "isa=native": ["--isa=native"]}

# (label, path in report.json, decimals): the figures of the README table
FIGURES: list[tuple[str, tuple[str, ...], int]] = [
    ("SFT P(correct)", ("sft", "p_correct"), 3),
    ("SFT greedy accuracy", ("sft", "greedy"), 3),
    ("RM held-out pair accuracy", ("rm_heldout_pair_accuracy",), 3),
    *[(f"RS best-of-{k} accuracy", ("rs_best_of_k_correct", str(k)), 3) for k in (1, 2, 4, 8, 16)],
    ("DPO P(correct)", ("dpo", "p_correct"), 3),
    ("DPO greedy accuracy", ("dpo", "greedy"), 3),
]


def run_pipeline(seed: int, output: Path, threads: int, isa: str, extra: list[str] | None = None,
                 timeout: float = 3600) -> tuple[dict[str, Any], float]:
    """Run ``align_pipeline.py`` for one seed in a fresh process; returns its ``report.json`` and the wall seconds."""
    command = [sys.executable, str(PIPELINE), "--output", str(output), "--seed", str(seed), "--threads", str(threads),
               "--isa", isa, *(extra or [])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - start
    (output / "pipeline.log").parent.mkdir(parents=True, exist_ok=True)
    (output / "pipeline.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}); see {output / 'pipeline.log'}:\n"
                           + done.stderr[-3000:])
    return json.loads((output / "report.json").read_text()), wall


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The README table's figures of one report, by label."""
    values = {}
    for label, path, _ in FIGURES:
        node: Any = report
        for key in path:
            node = node[key]
        values[label] = float(node)
    return values


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """Every metric of a report, without what legitimately differs between two runs (times, paths, settings)."""
    drop = {"seconds", "numerics", "quick", "seed"}
    out = {k: v for k, v in report.items() if k not in drop}
    out["dpo_pairs"] = {k: v for k, v in out.get("dpo_pairs", {}).items() if k != "output"}
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Bitwise equality of all metrics and the largest absolute difference in a table figure."""
    a, b = figures(base), figures(other)
    diffs = {label: abs(a[label] - b[label]) for label in a}
    worst = max(diffs, key=diffs.get)
    return {"bitwise_identical": comparable(base) == comparable(other), "max_abs_figure_diff": diffs[worst],
            "max_diff_figure": worst if diffs[worst] > 0 else None, "figures": b}


def markdown(summary: dict[str, Any]) -> str:
    """The results as Markdown: one row per figure (per-seed values, mean ± sd, range), then the checks."""
    cfg, seeds = summary["config"], summary["config"]["seeds"]
    lines = [f"# Alignment pipeline over seeds {', '.join(map(str, seeds))}",
             "",
             f"`examples/align_pipeline.py`, {cfg['threads']} torch thread(s), CPU code path {cfg['isa']} "
             f"(ATen {summary['numerics'].get('aten_cpu_capability')}), torch {summary['numerics'].get('torch')}, "
             f"{summary['environment']['cpu_count']} CPU cores"
             f"{', --quick (a few epochs: the figures mean nothing)' if cfg['quick'] else ''}. Seconds per run: "
             f"{summary['seconds_per_run']['mean']:.0f} mean ({summary['seconds_per_run']['min']:.0f}-"
             f"{summary['seconds_per_run']['max']:.0f}) wall, of which the pipeline's stages "
             f"{summary['pipeline_seconds_per_run']['mean']:.0f} s (the rest is imports); load average "
             f"{summary['environment']['load_average_start']:.1f} at the start, "
             f"{summary['environment']['load_average_end']:.1f} at the end (other work on the machine slows the "
             "runs, not the figures).",
             "",
             "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | min-max |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    for label, _, decimals in FIGURES:
        s = summary["figures"][label]
        per_seed = " | ".join(f"{run['figures'][label]:.{decimals}f}" for run in summary["runs"])
        lines.append(f"| {label} | {per_seed} | {s['mean']:.{decimals}f} ± {s['sd']:.{decimals}f} | "
                     f"{s['min']:.{decimals}f}-{s['max']:.{decimals}f} |")
    if summary["checks"]:
        lines += ["", f"Reproducibility checks on seed {seeds[0]} (against the run above):", "",
                  "| check | metrics bitwise identical | largest table-figure difference | seconds |",
                  "|---|---|---|---|"]
        for name, check in summary["checks"].items():
            where = f" ({check['max_diff_figure']})" if check["max_diff_figure"] else ""
            lines.append(f"| {name} | {'yes' if check['bitwise_identical'] else 'no'} | "
                         f"{check['max_abs_figure_diff']:.3f}{where} | {check['seconds']:.0f} |")
    lines += ["", f"Total {summary['total_seconds'] / 60:.1f} min. Regenerate: `{summary['command']}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (the figures assume it)")
    parser.add_argument("--isa", choices=("avx2", "native"), default="avx2", help="CPU code path of every run")
    parser.add_argument("--checks", nargs="*", choices=sorted(CHECKS), default=list(CHECKS),
                        help="reproducibility checks on the first seed (none: --checks with no value)")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs" / NAME, help="pipeline outputs per run")
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true",
                        help="pass --quick to the pipeline (a few epochs: tests this script; the figures mean nothing)")
    args = parser.parse_args()
    start, load_start = time.perf_counter(), _load_average()
    quick = ["--quick"] if args.quick else []
    runs = []
    for seed in args.seeds:
        report, wall = run_pipeline(seed, args.work_dir / f"seed{seed}", args.threads, args.isa, quick)
        runs.append({"seed": seed, "wall_seconds": wall, "pipeline_seconds": report["seconds"]["total"],
                     "figures": figures(report), "report": report})
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1]["figures"].items())
              + f"; {wall:.0f} s", flush=True)
    checks = {}
    for name in args.checks:
        report, wall = run_pipeline(args.seeds[0], args.work_dir / f"seed{args.seeds[0]}-{name.replace('=', '-')}",
                                    args.threads, args.isa, quick + CHECKS[name])
        checks[name] = {**compare(runs[0]["report"], report), "seconds": wall, "numerics": report["numerics"]}
        print(f"check {name}: bitwise identical {checks[name]['bitwise_identical']}, largest figure difference "
              f"{checks[name]['max_abs_figure_diff']:.4f}; {wall:.0f} s", flush=True)
    argv = " ".join(sys.argv[1:])
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": f".venv/bin/python benchmarks/alignment_seeds.py{' ' + argv if argv else ''}",
        "numerics": runs[0]["report"]["numerics"],
        "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "machine": platform.machine(), "processor": _cpu_name(),
                        "load_average_start": load_start, "load_average_end": _load_average()},
        "figures": {label: spread([r["figures"][label] for r in runs]) for label, _, _ in FIGURES},
        "seconds_per_run": spread([r["wall_seconds"] for r in runs]),
        "pipeline_seconds_per_run": spread([r["pipeline_seconds"] for r in runs]),
        "runs": runs,
        "checks": checks,
        "total_seconds": time.perf_counter() - start,
    }
    text = markdown(summary)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{NAME}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (args.results_dir / f"{NAME}.md").write_text(text)
    print("\n" + text)
    print(f"written: {args.results_dir / NAME}.json, .md")


def _load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _cpu_name() -> str:
    """The CPU model name (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
