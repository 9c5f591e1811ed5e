"""Forgetting metrics (paper definitions), group statistics, reports."""

import json

import pytest
import torch
from torch import nn

from lightning_plugins.callbacks.gslora.lora import LoRALinear
from lightning_plugins.callbacks.gslora.metrics import (
    LabelledCorrect,
    drop_and_h,
    group_norms,
    parameter_counts,
    split_accuracies,
    update_norms,
    zero_group_ratio,
)
from lightning_plugins.callbacks.gslora.report import format_table, plot_history, write_history
from lightning_plugins.callbacks.gslora.tasks import TaskView


def test_h_mean_matches_the_paper_tables():
    # Tab. 2 (100-5, GS-LoRA): Acc_f before 70.88, after 0, Acc_r 71.16 -> H 71.02
    assert drop_and_h(0.0, 71.16, 70.88)[1] == pytest.approx(71.02, abs=0.01)
    # Tab. 3 (100-20): Acc_f before 74.65, after 0, Acc_r 74.16 -> H 74.40
    drop, h = drop_and_h(0.0, 74.16, 74.65)
    assert drop == pytest.approx(74.65) and h == pytest.approx(74.40, abs=0.01)
    assert drop_and_h(None, 50.0, 60.0) == (None, None)
    assert drop_and_h(80.0, 50.0, 60.0) == (-20.0, 0.0)  # forgotten accuracy went up: no drop, H = 0


def test_split_accuracies():
    metric = LabelledCorrect()
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4])
    predicted = torch.tensor([0, 1, 1, 2, 0, 3, 0])
    metric.update(nn.functional.one_hot(predicted, 5).float(), labels)
    view = TaskView(1, forgotten=frozenset({0}), old=frozenset({1}), missing=frozenset({4}))
    acc = split_accuracies(*metric.compute(), view)
    assert acc["acc_f"] == 50.0 and acc["n_forgotten"] == 2
    assert acc["acc_o"] == 100.0
    assert acc["acc_r"] == pytest.approx(200 / 3) and acc["n_retained"] == 3
    assert acc["acc_m"] == 0.0
    empty = split_accuracies(torch.tensor([2]), torch.tensor([1]), TaskView(0, frozenset({0}), frozenset()))
    assert empty["acc_f"] is None and empty["acc_o"] is None and empty["acc_m"] is None


def test_group_statistics():
    layer = LoRALinear(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        layer.base_layer.weight.fill_(1.0)  # ||W|| = 4
        layer.lora_A.fill_(1.0)  # ||A|| = sqrt(32)
        layer.lora_B.zero_()
    norms = group_norms({"g": [layer.lora_A, layer.lora_B]})
    assert norms["g"] == pytest.approx(32 ** 0.5)
    updates = update_norms({"g": [layer, layer]})
    assert updates["g"] == (0.0, pytest.approx(4.0))
    assert zero_group_ratio(updates, 1e-3) == 1.0
    with torch.no_grad():
        layer.lora_B.fill_(1.0)  # B A = 8 everywhere, scaled by 1/8 -> 1 everywhere: ||.|| = 4
    updates = update_norms({"g": [layer], "h": [LoRALinear(nn.Linear(4, 4))]})
    assert updates["g"][0] == pytest.approx(4.0)
    assert zero_group_ratio(updates, 1e-3) == 0.5
    trainable, total = parameter_counts(layer)
    assert (trainable, total) == (16 + 32 + 32, 16 + 32 + 32)


def test_report_files_and_table(tmp_path):
    history = [
        {"task": 0, "kind": "before", "acc_f": 90.0, "acc_r": 80.0},
        {"task": 0, "kind": "val", "acc_f": 10.0, "acc_r": 79.0, "h": 79.0},
        {"task": 0, "kind": "task", "forgotten": [0, 1], "acc_f": 0.0, "acc_r": 79.5, "acc_f_before": 90.0,
         "acc_r_before": 80.0, "acc_o": None, "h": 84.4, "group_norm/blocks.0": 2.0, "update_norm/blocks.0": 0.1,
         "seconds": 1.5},
    ]
    csv_path, json_path = write_history(history, str(tmp_path))
    assert json.loads(open(json_path).read()) == history
    lines = open(csv_path).read().splitlines()
    assert lines[0].startswith("task,kind,acc_f,acc_r") and "0 1" in lines[3]
    pytest.importorskip("matplotlib")
    paths = plot_history(history, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["accuracy_per_task.png", "group_norms.png",
                                                          "validation_curves.png"]
    table = format_table([history[2]])
    assert "acc_f_before" in table and "0,1" in table and "84.40" in table
