"""Run a whole forgetting sequence from one call: one ``Trainer.fit`` per task with the same callback."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl

from lightning_plugins.callbacks.gslora.callback import GSLoRA

TrainerSpec = Union[Callable[[int], pl.Trainer], dict[str, Any], None]

#: ``max_epochs`` of the default Trainer of :func:`forget_sequence` when the callback has ``early_stop=True``.
DEFAULT_EARLY_STOP_MAX_EPOCHS = 50


def forget_sequence(
    model: pl.LightningModule,
    datamodule: Optional[pl.LightningDataModule],
    callback: GSLoRA,
    trainer: TrainerSpec = None,
    ckpt_path: Optional[str] = None,
) -> list[dict[str, Any]]:
    """Forget every remaining task of ``callback`` from ``model``; return one result row per finished task.

    Each task gets its own ``Trainer`` (so a fresh optimizer, schedule and loop state), built by ``trainer``:

    * a callable ``task_index -> Trainer`` whose callbacks include ``callback`` (use it for per-task loggers or
      checkpoint folders), or
    * a dict of ``Trainer`` keyword arguments (``callback`` is added to its ``callbacks``), or
    * ``None``: ``Trainer(max_epochs=50, callbacks=[callback])`` with the callback's stopping rule
      (``early_stop=True``, the default: a generous cap, the rule ends each task once it is forgotten), or
      ``max_epochs=10`` with ``early_stop=False`` (fixed epochs).

    ``ckpt_path`` resumes from a checkpoint taken during any task: the first fit restores the callback's task index,
    prototypes and history with the weights, finishes that task, and the loop goes on with the next ones.
    """
    if not isinstance(callback, GSLoRA):
        raise TypeError(f"callback must be a GSLoRA, got {type(callback).__name__}")
    if ckpt_path is None and callback.finished:
        return callback.task_results()
    for _ in range(callback.num_tasks + 1):
        if ckpt_path is None and callback.finished:
            break
        task_trainer = _make_trainer(trainer, callback)
        done_before = len(callback.task_results())
        task_trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        ckpt_path = None
        if len(callback.task_results()) == done_before:
            raise RuntimeError(
                f"Trainer.fit returned without finishing forgetting task {callback.task_index} (interrupted, or "
                "max_steps/limit_train_batches reached 0?); resume it with ckpt_path=<a checkpoint of this run>"
            )
    return callback.task_results()


def _make_trainer(spec: TrainerSpec, callback: GSLoRA) -> pl.Trainer:
    if spec is None:
        spec = {"max_epochs": DEFAULT_EARLY_STOP_MAX_EPOCHS if callback.early_stop else 10}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        others = list(kwargs.pop("callbacks", None) or [])
        return pl.Trainer(**kwargs, callbacks=[callback, *others])
    if not callable(spec):
        raise TypeError(f"trainer must be a callable task_index -> Trainer, a dict of Trainer arguments or None, "
                        f"got {type(spec).__name__}")
    built = spec(callback.task_index)
    if not isinstance(built, pl.Trainer):
        raise TypeError(f"the trainer factory returned a {type(built).__name__}, not a lightning Trainer")
    if not any(cb is callback for cb in built.callbacks):
        raise ValueError("the Trainer built by the factory must have this GSLoRA instance in its callbacks")
    return built
