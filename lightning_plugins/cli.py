"""The ``lightning-plugins`` command: Lightning's ``LightningCLI`` with every project module selectable in YAML.

    lightning-plugins fit --config examples/configs/vit_mnist5k.yaml
    lightning-plugins fit --config my.yaml --model.init_args.lr=3e-4 --print_config

Models and datamodules are chosen by ``class_path`` (a project class by its short name, e.g. ``ImageClassifier``,
or a user's own class by its full import path). This is the only module that knows the precision plugin, the
callbacks and the modules together.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# imported so that their classes can be named by their short class names in YAML
import lightning_plugins.callbacks  # noqa: F401
import lightning_plugins.modules  # noqa: F401

DEBUG_ENV = "LIGHTNING_PLUGINS_DEBUG"


class ConfigurationError(Exception):
    """A configuration value was rejected while building the model, data or trainer."""


class LightningPluginsCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for models and data (any LightningModule / LightningDataModule).

    Errors raised while the classes are built from the configuration (a bad value, a model/data mismatch) are
    reported as one line, like the parser's own errors, instead of a traceback (set ``LIGHTNING_PLUGINS_DEBUG=1``
    to see the traceback).
    """

    def __init__(
        self,
        model_class: Optional[type[LightningModule]] = None,
        datamodule_class: Optional[type[LightningDataModule]] = None,
        args: ArgsType = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        # re-running a recipe (the demo, a benchmark) must not fail because its config.yaml already exists
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class or LightningModule, datamodule_class or LightningDataModule, args=args, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, ImportError, MisconfigurationException) as err:
            if os.environ.get(DEBUG_ENV):
                raise
            cause = _root_cause(err)
            raise ConfigurationError(f"{type(cause).__name__}: {cause}") from err

    def after_instantiate_classes(self) -> None:
        model_classes = getattr(self.model, "num_classes", None)
        data_classes = getattr(self.datamodule, "num_classes", None) if self.datamodule is not None else None
        if isinstance(model_classes, int) and isinstance(data_classes, int) and model_classes != data_classes:
            raise ConfigurationError(
                f"model.num_classes={model_classes} but the data has {data_classes} classes; "
                f"set model.init_args.num_classes: {data_classes}"
            )


def fit_and_test(config: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Build model, data and trainer from a CLI config (plus command-line style overrides), fit, then test.

    Returns the test metrics with ``parameters``, ``epochs``, ``fit_seconds`` and ``test_samples`` added.
    """
    cli = LightningPluginsCLI(args=["--config", str(config), *overrides], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    test_set = getattr(cli.datamodule, "test_set", None)
    return {
        **metrics,
        "parameters": sum(p.numel() for p in cli.model.parameters()),
        "epochs": cli.trainer.current_epoch,
        "fit_seconds": fit_seconds,
        "test_samples": len(test_set) if test_set is not None else None,
    }


def _root_cause(err: BaseException) -> BaseException:
    """The first exception of a ``raise ... from`` chain: jsonargparse wraps a class's own error in a union report."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def main(args: ArgsType = None) -> None:
    """Console entry point of ``lightning-plugins``."""
    try:
        LightningPluginsCLI(args=args)
    except ConfigurationError as err:
        print(f"lightning-plugins: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
