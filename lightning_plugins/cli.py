"""The ``lightning-plugins`` command: Lightning's ``LightningCLI`` with every project module selectable in YAML.

    lightning-plugins fit --config examples/configs/vit_mnist5k.yaml
    lightning-plugins fit --config my.yaml --model.init_args.lr=3e-4 --print_config
    lightning-plugins forget --config examples/configs/gslora_mnist5k.yaml --pretrained model.ckpt
    lightning-plugins rejection-sample --config examples/configs/align_rs.yaml     (see commands.py)

Models and datamodules are chosen by ``class_path`` (a project class by its short name, e.g. ``ImageClassifier``,
or a user's own class by its full import path). This is the only module that knows the precision plugin, the
callbacks and the modules together.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# imported so that their classes can be named by their short class names in YAML
import lightning_plugins.callbacks  # noqa: F401
import lightning_plugins.modules  # noqa: F401
from lightning_plugins.callbacks import (
    DetectionForgettingDataModule,
    ForgettingDataModule,
    GSLoRA,
    forget_sequence,
    format_table,
)
from lightning_plugins.callbacks.gslora.tasks import check_class_range
from lightning_plugins.cli_errors import describe_parse_error
from lightning_plugins.commands import DEBUG_ENV, DESCRIPTION, CommandError, maybe_run_command
from lightning_plugins.precision import TrainingStateMeter


class ConfigurationError(Exception):
    """A configuration value was rejected while building the model, data or trainer."""


PROG = "lightning-plugins"


class LightningPluginsParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one line on stderr (exit code 2) instead of the usage block.

    The line names the config key, the rejected value and, for a class name, the closest known class
    (:func:`describe_parse_error`). With ``LIGHTNING_PLUGINS_DEBUG=1`` the parser reports as jsonargparse does.
    """

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        # exit_on_error=False: a nested parser whose caller handles the ArgumentError (jsonargparse's own use)
        if not self.exit_on_error or os.environ.get(DEBUG_ENV):
            super().error(message, ex)
        self._logger.error(message)
        self.exit(2, f"{PROG}: error: {describe_parse_error(message, ex)}\n")


class LightningPluginsTrainer(Trainer):
    """Lightning's ``Trainer`` plus the signature of the project's ``forget`` subcommand (same arguments)."""

    def forget(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        pretrained: Optional[str] = None,
        pretrain_epochs: int = 0,
        ckpt_path: Optional[str] = None,
    ) -> list[dict[str, Any]]:
        """Forget the GSLoRA tasks of trainer.callbacks from a trained model, one fit per task.

        Args:
            model: the model to forget from.
            datamodule: its data; wrap it in ``ForgettingDataModule`` (in the config) for per-task replay subsets.
            pretrained: checkpoint of the trained model (a Lightning ``.ckpt`` or a ``state_dict`` file), loaded
                with ``torch.load(weights_only=True)`` before the first task.
            pretrain_epochs: instead of ``pretrained``: first train the model for this many epochs with the
                recipe's (unwrapped) data, save its weights as ``<default_root_dir>/pretrained.pt``, then forget.
            ckpt_path: a checkpoint taken during a forgetting task, to resume the sequence from.
        """
        raise NotImplementedError(
            "forget runs from the CLI (lightning-plugins forget --config ...); in Python use "
            "lightning_plugins.callbacks.forget_sequence or lightning_plugins.cli.forget_from_config"
        )


class LightningPluginsCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for models and data (any LightningModule / LightningDataModule).

    Besides Lightning's ``fit``/``validate``/``test``/``predict`` it has ``forget``: the whole sequence of the
    ``GSLoRA`` callback configured in ``trainer.callbacks`` (one ``fit`` per task, see
    :meth:`LightningPluginsTrainer.forget` for its arguments), then the per-task table and report files.

    A run whose config leaves ``trainer.logger`` out logs CSV under ``trainer.default_root_dir``
    (:func:`default_logger`), so its metrics, checkpoints and saved ``config.yaml`` follow
    ``--trainer.default_root_dir``.

    Errors are reported as one line instead of a traceback or the usage block (set ``LIGHTNING_PLUGINS_DEBUG=1``
    for those): the parser's (a mistyped class name, a value of the wrong type; see :class:`LightningPluginsParser`)
    exit with code 2 themselves, those raised while the classes are built (a bad value, a model/data mismatch)
    are raised as :class:`ConfigurationError`, which :func:`main` prints.
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
        kwargs.setdefault("trainer_class", LightningPluginsTrainer)
        kwargs.setdefault("parser_class", LightningPluginsParser)
        self.forget_results: Optional[list[dict[str, Any]]] = None
        super().__init__(model_class or LightningModule, datamodule_class or LightningDataModule, args=args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "forget": {"model", "datamodule"}}

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
        if isinstance(model_classes, int):
            for callback in _gslora_callbacks(self.trainer):
                try:
                    check_class_range(callback.tasks, model_classes, "model.num_classes")
                except ValueError as err:
                    raise ConfigurationError(f"GSLoRA tasks: {err}; fix trainer.callbacks' GSLoRA tasks") from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # keep the configured Trainer arguments (before Lightning adds SaveConfigCallback to the callbacks list):
        # `forget` builds one more Trainer per task from them
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if config.get("logger") in (None, True):
            kwargs["logger"] = config["logger"] = default_logger(config.get("default_root_dir"))
        self._trainer_kwargs = {**config, "callbacks": _as_list(config.get("callbacks"))}
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------------------------------- forget subcommand
    def forget(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        pretrained: Optional[str] = None,
        pretrain_epochs: int = 0,
        ckpt_path: Optional[str] = None,
    ) -> list[dict[str, Any]]:
        """The ``forget`` subcommand (arguments: :meth:`LightningPluginsTrainer.forget`)."""
        callback = _single_gslora(self.trainer)
        _check_forget_inputs(pretrained, pretrain_epochs, ckpt_path)
        if pretrain_epochs:
            self._pretrain(model, datamodule, pretrain_epochs)
        elif pretrained is not None:
            load_pretrained(model, pretrained)
        rows = forget_sequence(model, datamodule, callback, trainer=self._task_trainers(), ckpt_path=ckpt_path)
        self.forget_results = rows
        self._print_report(callback, rows)
        return rows

    def _task_trainers(self) -> Any:
        """``task_index -> Trainer``: the CLI's own Trainer (it saves config.yaml) for the first task, then new ones."""
        unused = [self.trainer]
        return lambda _task: unused.pop() if unused else self._new_trainer()

    def _new_trainer(self, **overrides: Any) -> Trainer:
        """A fresh Trainer from the configured arguments (the same callback and logger instances)."""
        kwargs = {**self._trainer_kwargs, **overrides}
        kwargs["callbacks"] = list(kwargs.get("callbacks") or [])
        return self.trainer_class(**kwargs)

    def _pretrain(self, model: LightningModule, datamodule: Optional[LightningDataModule], epochs: int) -> None:
        wrappers = (ForgettingDataModule, DetectionForgettingDataModule)
        data = datamodule.datamodule if isinstance(datamodule, wrappers) else datamodule
        if data is None:
            raise ConfigurationError(
                "pretrain_epochs needs a datamodule to train on: set data (e.g. ForgettingDataModule with "
                "init_args.datamodule) or give --pretrained=<checkpoint> instead"
            )
        others = [c for c in self._trainer_kwargs["callbacks"] if not isinstance(c, GSLoRA)]
        trainer = self._new_trainer(max_epochs=epochs, callbacks=others, logger=False)
        trainer.fit(model, datamodule=data)
        path = Path(trainer.default_root_dir) / "pretrained.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict()}, path)
        print(f"pretrained for {epochs} epoch(s); weights saved to {path} (reuse them with --pretrained={path})")

    def _print_report(self, callback: GSLoRA, rows: list[dict[str, Any]]) -> None:
        table = format_table(rows)
        print(table)
        if not self.trainer.is_global_zero:
            return
        directory = Path(callback.output_dir or Path(self.trainer.default_root_dir) / "gslora")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "table.txt").write_text(table + "\n", encoding="utf-8")
        print(f"report: {directory} (table.txt, history.csv, history.json, plots)")


def default_logger(default_root_dir: Optional[str | Path]) -> CSVLogger:
    """The logger of a run whose config leaves ``trainer.logger`` out (or ``true``): ``metrics.csv`` (and the
    checkpoints and ``config.yaml`` that follow the logger) under ``<default_root_dir>/lightning_logs/version_N``,
    whether TensorBoard is installed or not; set ``trainer.logger`` for another logger or ``false`` for none."""
    return CSVLogger(save_dir=default_root_dir if default_root_dir is not None else os.getcwd())


