"""History of a forgetting sequence: CSV/JSON files, PNG plots and a printable per-task table."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Optional, Sequence

TABLE_COLUMNS = ("task", "forgotten", "acc_f_before", "acc_f", "acc_r_before", "acc_r", "acc_o", "acc_m",
                 "ap_f_before", "ap_f", "ap_r_before", "ap_r", "ap_o", "h",
                 "zero_group_ratio", "trainable_ratio", "epochs", "stopped_by", "seconds")

ADAPTED_LAYERS_FILE = "adapted_layers.csv"


def write_adapted_layers(rows: Sequence[dict[str, Any]], directory: str) -> str:
    """Write ``adapted_layers.csv`` (one row per LoRA-adapted layer: task, layer, group, type, sizes, rank, LoRA
    parameters); return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ADAPTED_LAYERS_FILE)
    columns = list(rows[0]) if rows else ["task", "layer", "group"]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def write_history(history: Sequence[dict[str, Any]], directory: str) -> tuple[str, str]:
    """Write ``history.json`` (rows as they are) and ``history.csv`` (union of all columns); return both paths."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, "history.json")
    csv_path = os.path.join(directory, "history.csv")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(list(history), handle, indent=1)
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    with open(csv_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return csv_path, json_path


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "" if value is None else value


def plot_history(history: Sequence[dict[str, Any]], directory: str) -> list[str]:
    """Write ``accuracy_per_task.png``, ``group_norms.png`` and ``validation_curves.png``; return the paths.

    Raises ``ImportError`` when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    tasks = [row for row in history if row["kind"] == "task"]
    paths = []
    if tasks:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [row["task"] for row in tasks]
        for key, label, style in (("acc_f", "Acc_f", "o-"), ("acc_r", "Acc_r", "s-"), ("acc_o", "Acc_o", "^-"),
                                  ("acc_m", "Acc_m", "d-"), ("acc_f_before", "Acc_f before", "o:"),
                                  ("acc_r_before", "Acc_r before", "s:"), ("ap_f", "AP_f", "o-"),
                                  ("ap_r", "AP_r", "s-"), ("ap_o", "AP_o", "^-"), ("ap_f_before", "AP_f before", "o:"),
                                  ("ap_r_before", "AP_r before", "s:")):
            ys = [row.get(key) for row in tasks]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=label)
        ax.set_xlabel("task")
        ax.set_ylabel("AP (%)" if any(row.get("ap_f") is not None for row in tasks) else "top-1 accuracy (%)")
        ax.set_xticks(xs)
        ax.set_ylim(-2, 102)
        ax.set_title("Accuracy after each forgetting task")
        ax.legend(fontsize=8)
        paths.append(_save(fig, directory, "accuracy_per_task.png"))

        groups = [k for k in tasks[-1] if k.startswith("group_norm/")]
        if groups:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
            width = 0.8 / len(tasks)
            for i, row in enumerate(tasks):
                positions = [g + i * width for g in range(len(groups))]
                ax1.bar(positions, [row.get(k) or 0.0 for k in groups], width, label=f"task {row['task']}")
                ax2.bar(positions, [row.get(k.replace("group_norm/", "update_norm/")) or 0.0 for k in groups], width,
                        label=f"task {row['task']}")
            names = [k.split("/", 1)[1] for k in groups]
            for ax, title in ((ax1, "group-lasso norm ||theta_g||"), (ax2, "merged update ||BA/r||/||W||")):
                ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
                ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
                ax.set_title(title)
                ax.legend(fontsize=7)
            ax2.set_yscale("log")
            paths.append(_save(fig, directory, "group_norms.png"))

    curves = [row for row in history if row["kind"] == "val"]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = list(range(len(curves)))
        for key, label in (("acc_f", "Acc_f"), ("acc_r", "Acc_r"), ("acc_o", "Acc_o"), ("ap_f", "AP_f"),
                           ("ap_r", "AP_r"), ("ap_o", "AP_o"), ("h", "H")):
            ys = [row.get(key) for row in curves]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], label=label)
        for i in range(1, len(curves)):
            if curves[i]["task"] != curves[i - 1]["task"]:
                ax.axvline(i - 0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("validation run (tasks separated by dashed lines)")
        ax.set_ylabel("%")
        ax.set_title("Validation during forgetting")
        ax.legend(fontsize=8)
        paths.append(_save(fig, directory, "validation_curves.png"))
    return paths


def _save(fig: Any, directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def format_row(row: dict[str, Any],
               columns: Iterable[str] = ("acc_f", "acc_r", "acc_o", "acc_m", "ap_f", "ap_r", "ap_o", "h")) -> str:
    """``acc_f=0.00 acc_r=97.10 ...`` for the columns present in ``row``."""
    return " ".join(f"{k}={_fmt(row.get(k))}" for k in columns if row.get(k) is not None)


def format_table(rows: Sequence[dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A fixed-width text table of per-task rows (e.g. ``GSLoRA.task_results()``)."""
    columns = list(columns or [c for c in TABLE_COLUMNS if any(c in row for row in rows)])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 and value != 0 else f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
