"""What a logger records about FP8 training: scales, amaxes, clipped values, skipped steps, the conversion report.

Everything here is computed from tensors that already exist (the scaling states, a
:class:`~lightning_plugins.fp8.SaturationCounter` filled during a logged step) and returned as device tensors,
so building the metrics adds no host sync: the logger's own transfer, at its cadence, is the only one.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_plugins.fp8 import ConversionReport, SaturationCounter, ScalingRegistry

__all__ = ["fp8_statistics", "conversion_report_csv", "conversion_summary", "write_conversion_report"]

STAT_PREFIX = "fp8"
_ROLES = ("input", "weight", "grad_output", "wgrad")


def fp8_statistics(
    registry: ScalingRegistry,
    skipped_steps: int,
    saturation: Optional[SaturationCounter] = None,
    per_layer: bool = False,
) -> dict[str, Any]:
    """Summary metrics of a model's FP8 scaling states, keyed ``fp8/...``.

    Per role (``input``, ``weight``, ``grad_output``, ``wgrad``): ``amax`` (largest |value| over the layers and the
    amax window), ``scale_log2_min``/``scale_log2_max`` (the range of the power-of-two scales), and with a
    ``saturation`` counter ``clipped_share`` (share of the values cast in the counted step that were clipped at the
    format's max). Plus ``fp8/skipped_steps`` and ``fp8/clipped_share`` over all roles. With ``per_layer``, the same
    per layer under ``fp8/layers/<layer>/<role>/...``.
    """
    stats: dict[str, Any] = {f"{STAT_PREFIX}/skipped_steps": float(skipped_steps)}
    by_role: dict[str, list[tuple[str, Any]]] = {role: [] for role in _ROLES}
    for name, layer in registry.layers.items():
        for role, state in layer.scaling_states().items():
            by_role.setdefault(role, []).append((name, state))
    total_clipped: list[torch.Tensor] = []
    total_elements = 0
    for role, entries in by_role.items():
        if not entries:
            continue
        amax = torch.stack([s.amax_history.max() for _, s in entries])
        log2_scale = torch.log2(torch.stack([s.scale for _, s in entries]))
        stats[f"{STAT_PREFIX}/{role}/amax"] = amax.max()
        stats[f"{STAT_PREFIX}/{role}/scale_log2_min"] = log2_scale.min()
        stats[f"{STAT_PREFIX}/{role}/scale_log2_max"] = log2_scale.max()
        if per_layer:
            for (name, _), a, sc in zip(entries, amax, log2_scale):
                stats[f"{STAT_PREFIX}/layers/{name}/{role}/amax"] = a
                stats[f"{STAT_PREFIX}/layers/{name}/{role}/scale_log2"] = sc
        if saturation is not None:
            counted = [(s, saturation.clipped[s]) for _, s in entries if s in saturation.clipped]
            elements = sum(saturation.elements[s] for s, _ in counted)
            if elements:
                clipped = torch.stack([c.to(amax.device) for _, c in counted]).sum()
                stats[f"{STAT_PREFIX}/{role}/clipped_share"] = clipped.to(torch.float32) / elements
                total_clipped.append(clipped)
                total_elements += elements
    if total_elements:
        stats[f"{STAT_PREFIX}/clipped_share"] = torch.stack(total_clipped).sum().to(torch.float32) / total_elements
    return stats


def conversion_report_csv(report: ConversionReport) -> str:
    """The conversion report as CSV text (layer, type, in, out, status, reason)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["layer", "type", "in", "out", "status", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.rows())
    return out.getvalue()


def write_conversion_report(report: ConversionReport, directory: str | Path) -> tuple[Path, Path]:
    """Write ``fp8_conversion.csv`` and ``fp8_conversion.txt`` (the table) into ``directory``; return both paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, txt_path = folder / "fp8_conversion.csv", folder / "fp8_conversion.txt"
    csv_path.write_text(conversion_report_csv(report), encoding="utf-8")
    txt_path.write_text(report.table() + "\n", encoding="utf-8")
    return csv_path, txt_path


def conversion_summary(report: ConversionReport) -> dict[str, float]:
    """Counts for a logger's hyperparameters: converted, already FP8, skipped and other layers."""
    return {
        f"{STAT_PREFIX}/converted_layers": float(len(report.converted)),
        f"{STAT_PREFIX}/already_fp8_layers": float(len(report.already_fp8)),
        f"{STAT_PREFIX}/skipped_layers": float(len(report.skipped)),
        f"{STAT_PREFIX}/other_layers": float(len(report.unsupported)),
    }

