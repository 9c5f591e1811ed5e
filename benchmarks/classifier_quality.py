"""Test accuracy of the shipped classifier recipes (full length), as the README and issue #2 state them.

    .venv/bin/python benchmarks/classifier_quality.py            # both recipes
    .venv/bin/python benchmarks/classifier_quality.py vit_digits  # one recipe

Writes ``benchmarks/results/classifier_quality.{json,md}`` and prints the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lightning_plugins.cli import fit_and_test

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"vit_digits": 0.97, "vit_mnist5k": 0.95}  # recipe -> test-accuracy goal
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]


def main(names: list[str]) -> None:
    rows = []
    for name in names or list(RECIPES):
        figures = fit_and_test(REPO / "examples" / "configs" / f"{name}.yaml", QUIET)
        rows.append({"recipe": name, "goal": RECIPES[name], **{k: v for k, v in figures.items() if "class" not in k}})
        print(f"{name}: test acc {figures['test/acc']:.4f} in {figures['fit_seconds']:.0f} s", flush=True)
    table = ["| recipe | parameters | epochs | fit time | test accuracy | goal |", "|---|---|---|---|---|---|"]
    for row in rows:
        table.append(
            f"| {row['recipe']} | {row['parameters']:,} | {row['epochs']} | {row['fit_seconds']:.0f} s "
            f"| {100 * row['test/acc']:.2f} % of {row['test_samples']} | >= {100 * row['goal']:.0f} % |"
        )
    header = f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    text = "\n".join([f"# Classifier recipes ({header})", "", *table, ""])
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "classifier_quality.md").write_text(text)
    (out / "classifier_quality.json").write_text(json.dumps({"environment": header, "runs": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
