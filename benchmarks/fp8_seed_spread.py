"""FP8 vs ``32-true`` on the ViT recipe over several seeds: is the gap larger than seed-to-seed noise?

    .venv/bin/python benchmarks/fp8_seed_spread.py                     # seeds 0 1 2, 10 epochs, 1 thread
    .venv/bin/python benchmarks/fp8_seed_spread.py --seeds 0 1 2 3 4 --epochs 10

``fp8_accuracy.py`` compares one seed (the issue's "same seed and steps"); at 10 epochs its ViT held-out loss
moves by a few percent from one seed to the next in ``32-true`` alone, so a single-seed difference of that size says
little. This runs the same shortened recipe (``examples/configs/vit_mnist5k.yaml``, validation off, test on the 20 %
test split) for every seed under ``32-true``, ``fp8-msamp`` O1 and O2, and reports each run, the mean and standard
deviation per precision, and the mean relative gap to ``32-true`` (goal: within 2 % for the loss, 1 point for the
accuracy). The seed changes the model initialisation, data order and augmentation; the data split stays fixed.
Writes ``benchmarks/results/fp8_seed_spread.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _gpt import environment, markdown_table, quiet_lightning, write_results  # noqa: E402
from fp8_accuracy import MODES, run_vit, tail_mean  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_lightning()
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in args.seeds:
        for mode in MODES:
            r = run_vit(mode, args.epochs, seed)
            row = {"seed": seed, "train_loss": tail_mean(r["losses"]), "heldout_loss": r["heldout_loss"],
                   "accuracy": r["accuracy"], "fit_seconds": r["fit_seconds"], "skipped_steps": r["skipped_steps"]}
            runs[mode].append(row)
            print(f"seed {seed} {mode}: held-out loss {row['heldout_loss']:.4f}, accuracy {row['accuracy']:.4f}, "
                  f"{row['fit_seconds']:.0f} s", flush=True)

    def mean_std(mode: str, key: str) -> tuple[float, float]:
        values = [r[key] for r in runs[mode]]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    base_loss, base_acc = mean_std("32-true", "heldout_loss")[0], mean_std("32-true", "accuracy")[0]
    rows, summary = [], {}
    for mode in MODES:
        loss, loss_sd = mean_std(mode, "heldout_loss")
        train, train_sd = mean_std(mode, "train_loss")
        acc, acc_sd = mean_std(mode, "accuracy")
        gap_loss, gap_acc = loss / base_loss - 1, 100 * (acc - base_acc)
        met = None if mode == "32-true" else abs(gap_loss) <= 0.02 and abs(gap_acc) <= 1.0
        summary[mode] = {"heldout_loss_mean": loss, "heldout_loss_std": loss_sd, "train_loss_mean": train,
                         "train_loss_std": train_sd, "accuracy_mean": acc, "accuracy_std": acc_sd,
                         "heldout_gap": gap_loss, "accuracy_gap_points": gap_acc, "goal_met": met}
        per_seed = ", ".join(f"{r['heldout_loss']:.4f}" for r in runs[mode])
        rows.append([mode, per_seed, f"{loss:.4f} ± {loss_sd:.4f}", f"{100 * gap_loss:+.2f} %",
                     f"{100 * acc:.2f} ± {100 * acc_sd:.2f} %", f"{gap_acc:+.2f}", f"{train:.4f} ± {train_sd:.4f}",
                     "-" if met is None else ("met" if met else "MISSED")])
    table = markdown_table(["precision", "held-out loss per seed", "mean ± sd", "mean vs 32-true", "test accuracy",
                            "Δ mean (pt)", "train loss (last 10 %)", "goal (means)"], rows)
    md = (f"# FP8 vs 32-true over seeds {args.seeds}: ViT recipe, {args.epochs} epochs, {args.threads} thread(s)\n\n"
          f"{table}\n\nGoal on the means: held-out loss within 2 % of 32-true, accuracy within 1 point. "
          f"Total {(time.perf_counter() - start) / 60:.1f} min.\n")
    write_results("fp8_seed_spread", {"environment": environment(), "config": vars(args), "runs": runs,
                                      "summary": summary}, md)
    print(md)


if __name__ == "__main__":
    main()
