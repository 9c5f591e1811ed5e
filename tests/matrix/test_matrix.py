"""The combination matrix (issue 12): every module of the suite trains with every plugin, through the Python API and
through the ``lightning-plugins`` YAML CLI, single-process, under 2-process DDP and under 2-process FSDP2
(``ModelParallelStrategy``) (cells: ``matrix_cells.CELLS``).

Each cell runs a few steps on a tiny config and embedded data and checks that training really happened (the weights
moved and the loss of the first batch fell), that nothing is NaN, that FP8 cells trained with FP8Linear layers (and
O2 with the FP8 optimizer), and that GSLoRA cells added LoRA adapters during the fit and merged them at its end.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from matrix_cells import (CELLS, INTERFACES, MODULES, PRECISIONS, STEPS, fit_in_ranks, fit_python, fit_yaml,
                          read_probes, run_config, write_data)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True, scope="module")
def _quiet(quiet_lightning):
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("matrix_data"))


def _param(cell):
    marks = [pytest.mark.slow] if cell.slow else []
    if cell.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=cell.xfail))
    return pytest.param(cell, id=cell.id, marks=marks)


@pytest.mark.parametrize("cell", [_param(cell) for cell in CELLS])
def test_cell(cell, data_dir, tmp_path):
    config = run_config(cell, data_dir, tmp_path)
    if cell.strategy == "fsdp2":
        fit_in_ranks(cell, config, tmp_path)
    elif cell.interface == "python":
        fit_python(config)
    else:
        fit_yaml(config, tmp_path / "config.yaml")
    probes = read_probes(tmp_path, cell.ranks)
    for probe in probes:
        # (a) training happened: every step ran, the weights moved, the first batch's loss went down
        losses = probe["losses"]
        assert probe["steps"] == STEPS and len(losses) == STEPS, probe
        assert probe["same_keys"] and probe["moved"] > 1e-6, probe
        assert probe["first_batch_loss_after"] < losses[0], (probe["first_batch_loss_after"], losses)
        # (b) nothing is NaN
        assert all(map(math.isfinite, losses + [probe["first_batch_loss_after"]])) and probe["finite"], probe
        # (c) FP8: the model trained with FP8Linear layers; O2 with the FP8 optimizer
        fp8 = cell.precision != "32-true"
        assert (probe["converted"] or 0) > 0 if fp8 else probe["converted"] is None, probe
        assert all(n > 0 for n in probe["fp8_layers"]) if fp8 else not any(probe["fp8_layers"]), probe
        expected = ("FP8AdamW", "FP8Adam") if cell.precision in ("fp8-O2", "fp8-O3") else ("AdamW", "Adam")
        assert all(name in expected for name in probe["optimizers"]), probe["optimizers"]
        # (d) GSLoRA: LoRA adapters trained during the fit, then the task was merged and recorded
        if cell.gslora:
            assert all(n > 0 for n in probe["lora_layers"]) and probe["lora_left"] == 0, probe
            assert probe["gslora_tasks"] == 1, probe
        else:
            assert not any(probe["lora_layers"]) and probe["gslora_tasks"] is None, probe
    if cell.ranks > 1:  # the two processes really were one run: same world, identical (whole) weights at the end
        assert [p["world_size"] for p in probes] == [2, 2] and [p["rank"] for p in probes] == [0, 1]
        assert probes[0]["checksum"] == probes[1]["checksum"]


def test_readme_table_is_the_generated_one():
    """README.md's "What combines with what" table is exactly what examples/matrix_table.py prints now."""
    spec = importlib.util.spec_from_file_location("matrix_table", REPO / "examples" / "matrix_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (REPO / "README.md").read_text()
    assert readme.count(script.START) == 1 and readme.count(script.END) == 1, "README.md lost its matrix markers"
    table = readme.split(script.START, 1)[1].split(script.END, 1)[0]
    assert "| `DPOModule` |" in table and "YAML" in table
    assert table == script.table(), "README.md's matrix table is stale: run python examples/matrix_table.py --write"


def test_every_module_of_the_suite_is_in_the_matrix():
    """A LightningModule added to lightning_plugins.modules must get its row (every precision, both interfaces)."""
    import lightning.pytorch as pl

    import lightning_plugins.modules as modules

    exported = {name for name in modules.__all__
                if isinstance(getattr(modules, name), type) and issubclass(getattr(modules, name), pl.LightningModule)}
    assert exported == set(MODULES)
    for module in MODULES:
        covered = {(c.precision, c.interface) for c in CELLS
                   if c.module == module and c.strategy == "single" and not c.gslora}
        assert covered == {(p, i) for p in PRECISIONS for i in INTERFACES}, module
