"""Object detection on the embedded MNIST scenes, every backend side by side in one run: step times, and mAP as
training goes on.

Models (all random init, no download; 128x128 scenes, batch 8, AdamW, warm-up 30 steps then cosine over the run):

* ``fcos``: torchvision FCOS, ResNet-18, 128-channel FPN P3-P6 (the default ``ObjectDetector``);
* ``fcos_te``: the same with 2 Transformer blocks over the pyramid (the detector GSLoRA can adapt);
* ``retinanet``: torchvision RetinaNet, same backbone;
* ``deformable_detr``: transformers Deformable DETR (d 128, 2+2 layers, 30 queries);
* ``mmdet_deformable_detr``: mmdet's Deformable DETR, same size (mmcv-lite + the suite's pure-PyTorch ops).

Part 1 measures the CPU seconds of one training step (loss + backward + AdamW) and of one prediction of a batch for
every model on the same batch. Part 2 trains each model for ``--steps`` steps (DETR-family: ``--detr-steps``: they
need GPU-scale training to name classes; on a CPU the point is that their loss falls) and evaluates mAP, mAP50 and
mAR100 on the 200 validation scenes at a few points and on the 200 test scenes at the end.

    .venv/bin/python benchmarks/detection.py                      # ~25 min at 1 thread
    .venv/bin/python benchmarks/detection.py --models fcos --steps 700

Writes ``benchmarks/results/detection.{json,md}`` and ``detection.png`` (mAP vs steps) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_plugins.modules.detection import COCODetectionDataModule, ObjectDetector

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
DETR_SIZE = {"d_model": 128, "encoder_layers": 2, "decoder_layers": 2, "ffn_dim": 512, "num_queries": 30}
MMDET_SIZE = {"model_overrides": {
    "backbone": {"depth": 18, "base_channels": 32},
    "encoder": {"num_layers": 2, "layer_cfg": {"ffn_cfg": {"feedforward_channels": 512}}},
    "decoder": {"num_layers": 2, "layer_cfg": {"ffn_cfg": {"feedforward_channels": 512}}},
    "num_queries": 30,
}}
MODELS: dict[str, dict[str, Any]] = {
    "fcos": dict(backend="torchvision", model="fcos"),
    "fcos_te": dict(backend="torchvision", model="fcos", backend_kwargs={"transformer_blocks": 2}),
    "retinanet": dict(backend="torchvision", model="retinanet"),
    "deformable_detr": dict(backend="transformers", model="deformable_detr", backend_kwargs=DETR_SIZE, lr=2e-4,
                            gradient_clip_norm=0.1),
    "mmdet_deformable_detr": dict(backend="mmdet", model="deformable-detr_r50_16xb2-50e_coco",
                                  backend_kwargs=MMDET_SIZE, lr=2e-4, gradient_clip_norm=0.1),
}
DETR_FAMILY = ("deformable_detr", "mmdet_deformable_detr")


def build(name: str, num_classes: int) -> ObjectDetector:
    return ObjectDetector(num_classes=num_classes, **MODELS[name])


def step_times(names: list[str], data: COCODetectionDataModule, repeats: int) -> dict[str, dict[str, float]]:
    """CPU seconds of a training step and of a prediction, same batch of 8 for every model (median of repeats)."""
    images, targets = next(iter(data.train_dataloader()))
    rows = {}
    for name in names:
        pl.seed_everything(0, verbose=False)
        model = build(name, data.num_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train, predict = [], []
        for index in range(repeats + 1):
            model.train()
            start = time.process_time()
            loss = sum(model.losses(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train.append(time.process_time() - start)
            model.eval()
            start = time.process_time()
            with torch.no_grad():
                model.detect(images)
            predict.append(time.process_time() - start)
        rows[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                      "train_step_cpu_s": statistics.median(train[1:]), "predict_cpu_s": statistics.median(predict[1:])}
        print(f"  {name}: {rows[name]['train_step_cpu_s']:.2f} CPU-s/step, predict {rows[name]['predict_cpu_s']:.2f}",
              flush=True)
    return rows


class MapHistory(pl.Callback):
    """Records ``val/map`` etc. after every validation run, with the step it was measured at."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.points.append({"step": trainer.global_step,
                            **{key: float(metrics[f"val/{key}"]) for key in ("map", "map_50", "mar_100")}})


