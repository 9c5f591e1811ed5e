"""The precision flag: Trainer(precision="fp8-msamp"), plugins=[MSAMPPrecision(...)] with stock Lightning, the
LightningCLI forms (YAML `precision: fp8-msamp` and `class_path`), and one test per patched Lightning symbol."""

from __future__ import annotations

import inspect
import warnings

import lightning
import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
from precision_helpers import TinyMLP, loader, trainer_kwargs

import lightning_plugins
from lightning_plugins import MSAMPPrecision
from lightning_plugins.fp8 import FP8AdamW
from lightning_plugins.precision import registration


def _precision_literals():
    return registration._literal_values(pl.Trainer.__init__.__annotations__["precision"])


@pytest.fixture
def stock_lightning():
    """Lightning exactly as installed: the flag unregistered for the duration of the test."""
    registration.unregister_precision_flag()
    yield
    registration.register_precision_flag()


def test_import_registers_the_flag():
    assert lightning_plugins.MSAMPPrecision is MSAMPPrecision
    assert registration.is_registered()
    assert registration.lightning_version_supported()
    trainer = pl.Trainer(**trainer_kwargs(precision="fp8-msamp"))
    assert isinstance(trainer.precision_plugin, MSAMPPrecision)
    assert trainer.precision_plugin.level == "O2"
    assert trainer.precision == "fp8-msamp"


def test_string_flag_keeps_other_plugins():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    io = TorchCheckpointIO()
    trainer = pl.Trainer(**trainer_kwargs(precision="fp8-msamp", plugins=io))
    assert trainer.strategy.checkpoint_io is io
    assert isinstance(trainer.precision_plugin, MSAMPPrecision)


def test_other_precision_strings_are_untouched():
    assert type(pl.Trainer(**trainer_kwargs(precision="bf16-mixed")).precision_plugin).__name__ == "MixedPrecision"
    with pytest.raises(ValueError, match="Precision 'fp9' is invalid"):
        pl.Trainer(**trainer_kwargs(precision="fp9"))


def test_plugin_instance_with_stock_lightning(stock_lightning):
    with pytest.raises(ValueError, match="Precision 'fp8-msamp' is invalid"):
        pl.Trainer(**trainer_kwargs(precision="fp8-msamp"))
    trainer = pl.Trainer(**trainer_kwargs(max_steps=2, limit_val_batches=0), plugins=[MSAMPPrecision(level="O1")])
    trainer.fit(TinyMLP(), loader())
    assert trainer.precision_plugin.level == "O1"


# --- patched symbols 1 and 2: the precision conversion and the two connectors' _check_and_init_precision -------


def _patched_symbols():
    import lightning.fabric.connector as fabric_connector
    import lightning.pytorch.trainer.connectors.accelerator_connector as trainer_connector

    return [
        (fabric_connector, "_convert_precision_to_unified_args"),
        (trainer_connector, "_convert_precision_to_unified_args"),
        (trainer_connector._AcceleratorConnector, "_check_and_init_precision"),
        (fabric_connector._Connector, "_check_and_init_precision"),
    ]


def test_patched_symbols_wrap_and_restore_the_originals():
    for owner, name in _patched_symbols():
        original = registration._ORIGINALS[(owner, name)]
        assert getattr(owner, name) is not original and getattr(owner, name).__wrapped__ is original
    registration.unregister_precision_flag()
    for owner, name in _patched_symbols():
        assert not hasattr(getattr(owner, name), "__wrapped__")
    registration.register_precision_flag()
    # positional call (the Trainer uses keywords) goes through the same translation
    connector = _AcceleratorConnector("auto", 1, "cpu", "auto", None, "fp8-msamp")
    assert isinstance(connector.precision_plugin, MSAMPPrecision)


def test_tracebacks_of_other_errors_show_no_frame_of_ours():
    """Before, every Trainer construction ran through a wrapper of the connector's __init__, so any Trainer error
    (here a bad accelerator, with 32-true) showed a frame of registration.py."""
    import traceback

    with pytest.raises(ValueError, match="invalid accelerator name") as info:
        pl.Trainer(accelerator="tpu-ish", precision="32-true")
    frames = [frame.filename for frame in traceback.extract_tb(info.tb)]
    assert not [f for f in frames if "lightning_plugins" in f], frames


