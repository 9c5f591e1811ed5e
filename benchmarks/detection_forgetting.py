"""Continual forgetting of object categories on FCOS-TE (FCOS ResNet-18 + 2 Transformer blocks over the FPN).

One detector is pretrained on the embedded MNIST scenes (128x128, 1-4 digits, 10 categories "0".."9"), then each
method forgets the same task sequence (default ``{0, 1}`` then ``{2, 3}``) from a copy of it:

* ``gslora``: the ``GSLoRA`` callback with the recipe of ``examples/configs/detect_forget.yaml``:
  ``DetectionObjective(mode="background", object_bound=6)`` (the detection loss on the forget images with their
  retained objects labelled and the forgotten ones as background, plus ``mean ReLU(6 + log p)`` over the places
  that could report a forgotten object), LoRA on the Transformer blocks' FFNs, group lasso, early stopping once
  AP_f <= 10 % of before, then a cool-down;
* ``gslora-paper``: the same callback with the paper's objective, ``DetectionObjective(mode="bounded")``:
  ``cls_r + box_r + beta (ReLU(BND - cls_f) + box_f)``;
* ``finetune``: full fine-tuning of every weight but the head with the ``gslora`` objective, fixed epochs.

All methods see the same data per task (``DetectionForgettingDataModule``: every training scene with a forgotten
object, forgotten boxes only (``forget_ratio`` of them), plus ``--replay-ratio`` of each retained category's
scenes, retained boxes only).
Reported on the **test** split (200 scenes), per task: AP_f / AP_r / AP_o (COCO AP@[.5:.95] in percent, mean over
the forgotten / retained / earlier-forgotten categories), the pretrained model's AP_f and AP_r ("before"), Drop,
H, the overall mAP, trainable parameters, epochs and wall time; for GS-LoRA also the merge check (test mAP with
the adapters in place, just before the callback merges them, against the merged model). Writes ``results.json``,
``results.md`` and ``detection_forgetting.png`` to ``--out`` and each GS-LoRA run's history to ``--out/<method>/``.

    python benchmarks/detection_forgetting.py --pretrained /tmp/detforget/pretrained.pt \
        --out benchmarks/results/detection_forgetting
    python benchmarks/detection_forgetting.py --quick --out /tmp/detforget-quick     # < 2 min smoke run

CPU only, ``--threads 1`` by default, seed 0 (pretraining, data subsets, LoRA init).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision

from lightning_plugins.callbacks import DetectionForgettingDataModule, GSLoRA, format_table
from lightning_plugins.callbacks.gslora.detection_data import detection_collate
from lightning_plugins.callbacks.gslora.metrics import drop_and_h
from lightning_plugins.callbacks.gslora.objectives import (
    DetectionObjective, StepContext, per_class_ap, split_average_precision,
)
from lightning_plugins.callbacks.gslora.tasks import view
from lightning_plugins.modules.detection.data import COCODetectionDataModule
from lightning_plugins.modules.detection.detector import ObjectDetector

METHODS = ("gslora", "finetune", "gslora-paper")
DEFAULT_METHODS = "gslora,finetune"
#: LoRA targets: the FFNs of the Transformer blocks (the model's ``gslora_target``), or FFNs + attention
TARGETS = {
    "ffn": None,
    "ffn+attn": r"(?P<block>(?:.*\.)?blocks\.\d+)\.(?:mlp\.fc[12]|attn\.(?:qkv|proj))",
}
MODEL = dict(num_classes=10, backend_kwargs={"transformer_blocks": 2})
QUICK_MODEL = dict(num_classes=10, backend_kwargs={"transformer_blocks": 1, "fpn_channels": 32})


class BenchDetector(ObjectDetector):
    """``ObjectDetector`` without its own validation metric: while forgetting, the GSLoRA callback measures AP per
    split from its batch-end hook (calling ``detect``), so the module's own ``val/map`` would run detection a
    second time per validation batch. Weights and everything else are the ``ObjectDetector``'s."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def on_validation_epoch_end(self) -> None:
        return None


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def model_kwargs(args: argparse.Namespace) -> dict:
    return dict(QUICK_MODEL if args.quick else MODEL)


def fresh_model(args: argparse.Namespace, state: Optional[dict]) -> BenchDetector:
    model = BenchDetector(**model_kwargs(args), lr=args.pretrain_lr, class_names=[str(c) for c in range(10)])
    if state is not None:
        model.load_state_dict(state)
    return model


