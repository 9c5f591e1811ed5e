"""``MSAMPPrecision``: the Trainer plugin behind ``precision="fp8-msamp"`` (MS-AMP's FP8 recipe, O1/O2/O3).

What each Trainer hook does (the FP8 machinery itself is in :mod:`lightning_plugins.fp8`):

* ``convert_module``: ``nn.Linear`` -> ``FP8Linear`` in place, table logged (see the Fabric base class). Under
  ``ModelParallelStrategy`` (FSDP2, applied by the user in ``configure_model``, which Lightning runs first) the
  layer objects themselves become FP8 layers (FSDP keeps references to them); O2/O3 re-type the weight shards to
  FP16 masters and O3 adds the FP8 all-gather (:mod:`lightning_plugins.fp8.fsdp`).
* ``connect``: O2 swaps ``Adam``/``AdamW`` for ``FP8Adam``/``FP8AdamW`` and re-binds the LR
  schedulers; with DDP at O1 it registers the FP8 gradient communication hook.
* ``optimizer_step``: closure, FP8 gradient reduction (O2 + DDP; O2/O3 + FSDP2: reduce-scatter), inf/NaN check
  (agreed by all ranks), Lightning's
  ``on_before_optimizer_step`` + clipping, then the step or a skip, then the delayed-scaling update.
* ``clip_grad_by_norm``/``clip_grad_by_value``: include the FP8 weight gradients.
* ``val/test/predict_step_context``: FP8 casts record nothing (the amax history sees training only).
* ``state_dict``/``on_save_checkpoint``/``on_load_checkpoint``: scales in the checkpoint; optional
  portable checkpoint; an FP8 optimizer state is converted when the run resuming it uses a torch optimizer.
* ``teardown``: the FP8 layers go back to plain ``nn.Linear``/``Conv1D`` (``restore_layers=True``), so no
  later run in another precision finds FP8 layers whose weights it cannot train.
* logging: the conversion report as files in the logger's folder and counts in its hyperparameters; FP8 metrics
  (``log_fp8_stats``) on the steps the loggers record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision.precision import Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import LBFGS, Optimizer

from lightning_plugins.fp8 import count_saturation, fp8_linear_weights, rebind_lr_schedulers
from lightning_plugins.fp8.comm import register_fp8_comm_hook
from lightning_plugins.fp8.optim import _FP8AdamBase
from lightning_plugins.precision.checkpoint import (
    is_fp8_optimizer_state,
    to_portable_checkpoint,
    to_torch_optimizer_state,
)
from lightning_plugins.precision.fabric import MSAMPFabricPrecision
from lightning_plugins.precision.fp8_stats import conversion_summary, write_conversion_report

__all__ = ["MSAMPPrecision"]


class MSAMPPrecision(Precision, MSAMPFabricPrecision):
    # (the docstring, with every argument, is composed below the class from MSAMPFabricPrecision's)
    _replaces_model = True

    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_scheduler_configs: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """O2: swap Adam/AdamW for the FP8 optimizers and re-bind the LR schedulers. DDP: set up FP8 communication."""
        self._reduce_group = None
        if self._sharding is not None:  # FSDP2 (ModelParallelStrategy): the data-parallel group of the shards
            self._reduce_group = self._sharding.group if self._sharding.world_size > 1 else None
        if isinstance(model, DistributedDataParallel):
            if torch.distributed.get_world_size(model.process_group) > 1:
                self._reduce_group = model.process_group
            if self.level == "O1" and self.grad_comm == "fp8":
                register_fp8_comm_hook(model, fp8_linear_weights(model))
        new_optimizers = []
        for optimizer in optimizers:
            new = self.convert_optimizer(optimizer, model)
            if new is not optimizer:
                rebind_lr_schedulers(lr_scheduler_configs, optimizer, new)
            new_optimizers.append(new)
        self._optimizers = new_optimizers
        self._publish_conversion_report()
        return model, new_optimizers, lr_scheduler_configs

    def teardown(self) -> None:
        """End of a Trainer run: swap the FP8 layers back to plain ones (``restore_layers=True``)."""
        super().teardown()
        if self.restore_layers:
            self.restore_module()

    def _trainer(self) -> Any:
        module = self._module
        return getattr(module, "_trainer", None) if isinstance(module, pl.LightningModule) else None

    def _publish_conversion_report(self) -> None:
        """The conversion report as files in the logger's folder, and its counts as logger hyperparameters."""
        trainer, report = self._trainer(), self.conversion_report
        if trainer is None or report is None or getattr(self, "_published_report", None) is report:
            return
        self._published_report = report
        if not trainer.is_global_zero or not trainer.loggers:
            return
        folder = trainer.log_dir or trainer.default_root_dir
        write_conversion_report(report, Path(folder))
        for logger in trainer.loggers:
            logger.log_hyperparams(conversion_summary(report))

    def _logging_step(self, model: pl.LightningModule) -> bool:
        """Will the loggers record this step? (Lightning's own test, evaluated before the step as it is after.)"""
        if self.log_fp8_stats == "off" or self._registry is None:
            return False
        trainer = getattr(model, "_trainer", None)
        if trainer is None or not trainer.loggers or not trainer.training:
            return False
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", False))

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizer,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        """Run the closure, reduce and check the gradients, then step, or skip the step on inf/NaN."""
        if isinstance(optimizer, LBFGS):
            raise MisconfigurationException(
                "MSAMPPrecision and torch.optim.LBFGS are not compatible: LBFGS re-evaluates the closure inside its "
                "step, which the inf/NaN skip cannot guard. Use Adam/AdamW (O2) or another first-order optimizer (O1)."
            )
        log_stats = self._logging_step(model)
        with count_saturation() if log_stats else contextlib.nullcontext() as saturation:
            closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            # training_step returned None: no backward, nothing to step (as Lightning's AMP plugin).
            self._update_scaling()
            return closure_result
        params = list(self.main_params(optimizer))
        self.reduce_fp8_grads(params)
        found = self._found_nonfinite(params)
        self._after_closure(model, optimizer)
        self._step_or_skip(optimizer, found, **kwargs)
        if log_stats:
            stats = self.fp8_statistics(saturation, per_layer=self.log_fp8_stats == "per_layer")
            model.log_dict(stats, on_step=True, on_epoch=False, logger=True, prog_bar=False)
        return closure_result

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:  # type: ignore[override]
        MSAMPFabricPrecision.clip_grad_by_norm(self, optimizer, clip_val)

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        MSAMPFabricPrecision.clip_grad_by_value(self, optimizer, clip_val)

    @contextlib.contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        with self.eval_context():
            yield

    @contextlib.contextmanager
    def test_step_context(self) -> Generator[None, None, None]:
        with self.eval_context():
            yield

    @contextlib.contextmanager
    def predict_step_context(self) -> Generator[None, None, None]:
        with self.eval_context():
            yield

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With ``checkpoint_format="portable"``: fp32 FP8-layer weights and torch Adam optimizer states."""
        if self.checkpoint_format == "portable":
            checkpoint.update(to_portable_checkpoint(checkpoint, self._fp8_weight_names))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Give a torch optimizer (e.g. at O1) the dequantized moments of a checkpoint saved by an FP8 optimizer."""
        saved = checkpoint.get("optimizer_states")
        current = self._optimizers
        if not saved:
            return
        checkpoint["optimizer_states"] = [
            to_torch_optimizer_state(s)
            if is_fp8_optimizer_state(s) and i < len(current) and not isinstance(current[i], _FP8AdamBase)
            else s
            for i, s in enumerate(saved)
        ]


# One docstring for both plugins' options, so that LightningCLI's --help documents every argument.
MSAMPPrecision.__doc__ = (
    """FP8 mixed-precision training with MS-AMP's O1/O2/O3 recipe, for ``Trainer(plugins=[...])``.

    ``Trainer(precision="fp8-msamp")`` (after ``import lightning_plugins``) is ``MSAMPPrecision()``, i.e.
    level ``"O2"``. Runs on CPU (emulated FP8 GEMMs, same arithmetic) and on CUDA GPUs with FP8 (compute
    capability >= 8.9), with single-device, DDP and ``ModelParallelStrategy`` (FSDP2, one data-parallel
    dimension; ``fully_shard`` applied in ``configure_model``) strategies; O3 needs the latter.

"""
    + MSAMPFabricPrecision.__doc__.split("\n\n", 1)[1]
)