def test_model_summary_does_not_warn_about_the_precision():
    """In a plain process (pytest resets warning filters around each test, so this runs in a subprocess): before,
    every fp8-msamp fit warned that the model summary does not support the precision."""
    import subprocess
    import sys

    code = (
        "import torch, lightning.pytorch as pl, lightning_plugins\n"
        "class M(pl.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.net = torch.nn.Linear(16, 16)\n"
        "    def training_step(self, batch, i):\n"
        "        return self.net(batch).square().mean()\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.AdamW(self.parameters())\n"
        "pl.Trainer(precision='fp8-msamp', accelerator='cpu', max_steps=1, logger=False, enable_checkpointing=False,\n"
        "           enable_progress_bar=False, enable_model_summary=True).fit(M(), torch.randn(4, 16))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Total params" in out.stdout + out.stderr  # the summary ran
    assert "not supported by the model summary" not in out.stdout + out.stderr


def test_register_is_idempotent():
    current = [getattr(owner, name) for owner, name in _patched_symbols()]
    annotation = pl.Trainer.__init__.__annotations__["precision"]
    registration.register_precision_flag()
    registration.register_precision_flag()
    assert [getattr(owner, name) for owner, name in _patched_symbols()] == current
    assert pl.Trainer.__init__.__annotations__["precision"] is annotation


# --- patched symbol 2: Trainer.__init__.__annotations__["precision"] ---------------------------------------------


def test_patched_trainer_precision_annotation():
    assert "fp8-msamp" in _precision_literals()
    assert {"32-true", "bf16-mixed", 32, "16"} <= _precision_literals()  # Lightning's values are all still there
    original = registration._ORIGINALS["annotation"]
    registration.unregister_precision_flag()
    assert pl.Trainer.__init__.__annotations__["precision"] is original
    assert "fp8-msamp" not in _precision_literals()


@pytest.mark.parametrize("version", ["2.3.3", "2.7.0", "3.0.0"])
def test_untested_lightning_version_refuses_with_the_alternative(stock_lightning, monkeypatch, version):
    monkeypatch.setattr(registration, "_lightning_version", lambda: version)
    originals = [getattr(owner, name) for owner, name in _patched_symbols()]
    with pytest.raises(RuntimeError, match=rf"Lightning {version} is not a tested version.*plugins=\[lightning_plugins"):
        registration.register_precision_flag()
    assert not registration.is_registered()
    assert [getattr(owner, name) for owner, name in _patched_symbols()] == originals
    assert "fp8-msamp" not in _precision_literals()
    with pytest.warns(UserWarning, match="Pass the plugin instance instead"):
        registration.register_on_import()


def test_installed_lightning_is_in_the_tested_range():
    assert registration.lightning_version_supported(lightning.__version__)


# --- LightningCLI --------------------------------------------------------------------------------------------------


def _cli(tmp_path, trainer_config):
    config = {"trainer": {"accelerator": "cpu", "logger": False, "max_steps": 2, "enable_progress_bar": False,
                          "enable_checkpointing": False, "enable_model_summary": False, **trainer_config}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LightningCLI(TinyMLP, run=False, args=["--config", str(path)], save_config_callback=None)


def test_cli_yaml_precision_string(tmp_path):
    cli = _cli(tmp_path, {"precision": "fp8-msamp"})
    assert isinstance(cli.trainer.precision_plugin, MSAMPPrecision)
    cli.trainer.fit(cli.model, loader())
    assert isinstance(cli.trainer.optimizers[0], FP8AdamW)


def test_cli_yaml_precision_string_needs_the_patch(tmp_path, stock_lightning):
    with pytest.raises(SystemExit):
        _cli(tmp_path, {"precision": "fp8-msamp"})


def test_cli_class_path_with_stock_lightning(tmp_path, stock_lightning):
    plugin = {"class_path": "lightning_plugins.MSAMPPrecision",
              "init_args": {"level": "O1", "compute_dtype": "float32", "exclude": ["net.4"]}}
    cli = _cli(tmp_path, {"plugins": [plugin]})
    made = cli.trainer.precision_plugin
    assert isinstance(made, MSAMPPrecision)
    assert (made.level, made.compute_dtype, made.exclude) == ("O1", torch.float32, ("net.4",))
    cli.trainer.fit(cli.model, loader())