def train(name: str, data: COCODetectionDataModule, steps: int, evaluations: int, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = build(name, data.num_classes)
    history = MapHistory()
    losses: list[float] = []

    class LossLog(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=max(1, steps // evaluations),
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[history, LossLog()])
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=data)
    fit = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    quarter = max(1, len(losses) // 4)
    return {"steps": steps, **fit, "history": history.points, "loss_first_quarter": statistics.mean(losses[:quarter]),
            "loss_last_quarter": statistics.mean(losses[-quarter:]),
            **{key: test[f"test/{key}"] for key in ("map", "map_50", "map_75", "mar_100")}}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, run in results["training"].items():
        points = run["history"]
        axis.plot([p["step"] for p in points], [p["map"] for p in points], marker="o", label=name)
    axis.set_xlabel("training step (batch 8)")
    axis.set_ylabel("val mAP@[.5:.95]")
    axis.set_title("Embedded MNIST scenes, CPU, 1 thread")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=700, help="training steps of the CNN detectors")
    parser.add_argument("--detr-steps", type=int, default=200, help="training steps of the DETR-family detectors")
    parser.add_argument("--evaluations", type=int, default=4, help="validation runs during training")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model in part 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "mmengine"):
        logging.getLogger(name).setLevel(logging.ERROR)
    data = COCODetectionDataModule(batch_size=8, seed=0)
    data.prepare_data()
    data.setup("fit")
    print(f"1/2: step times (CPU seconds, batch 8, {args.threads} thread(s))", flush=True)
    times = step_times(args.models, data, args.repeats)
    print("2/2: training", flush=True)
    training = {}
    for name in args.models:
        steps = args.detr_steps if name in DETR_FAMILY else args.steps
        print(f"  {name}: {steps} steps ...", flush=True)
        training[name] = train(name, data, steps, args.evaluations, args.seed)
        run = training[name]
        print(f"    test mAP {run['map']:.3f}, mAP50 {run['map_50']:.3f}, loss {run['loss_first_quarter']:.2f} -> "
              f"{run['loss_last_quarter']:.2f}, {run['cpu_s']:.0f} CPU-s", flush=True)
    results = {"seed": args.seed, "threads": args.threads, "times": times, "training": training}
    lines = [
        f"Embedded MNIST scenes (2,000 train / 200 val / 200 test, 128x128), batch 8, seed {args.seed}, "
        f"{args.threads} torch thread(s), CPU; random init, no downloads.", "",
        "| model | parameters | train step (CPU-s) | predict batch (CPU-s) | steps | training CPU-s "
        "| loss first -> last quarter | test mAP | mAP50 | mAP75 | mAR100 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        time_row, run = times[name], training[name]
        lines.append(
            f"| {name} | {time_row['parameters']:,} | {time_row['train_step_cpu_s']:.2f} | "
            f"{time_row['predict_cpu_s']:.2f} | {run['steps']} | {run['cpu_s']:.0f} | {run['loss_first_quarter']:.2f} "
            f"-> {run['loss_last_quarter']:.2f} | {run['map']:.3f} | {run['map_50']:.3f} | {run['map_75']:.3f} | "
            f"{run['mar_100']:.3f} |")
    lines += ["", "val mAP during training (step: mAP):", ""]
    for name in args.models:
        points = ", ".join(f"{p['step']}: {p['map']:.3f}" for p in training[name]["history"])
        lines.append(f"- {name}: {points}")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection.md").write_text(text + "\n")
    (args.out / "detection.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "detection.png")


if __name__ == "__main__":
    main()