def pretrain(args: argparse.Namespace, data: COCODetectionDataModule) -> tuple[dict, float]:
    """Train (or load ``--pretrained``) the detector; return its state dict and the pretraining wall time."""
    config = {"model": model_kwargs(args), "steps": args.pretrain_steps, "lr": args.pretrain_lr,
              "batch_size": args.pretrain_batch_size, "seed": args.seed}
    path = args.pretrained
    if path is not None and path.exists():
        stored = torch.load(path, weights_only=True)
        state = stored.get("state", stored)
        seconds = float(stored.get("seconds", float("nan")))
        print(f"pretrained weights loaded from {path} ({seconds:.0f} s to train)")
        return state, seconds
    pl.seed_everything(args.seed, verbose=False)
    model = ObjectDetector(**model_kwargs(args), lr=args.pretrain_lr)
    start = time.perf_counter()
    quiet_trainer(max_steps=args.pretrain_steps, limit_val_batches=0, default_root_dir=str(args.out)).fit(
        model, data.train_dataloader())
    seconds = time.perf_counter() - start
    state = model.state_dict()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": config, "state": state, "seconds": seconds}, path)
    print(f"pretrained in {seconds:.0f} s ({args.pretrain_steps} steps)")
    return state, seconds


@torch.no_grad()
def evaluate(model: ObjectDetector, dataset, task_view, batch_size: int = 16) -> dict:
    """AP_f / AP_r / AP_o and the overall mAP (percent) of ``model`` on ``dataset`` (module modes restored)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="faster_coco_eval")
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=detection_collate):
            predictions = model.detect(images)
            metric.update([{"boxes": p["boxes"].float(), "scores": p["scores"].float(), "labels": p["labels"].long()}
                           for p in predictions],
                          [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets])
        result = metric.compute()
    finally:
        for module, mode in modes:
            module.training = mode
    out = split_average_precision(result["map_per_class"], result["classes"], task_view)
    out.update(per_class_ap(result["map_per_class"], result["classes"]))
    out["map"] = 100.0 * float(result["map"])
    return out


class UnmergedProbe(Callback):
    """Placed before ``GSLoRA`` in the callbacks: measures the test mAP at ``on_train_end``, i.e. with the task's
    LoRA adapters still unmerged (GSLoRA merges them in its own ``on_train_end``, which runs after this one)."""

    def __init__(self, dataset, task_view_of) -> None:
        self.dataset, self.task_view_of = dataset, task_view_of
        self.results: list[dict] = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results.append(evaluate(pl_module, self.dataset, self.task_view_of()))


def forgetting_data(args: argparse.Namespace, data: COCODetectionDataModule) -> DetectionForgettingDataModule:
    return DetectionForgettingDataModule(data, replay_ratio=args.replay_ratio, forget_ratio=args.forget_ratio,
                                         batch_size=args.batch_size, eval_batch_size=16, seed=args.forget_seed,
                                         include_old=args.include_old)


def detection_objective(args: argparse.Namespace, paper: bool = False) -> DetectionObjective:
    """The recipe's objective, or (``paper``) GS-LoRA's bounded objective."""
    if paper:
        return DetectionObjective(bound=args.paper_bound, mode="bounded")
    return DetectionObjective(bound=args.paper_bound, mode=args.mode, object_bound=args.object_bound,
                              object_reduction=args.object_reduction, old_objects=args.old_objects,
                              old_weight=args.old_weight)


def run_gslora(args: argparse.Namespace, data, state, name: str) -> list[dict]:
    pl.seed_everything(args.forget_seed, verbose=False)
    model = fresh_model(args, state)
    fdata = forgetting_data(args, data)
    paper = name == "gslora-paper"
    beta, lr = (args.paper_beta, args.paper_lr) if paper else (args.beta, args.lr)
    callback = GSLoRA(args.tasks, objective=detection_objective(args, paper), target=TARGETS[args.target],
                      rank=args.rank, beta=beta, lr=lr, alpha=args.alpha, weight_decay=0.05,
                      early_stop=args.early_stop, stop_cooldown=args.cooldown, seed=args.forget_seed,
                      output_dir=str(args.out / name), plots=True)
    probe = UnmergedProbe(data.test_set, lambda: view(args.tasks, callback.task_index))
    rows = []
    for index in range(len(args.tasks)):
        logger = CSVLogger(str(args.out / name), name="train_log", version=index) if args.train_log else False
        trainer = quiet_trainer(max_epochs=args.task_epochs, callbacks=[probe, callback], gradient_clip_val=None,
                                default_root_dir=str(args.out), logger=logger, log_every_n_steps=10)
        start = time.perf_counter()
        trainer.fit(model, fdata)
        seconds = time.perf_counter() - start
        result = callback.task_results()[index]
        task_view = view(args.tasks, index)
        after = evaluate(model, data.test_set, task_view)
        unmerged = probe.results[index]
        rows.append({
            "task": index, "seconds": seconds, "epochs": result.get("epochs"),
            "stopped_by": result.get("stopped_by"),
            "trainable_params": result["trainable_params"], "total_params": result["total_params"],
            "zero_group_ratio": result.get("zero_group_ratio"),
            "val_ap_f": result.get("ap_f"), "val_ap_r": result.get("ap_r"),
            **after,
            "map_unmerged": unmerged["map"], "ap_f_unmerged": unmerged["ap_f"], "ap_r_unmerged": unmerged["ap_r"],
            "merge_diff": abs(unmerged["map"] - after["map"]),
        })
        print(f"  {name} task {index}: {format_row(rows[-1])}", flush=True)
    return rows


class FineTune(pl.LightningModule):
    """Full fine-tuning baseline: every weight but the head (BatchNorm statistics frozen, like GSLoRA's), with the
    same retention + forgetting objective as GS-LoRA (``DetectionObjective``, no group lasso)."""

    def __init__(self, model: ObjectDetector, objective: DetectionObjective, task_view, beta: float,
                 lr: float) -> None:
        super().__init__()
        self.model, self.objective, self.task_view, self.beta, self.lr = model, objective, task_view, beta, lr
        for name, param in self.model.named_parameters():
            param.requires_grad_(not is_head(name))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()

    def training_step(self, batch, batch_idx):
        context = StepContext(task_view=self.task_view, beta=self.beta, alpha=0.0, alpha_now=0.0)
        return self.objective.training_loss(self.model, batch, context).total

    def configure_optimizers(self):
        params = [p for n, p in self.model.named_parameters() if not is_head(n)]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.05)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def is_head(name: str) -> bool:
    return ".detector.head." in f".{name}"


def run_finetune(args: argparse.Namespace, data, state) -> list[dict]:
    pl.seed_everything(args.forget_seed, verbose=False)
    model = fresh_model(args, state)
    fdata = forgetting_data(args, data)
    fdata.setup("fit")
    rows = []
    for index in range(len(args.tasks)):
        task_view = view(args.tasks, index)
        fdata.set_forgetting_task(index, sorted(task_view.forgotten), sorted(task_view.old))
        module = FineTune(model, detection_objective(args), task_view, args.beta,
                          args.finetune_lr)
        start = time.perf_counter()
        quiet_trainer(max_epochs=args.finetune_epochs, gradient_clip_val=10.0, default_root_dir=str(args.out)).fit(
            module, train_dataloaders=fdata.train_dataloader())
        seconds = time.perf_counter() - start
        trainable = sum(p.numel() for n, p in model.named_parameters() if not is_head(n))
        for param in model.parameters():
            param.requires_grad_(True)
        rows.append({"task": index, "seconds": seconds, "epochs": args.finetune_epochs, "trainable_params": trainable,
                     "total_params": sum(p.numel() for p in model.parameters()),
                     **evaluate(model, data.test_set, task_view)})
        print(f"  finetune task {index}: {format_row(rows[-1])}", flush=True)
    return rows


def format_row(row: dict) -> str:
    keys = ("ap_f", "ap_r", "ap_o", "map", "map_unmerged", "epochs", "seconds")
    return ", ".join(f"{k} {row[k]:.2f}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
                     for k in keys if k in row)


def add_references(rows: list[dict], before: list[dict]) -> None:
    for row, reference in zip(rows, before):
        row["ap_f_before"], row["ap_r_before"] = reference["ap_f"], reference["ap_r"]
        row["drop"], row["h"] = drop_and_h(row["ap_f"], row["ap_r"], reference["ap_f"])
        row["trainable_ratio"] = row["trainable_params"] / row["total_params"]


def check_done_means(results: dict) -> list[str]:
    """The issue's acceptance figures, each as a PASS/FAIL line."""
    lines = []

    def verdict(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    def listed(values: list, fmt: str) -> str:
        return ", ".join("-" if v is None else format(v, fmt) for v in values)

    for method in ("gslora", "gslora-paper"):
        rows = results.get(method)
        if not rows:
            continue
        ratios = [r["ap_f"] / r["ap_f_before"] if r["ap_f_before"] else None for r in rows]
        verdict(all(x is not None and x <= 0.10 for x in ratios),
                f"{method}: AP_f <= 10 % of before after every task "
                f"({listed([r['ap_f'] for r in rows], '.1f')} vs {listed([r['ap_f_before'] for r in rows], '.1f')}; "
                f"ratio {listed(ratios, '.2f')})")
        gaps = [r["ap_r"] - r["ap_r_before"] for r in rows]
        verdict(all(g >= -3.0 for g in gaps),
                f"{method}: AP_r within 3 AP points (0.03) of before ({listed(gaps, '+.1f')})")
        diffs = [r["merge_diff"] for r in rows]
        verdict(all(d <= 0.1 for d in diffs),
                f"{method}: merged vs unmerged test mAP within 0.1 AP point (1e-3) ({listed(diffs, '.4f')})")
        verdict(all(r["trainable_ratio"] <= 0.03 for r in rows),
                f"{method}: trainable parameters {100 * rows[0]['trainable_ratio']:.2f} % of the model")
    verdict("finetune" in results, "full fine-tuning is in the table")
    return lines


def plot(results: dict, before: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, rows in results.items():
        tasks = [r["task"] for r in rows]
        for ax, key in zip(axes, ("ap_f", "ap_r", "h")):
            ax.plot(tasks, [r[key] if r[key] is not None else float("nan") for r in rows], "o-", label=method)
    tasks = list(range(len(before)))
    axes[0].plot(tasks, [b["ap_f"] for b in before], "k--", label="pretrained")
    axes[1].plot(tasks, [b["ap_r"] for b in before], "k--", label="pretrained")
    for ax, title in zip(axes, ("AP_f (lower is better)", "AP_r (higher is better)", "H-mean (higher is better)")):
        ax.set_title(title)
        ax.set_xlabel("task")
        ax.set_ylabel("AP % (test)")
        ax.set_xticks(tasks)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _old_weight(args: argparse.Namespace) -> str:
    """``old_weight`` as run (runs merged from before the flag existed used 1.0)."""
    return f", old_weight={getattr(args, 'old_weight', 1.0):g}"


def _forget_seed(args: argparse.Namespace) -> int:
    """``--forget-seed`` (runs merged from before the flag existed used ``--seed``)."""
    seed = getattr(args, "forget_seed", None)
    return args.seed if seed is None else seed


def how_run(args: argparse.Namespace) -> list[str]:
    target = "FFN (`blocks.N.mlp.fc1/fc2`)" if args.target == "ffn" else "FFN + attention (`qkv`, `proj`)"
    forget_seed = _forget_seed(args)
    own_seed = forget_seed != args.seed
    return [
        "## How this was run", "",
        f"`python benchmarks/detection_forgetting.py --out <dir> --threads {args.threads} --seed {args.seed}`"
        + (" `--quick`" if args.quick else "") + (f" `--forget-seed {forget_seed}`" if own_seed else ""),
        f"(tasks {args.tasks}; methods {args.methods}), on CPU with {args.threads} torch thread(s), seed {args.seed}"
        + (f" (forgetting: seed {forget_seed})" if own_seed else "") + ".",
        "",
        f"- model: FCOS-TE, `ObjectDetector({model_kwargs(args)})`, pretrained {args.pretrain_steps} steps "
        f"(batch {args.pretrain_batch_size}, lr {args.pretrain_lr:g}, seed {args.seed}).",
        f"- data: `DetectionForgettingDataModule(replay_ratio={args.replay_ratio:g}, "
        f"forget_ratio={args.forget_ratio:g}, batch_size={args.batch_size}, include_old={args.include_old})`: "
        "a step sees a retain batch and a forget batch; an epoch is one pass over the longer of the two sets.",
        f"- `gslora`: LoRA rank {args.rank} on {target}, AdamW lr {args.lr:g} (cosine), wd 0.05, beta {args.beta:g}, "
        f"`DetectionObjective(mode='{args.mode}', object_bound={args.object_bound:g}, "
        f"object_reduction='{getattr(args, 'object_reduction', 'places')}', "
        f"old_objects='{getattr(args, 'old_objects', 'pooled')}'"
        f"{_old_weight(args)})`, group lasso "
        f"{args.alpha:g}, early_stop={args.early_stop} (AP_f on validation <= 10 % of before, then "
        f"{args.cooldown} cool-down epochs), at most {args.task_epochs} epochs per task.",
        f"- `gslora-paper`: the same with `DetectionObjective(bound={args.paper_bound:g}, mode='bounded')`, beta "
        f"{args.paper_beta:g}, lr {args.paper_lr:g}.",
        f"- `finetune`: every weight but the head, AdamW lr {args.finetune_lr:g} (cosine), wd 0.05, the `gslora` "
        f"objective (beta {args.beta:g}), {args.finetune_epochs} epochs per task.",
        "- AP in percent (COCO AP@[.5:.95]) on the test scenes; before = the pretrained model's; "
        "`map` is the mean over all 10 categories; `map_unmerged`/`merge_diff`: test mAP with the task's adapters "
        "still unmerged vs merged.", "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/detection_forgetting"))
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="cached pretrained weights: loaded if the file exists, else written after pretraining")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 task of 1 category, few steps")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--tasks", default="0,1;2,3", help="categories per task: '0,1;2,3'")
    parser.add_argument("--pretrain-steps", type=int, default=700)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-batch-size", type=int, default=8)
    parser.add_argument("--task-epochs", type=int, default=4, help="GS-LoRA: most epochs per task")
    parser.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cooldown", type=int, default=2)
    parser.add_argument("--replay-ratio", type=float, default=1.0)
    parser.add_argument("--forget-ratio", type=float, default=1.0,
                        help="share of each forgotten category's training scenes used (1.0: all)")
    parser.add_argument("--include-old", action=argparse.BooleanOptionalAction, default=True,
                        help="DetectionForgettingDataModule(include_old=...): earlier tasks' categories stay in the "
                             "forget set")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target", choices=sorted(TARGETS), default="ffn")
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--mode", choices=("background", "bounded"), default="background",
                        help="gslora/finetune: DetectionObjective(mode=...)")
    parser.add_argument("--object-bound", type=float, default=6.0,
                        help="gslora/finetune: DetectionObjective(object_bound=...), the bound on the forgotten "
                             "objects' class log-probabilities")
    parser.add_argument("--object-reduction", choices=("places", "objects", "reported"), default="places",
                        help="gslora/finetune: DetectionObjective(object_reduction=...)")
    parser.add_argument("--old-objects", choices=("separate", "pooled", "background"), default="separate",
                        help="DetectionObjective(old_objects=...): the object term on earlier tasks' categories")
    parser.add_argument("--old-weight", type=float, default=0.5,
                        help="DetectionObjective(old_weight=...): weight of the old objects' term ('separate')")
    parser.add_argument("--train-log", action="store_true",
                        help="write each GS-LoRA run's per-step training values (CSV) to --out/<method>/train_log")
    parser.add_argument("--beta", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--paper-bound", type=float, default=1.5, help="gslora-paper: BND of ReLU(BND - cls_f)")
    parser.add_argument("--paper-beta", type=float, default=0.2)
    parser.add_argument("--paper-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forget-seed", type=int, default=None,
                        help="seed of the forgetting runs only (data subsets, order, LoRA init; default --seed): "
                             "varies them on the same scenes and pretrained weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="no training: write one report to --out from the results.json of these runs")
    args = parser.parse_args()
    if args.merge:
        return merge(args)
    if args.quick:
        args.pretrain_steps, args.pretrain_lr, args.tasks = 40, 2e-3, "0"
        args.task_epochs, args.finetune_epochs, args.early_stop = 1, 1, False
    args.tasks = [[int(c) for c in task.split(",")] for task in args.tasks.split(";")]
    if args.forget_seed is None:
        args.forget_seed = args.seed
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    counts = dict(num_train_scenes=200, num_val_scenes=32, num_test_scenes=32) if args.quick else {}
    data = COCODetectionDataModule(batch_size=args.pretrain_batch_size, seed=args.seed, **counts,
                                   **({"scenes_dir": str(args.out / "scenes")} if args.quick else {}))
    data.prepare_data()
    data.setup()
    total_start = time.perf_counter()
    state, pretrain_seconds = pretrain(args, data)
    pretrained = fresh_model(args, state)
    before = [evaluate(pretrained, data.test_set, view(args.tasks, t)) for t in range(len(args.tasks))]
    print("pretrained test AP per task (AP_f/AP_r): "
          + ", ".join(f"{b['ap_f']:.1f}/{b['ap_r']:.1f}" for b in before) + f"; mAP {before[0]['map']:.1f}")

    runners = {
        "gslora": lambda: run_gslora(args, data, state, "gslora"),
        "gslora-paper": lambda: run_gslora(args, data, state, "gslora-paper"),
        "finetune": lambda: run_finetune(args, data, state),
    }
    results: dict[str, list[dict]] = {}
    for method in args.methods.split(","):
        if method not in runners:
            raise SystemExit(f"unknown method {method!r}; choose from {sorted(runners)}")
        start = time.perf_counter()
        results[method] = runners[method]()
        add_references(results[method], before)
        print(f"{method}: {time.perf_counter() - start:.0f} s", flush=True)

    write_report(args, before, results, pretrain_seconds, time.perf_counter() - total_start)


def per_digit(row: dict) -> str:
    """``"0 12.3, 1 45.6, ..."`` from a row's ``ap_class/<id>`` entries (empty when it has none)."""
    keys = sorted((k for k in row if k.startswith("ap_class/")), key=lambda k: int(k.split("/")[1]))
    return ", ".join(f"{k.split('/')[1]} {row[k]:.1f}" for k in keys)


def write_report(args: argparse.Namespace, before: list[dict], results: dict, pretrain_seconds: float,
                 seconds: float, merged_from: Optional[list[str]] = None) -> None:
    """``results.md``, ``results.json`` and the plot into ``args.out``; the markdown is printed too."""
    columns = ["task", "ap_f", "ap_f_before", "ap_r", "ap_r_before", "ap_o", "drop", "h", "map", "map_unmerged",
               "merge_diff", "trainable_params", "trainable_ratio", "epochs", "seconds"]
    lines = [f"# Continual forgetting of object categories on FCOS-TE (tasks {args.tasks})", "",
             f"Pretraining: {pretrain_seconds:.0f} s; pretrained test mAP {before[0]['map']:.1f}; AP before "
             "forgetting per task (AP_f/AP_r): " + ", ".join(f"{b['ap_f']:.1f}/{b['ap_r']:.1f}" for b in before), ""]
    if per_digit(before[0]):
        lines += [f"Test AP per digit before forgetting: {per_digit(before[0])}", ""]
    for method, rows in results.items():
        present = [c for c in columns if any(c in r for r in rows)]
        lines += [f"## {method}", "", "```", format_table(rows, present), "```", ""]
        lines += [f"Test AP per digit after task {r['task']}: " + per_digit(r) for r in rows if per_digit(r)] + [""]
    checks = check_done_means(results)
    lines += ["## Done-means checks", "", *(f"- {c}" for c in checks), ""]
    lines += how_run(args)
    if merged_from:
        lines += [f"Merged with `--merge` from {len(merged_from)} runs of these settings, one per method "
                  f"({', '.join(merged_from)}), run side by side; wall time of the longest run: {seconds:.0f} s.", ""]
    else:
        lines += [f"Total wall time: {seconds:.0f} s.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "pretrain_seconds": pretrain_seconds, "seconds": seconds, "before": before, "results": results,
         "checks": checks}, indent=1))
    plot(results, before, args.out / "detection_forgetting.png")
    print("\n".join(lines))


def merge(args: argparse.Namespace) -> None:
    """One report from runs of the same settings that ran different methods (e.g. in parallel processes)."""
    runs = [json.loads((Path(folder) / "results.json").read_text()) for folder in args.merge]
    ignored = {"methods", "out", "merge", "train_log"}  # what ran and where it wrote, not how
    settings = [{k: v for k, v in run["args"].items() if k not in ignored} for run in runs]
    if any(s != settings[0] for s in settings[1:]):
        differing = sorted(k for k in settings[0] if any(s.get(k) != settings[0][k] for s in settings[1:]))
        raise SystemExit(f"--merge needs runs with the same settings; these differ: {differing}")
    results = {method: rows for run in runs for method, rows in run["results"].items()}
    merged = argparse.Namespace(**{**runs[0]["args"], "out": args.out, "methods": ",".join(results)})
    write_report(merged, runs[0]["before"], results, runs[0]["pretrain_seconds"],
                 max(run.get("seconds", 0.0) for run in runs),
                 merged_from=[f"`--methods {run['args']['methods']}`" for run in runs])


if __name__ == "__main__":
    main()