def fit_and_test(
    config: str | Path, overrides: Sequence[str] = (), save_weights: Optional[str | Path] = None
) -> dict[str, Any]:
    """Build model, data and trainer from a CLI config (plus command-line style overrides), fit, then test.

    Returns the test metrics with ``parameters``, ``epochs``, ``fit_seconds``, ``test_samples`` and
    ``training_state`` (bytes per parameter of weights, gradients and optimizer state, from
    :class:`~lightning_plugins.precision.TrainingStateMeter`) added. ``save_weights`` writes the trained model's
    ``state_dict`` there (loadable by ``forget --pretrained``).
    """
    cli = LightningPluginsCLI(args=["--config", str(config), *overrides], run=False)
    meter = TrainingStateMeter()
    cli.trainer.callbacks.append(meter)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    # one dict per test dataloader (e.g. identification + verification pairs): merged
    metrics = {key: value for per_loader in cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
               for key, value in per_loader.items()}
    if save_weights is not None:
        Path(save_weights).parent.mkdir(parents=True, exist_ok=True)
        torch.save(cli.model.state_dict(), save_weights)
    test_set = getattr(cli.datamodule, "test_set", None)
    return {
        **metrics,
        "parameters": sum(p.numel() for p in cli.model.parameters()),
        "epochs": cli.trainer.current_epoch,
        "fit_seconds": fit_seconds,
        "test_samples": len(test_set) if test_set is not None else None,
        "training_state": meter.measured,
    }


def forget_from_config(config: str | Path, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run ``lightning-plugins forget --config <config> <overrides...>`` in-process; return the per-task rows."""
    cli = LightningPluginsCLI(args=["forget", "--config", str(config), *overrides])
    return cli.forget_results or []


def load_pretrained(model: LightningModule, path: str) -> None:
    """Load a trained model's weights (a Lightning ``.ckpt`` or a ``state_dict`` file) with ``weights_only=True``."""
    if not Path(path).is_file():
        raise ConfigurationError(
            f"pretrained={path!r} is not a file; give the checkpoint of the trained model "
            "(e.g. <default_root_dir>/.../checkpoints/last.ckpt of lightning-plugins fit)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigurationError(
            f"pretrained={path!r} cannot be read with torch.load(weights_only=True) ({first_line}); "
            "save the weights as a state_dict or a Lightning checkpoint"
        ) from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigurationError(f"pretrained={path!r} holds a {type(checkpoint).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise ConfigurationError(
            f"pretrained={path!r} does not fit {type(model).__name__} as configured ({first_line} ...); "
            "use the model.init_args the checkpoint was trained with"
        ) from err


def _check_forget_inputs(pretrained: Optional[str], pretrain_epochs: int, ckpt_path: Optional[str]) -> None:
    if isinstance(pretrain_epochs, bool) or not isinstance(pretrain_epochs, int) or pretrain_epochs < 0:
        raise ConfigurationError(f"pretrain_epochs must be an integer >= 0, got {pretrain_epochs!r}")
    if pretrained is not None and pretrain_epochs:
        raise ConfigurationError(
            f"give either pretrained={pretrained!r} or pretrain_epochs={pretrain_epochs}, not both"
        )
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigurationError(
            f"ckpt_path={ckpt_path!r} is not a file; give a checkpoint saved during this forgetting sequence "
            "(or leave ckpt_path out to start it)"
        )
    if pretrained is None and not pretrain_epochs and ckpt_path is None:
        raise ConfigurationError(
            "forgetting needs a trained model: give --pretrained=<checkpoint of the trained model>, or "
            "--pretrain_epochs=N to train it with this recipe first"
        )


def _gslora_callbacks(trainer: Trainer) -> list[GSLoRA]:
    return [c for c in trainer.callbacks if isinstance(c, GSLoRA)]


def _single_gslora(trainer: Trainer) -> GSLoRA:
    found = _gslora_callbacks(trainer)
    if len(found) != 1:
        raise ConfigurationError(
            f"forget needs exactly one GSLoRA callback in trainer.callbacks, found {len(found)}; add "
            "{class_path: GSLoRA, init_args: {tasks: [[0, 1], [2, 3]]}} to trainer.callbacks"
        )
    return found[0]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _root_cause(err: BaseException) -> BaseException:
    """The first exception of a ``raise ... from`` chain: jsonargparse wraps a class's own error in a union report."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def main(args: ArgsType = None) -> None:
    """Console entry point of ``lightning-plugins``: LightningCLI, or a project subcommand (``commands.py``)."""
    try:
        if maybe_run_command(args) is None:
            LightningPluginsCLI(args=args, parser_kwargs={"description": DESCRIPTION})
    except (ConfigurationError, CommandError) as err:
        print(f"lightning-plugins: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
