"""GSLoRA reports which layers it adapts: a log line, ``adapted_layers.csv`` next to the history, and a summary
for the Lightning loggers (``log_hyperparams``)."""

from __future__ import annotations

import csv
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

from lightning_plugins.callbacks import GSLoRA
from lightning_plugins.fp8 import convert_to_fp8
from lightning_plugins.modules import ImageClassifier

FFN = [f"backbone.blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]


class MemoryLogger(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.hparams: dict = {}
        self.metrics: list = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.update(dict(params))

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def images(n=32):
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 28, 28, generator=generator), torch.arange(n) % 10),
                      batch_size=16)


@pytest.mark.parametrize("fp8", [False, True], ids=["linear", "fp8-linear"])
def test_setup_logs_and_writes_the_adapted_layers(quiet, tmp_path, fp8):
    model = ImageClassifier(depth=2, embed_dim=32, patch_size=7, image_size=28, num_heads=2)
    if fp8:
        convert_to_fp8(model, log_table=False)
    logger = MemoryLogger()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level = Keep(level=logging.INFO), rank_zero.level
    rank_zero.addHandler(handler)
    rank_zero.setLevel(logging.INFO)
    try:
        callback = GSLoRA([[0, 1], [2]], grouping="block", plots=False, output_dir=str(tmp_path / "report"))
        trainer = pl.Trainer(max_epochs=1, callbacks=[callback], **quiet(logger=logger))
        trainer.fit(model, train_dataloaders=images(), val_dataloaders=images())
    finally:
        rank_zero.removeHandler(handler)
        rank_zero.setLevel(level)

    kind = "FP8Linear" if fp8 else "Linear"
    (line,) = [m for m in records if "LoRA rank 8 on" in m]
    assert f"GSLoRA task 0: LoRA rank 8 on 4 {kind} layers in 2 groups" in line
    assert "backbone.blocks.0: backbone.blocks.0.mlp.fc1, backbone.blocks.0.mlp.fc2" in line

    with open(tmp_path / "report" / "adapted_layers.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == FFN
    assert [r["group"] for r in rows] == ["backbone.blocks.0"] * 2 + ["backbone.blocks.1"] * 2
    assert {r["type"] for r in rows} == {kind} and {r["task"] for r in rows} == {"0"}
    assert [(int(r["in_features"]), int(r["out_features"])) for r in rows] == [(32, 64), (64, 32)] * 2
    lora = sum(int(r["lora_params"]) for r in rows)
    assert lora == 2 * (8 * 32 + 64 * 8 + 8 * 64 + 32 * 8) == 3072

    assert logger.hparams["gslora/adapted_layers"] == 4 and logger.hparams["gslora/groups"] == 2
    assert logger.hparams["gslora/lora_params"] == logger.hparams["gslora/trainable_params"] == lora
    total = sum(p.numel() for p in model.parameters())
    assert logger.hparams["gslora/trainable_ratio"] == pytest.approx(lora / total)
