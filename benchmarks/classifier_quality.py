"""Classifier quality: the shipped recipes at full length, and ``ImageClassifier``'s defaults against a 2-layer MLP.

Two measurements:

* ``recipes``: test accuracy of the shipped configs (``examples/configs/vit_{digits,mnist5k}.yaml``, full length),
  as the README states them. Writes ``benchmarks/results/classifier_quality.{json,md}``.
* ``defaults``: what a user gets with no tuning. On every data set the suite ships (``DigitsDataModule`` 8x8 and
  ``MNIST5kDataModule`` 28x28, each with its own defaults: batch 128, no augmentation), for several seeds, it
  trains for the same epochs on the same batches (the data order is reseeded after the model is built):

  - ``mlp``: the baseline, Flatten -> Linear(pixels, 256) -> ReLU -> Linear(256, classes), Adam at 1e-3;
  - ``default``: ``ImageClassifier(num_classes=10)``, nothing else given (the hybrid conv-stem ViT);
  - ``old default``: ``ImageClassifier(num_classes=10, stem="patch")``, exactly the constructor defaults before
    the conv stem existed (patch-4 ViT for 28x28 images, lr 1e-3); on 8x8 digits it cannot run, so
  - ``old default + image_size``: the same with ``image_size`` set to the data's, the least a user had to add.

  None of the shipped configs' tuned hyper-parameters are used. Reports mean, standard deviation and range over
  the seeds, and the gap to the MLP. Writes ``benchmarks/results/classifier_defaults.{json,md}``.

    .venv/bin/python benchmarks/classifier_quality.py                       # both
    .venv/bin/python benchmarks/classifier_quality.py defaults              # defaults vs MLP (seeds 0-2, 4 epochs)
    .venv/bin/python benchmarks/classifier_quality.py defaults --seeds 0 1 2 --epochs 4 --threads 1
    .venv/bin/python benchmarks/classifier_quality.py recipes vit_digits    # one recipe
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
RECIPES = {"vit_digits": 0.97, "vit_mnist5k": 0.95}  # recipe -> test-accuracy goal
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]
TARGET_GAP = 0.02  # the defaults must come within 2 points of the MLP (or beat it)


# -- recipes --------------------------------------------------------------------------------------------------------
def run_recipes(names: list[str]) -> list[dict[str, Any]]:
    from lightning_plugins.cli import fit_and_test

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
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "classifier_quality.md").write_text(text)
    (OUT / "classifier_quality.json").write_text(
        json.dumps({"environment": header, "runs": rows}, indent=2, default=str)
    )
    print(text)
    return rows


# -- defaults vs a 2-layer MLP ----------------------------------------------------------------------------------------
class MLPBaseline(pl.LightningModule):
    """The 2-layer MLP baseline: Flatten -> Linear(pixels, hidden) -> ReLU -> Linear(hidden, classes), Adam."""

    def __init__(self, pixels: int, num_classes: int, hidden: int = 256, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.lr = lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val/acc", (self(images).argmax(-1) == labels).float().mean())

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.log("test/acc", (self(images).argmax(-1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def datasets() -> dict[str, Callable[[], pl.LightningDataModule]]:
    from lightning_plugins.modules import DigitsDataModule, MNIST5kDataModule

    return {"digits 8x8": DigitsDataModule, "MNIST-5k 28x28": MNIST5kDataModule}


def models(shape: tuple[int, int, int], num_classes: int) -> dict[str, Optional[Callable[[], nn.Module]]]:
    from lightning_plugins.modules import ImageClassifier

    channels, height, width = shape
    makers: dict[str, Optional[Callable[[], nn.Module]]] = {
        "mlp (2-layer, 256 hidden, Adam 1e-3)": lambda: MLPBaseline(channels * height * width, num_classes),
        "default: ImageClassifier(num_classes)": lambda: ImageClassifier(num_classes=num_classes),
        "old default: ImageClassifier(num_classes, stem='patch')": (
            lambda: ImageClassifier(num_classes=num_classes, stem="patch")
        ),
    }
    if (height, width) != (28, 28):
        makers[f"old default + image_size={height}"] = (
            lambda: ImageClassifier(num_classes=num_classes, stem="patch", image_size=height)
        )
    return makers


def train_once(make_model: Callable[[], nn.Module], make_data: Callable[[], Any], seed: int, epochs: int) -> dict:
    """Build model and data under ``seed``, reseed (same batches for every model), fit ``epochs``, test."""
    pl.seed_everything(seed, verbose=False)
    data = make_data()
    try:
        model = make_model()
    except Exception as err:  # the old defaults cannot be built for some data
        return {"error": f"{type(err).__name__}: {err}"}
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    pl.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    try:
        trainer.fit(model, data)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, data, verbose=False)
    return {
        "acc": float(metrics["test/acc"]),
        "fit_seconds": seconds,
        "steps": int(trainer.global_step),
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_samples": len(data.test_set),
    }


def summarize(runs: list[dict]) -> dict[str, Any]:
    accs = [run["acc"] for run in runs if "acc" in run]
    if not accs:
        return {"error": runs[0].get("error")}
    return {
        "mean": statistics.mean(accs),
        "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs),
        "max": max(accs),
        "fit_seconds": statistics.mean(run["fit_seconds"] for run in runs if "acc" in run),
        "parameters": next(run["parameters"] for run in runs if "acc" in run),
        "steps": next(run["steps"] for run in runs if "acc" in run),
    }


def run_defaults(seeds: list[int], epochs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for data_name, make_data in datasets().items():
        probe = make_data()
        shape, num_classes = tuple(probe.image_shape), probe.num_classes
        results[data_name] = {}
        for model_name, make_model in models(shape, num_classes).items():
            runs = []
            for seed in seeds:
                run = train_once(make_model, make_data, seed, epochs)
                runs.append({"seed": seed, **run})
                shown = f"{100 * run['acc']:.2f} % in {run['fit_seconds']:.1f} s" if "acc" in run else run["error"]
                print(f"{data_name} | {model_name} | seed {seed}: {shown}", flush=True)
            results[data_name][model_name] = {"runs": runs, **summarize(runs)}
    return results


def defaults_table(results: dict[str, Any], seeds: list[int], epochs: int) -> list[str]:
    lines = [
        f"Test accuracy after {epochs} epochs, seeds {', '.join(map(str, seeds))}: mean ± sd (min-max); "
        f"gap = mean minus the MLP's mean; target: the default within {100 * TARGET_GAP:.0f} points of the MLP "
        "or better.",
        "",
        "| data | model | parameters | steps | fit time | test accuracy | gap to MLP |",
        "|---|---|---|---|---|---|---|",
    ]
    for data_name, rows in results.items():
        mlp = next(row for name, row in rows.items() if name.startswith("mlp"))
        for model_name, row in rows.items():
            if "mean" not in row:
                lines.append(f"| {data_name} | {model_name} | - | - | - | fails: {row['error'][:120]} | - |")
                continue
            gap = "" if row is mlp else f"{100 * (row['mean'] - mlp['mean']):+.2f}"
            lines.append(
                f"| {data_name} | {model_name} | {row['parameters']:,} | {row['steps']} | {row['fit_seconds']:.1f} s "
                f"| {100 * row['mean']:.2f} ± {100 * row['sd']:.2f} % ({100 * row['min']:.2f}-{100 * row['max']:.2f}) "
                f"| {gap} |"
            )
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="what",
        help="'recipes', 'defaults' or 'all' (the default), and/or recipe names (" + ", ".join(RECIPES) + ")",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the defaults comparison")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the defaults comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the defaults comparison")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ("all", "recipes", "defaults", *RECIPES)]
    if unknown:
        parser.error(f"unknown {unknown}; give 'recipes', 'defaults', 'all' or recipe names {list(RECIPES)}")
    args.recipes = [name for name in args.names if name in RECIPES]
    modes = {name for name in args.names if name in ("all", "recipes", "defaults")}
    args.what = "all" if "all" in modes or not (modes or args.recipes) else (
        "defaults" if modes == {"defaults"} and not args.recipes else
        "recipes" if "defaults" not in modes else "all")
    warnings.filterwarnings("ignore", message=".*(does not have many workers|Trying to infer|GPU available).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.what in ("all", "recipes"):
        run_recipes(args.recipes)
    if args.what in ("all", "defaults"):
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            results = run_defaults(args.seeds, args.epochs)
        finally:
            torch.set_num_threads(threads)
        header = f"torch {torch.__version__}, {args.threads} CPU thread{'s' if args.threads > 1 else ''}"
        table = defaults_table(results, args.seeds, args.epochs)
        text = "\n".join([f"# ImageClassifier defaults vs a 2-layer MLP ({header})", "", *table, ""])
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "classifier_defaults.md").write_text(text)
        (OUT / "classifier_defaults.json").write_text(json.dumps(
            {"environment": header, "epochs": args.epochs, "seeds": args.seeds, "target_gap": TARGET_GAP,
             "results": results}, indent=2,
        ))
        print(text)


if __name__ == "__main__":
    main()
