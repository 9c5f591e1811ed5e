"""The ``GSLoRA`` callback: continual forgetting with group-sparse LoRA (GS-LoRA) and prototypes (GS-LoRA++)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_plugins.callbacks.gslora import report
from lightning_plugins.callbacks.gslora.adapted import adapter_rows, announce_adapters
from lightning_plugins.callbacks.gslora.checkpoint import check_state, pack_state, unpack_state
from lightning_plugins.callbacks.gslora.data import _mix
from lightning_plugins.callbacks.gslora.lora import (
    LoRALinear,
    TargetLayer,
    compile_targets,
    find_target_layers,
    group_layers,
    group_lora_parameters,
    inject_lora,
    remove_lora,
)
from lightning_plugins.callbacks.gslora.evaluation import (
    describe as _describe,
    evaluate_split_metrics,
    flatten_loaders as _flatten_loaders,
    loggable as _loggable,
    split_training_batch as _split_training_batch,
    unpack as _unpack,
)
from lightning_plugins.callbacks.gslora.losses import group_soft_threshold_
from lightning_plugins.callbacks.gslora.metrics import LabelledCorrect
from lightning_plugins.callbacks.gslora.objectives import PrototypeSpec, StepContext, TaskObjective, resolve_objective
from lightning_plugins.callbacks.gslora.prototypes import all_reduce_class_sums as _all_reduce_class_sums
from lightning_plugins.callbacks.gslora.prototypes import class_prototypes
from lightning_plugins.callbacks.gslora.rows import group_stats, history_row, test_columns
from lightning_plugins.callbacks.gslora.schedule import check_optimizer, constant, cosine, with_cooldown
from lightning_plugins.callbacks.gslora.settings import PerTask, check_num_classes, check_objective, check_settings
from lightning_plugins.callbacks.gslora.stopping import (
    cooldown_epochs,
    epoch_mean,
    forget_threshold,
    saturation,
    stopped_by,
)
from lightning_plugins.callbacks.gslora.tasks import TaskView, validate_tasks, view
from lightning_plugins.callbacks.gslora.wrapping import restore, user_step, wrap

# kept importable from here (they lived in this module before evaluation.py / prototypes.py)
__all__ = ["GSLoRA", "_all_reduce_class_sums", "_describe", "_flatten_loaders", "_loggable", "_split_training_batch",
           "_unpack"]

log = logging.getLogger(__name__)


class GSLoRA(Callback):
    """Forget a sequence of class sets from a trained classifier (or object categories from a detector), one task
    per ``Trainer.fit``.

    For each task the callback (1) adds a fresh LoRA group on the FFN Linear layers of every Transformer block and
    freezes everything else (the head included); (2) trains it with
    ``CE(retained) + beta ReLU(bound - CE(forgotten)) + alpha sum_g ||LoRA_g||_2`` (plus the prototype terms of
    GS-LoRA++ when ``prototypes=True``); (3) at the end of the fit merges the LoRA into the weights
    (``W += B A / 8``) and re-initialises it, so the next ``fit`` starts a fresh group with a fresh optimizer. After
    the last task the adapters are removed: the model has its original structure and state-dict keys.

    Run a whole sequence with :func:`~lightning_plugins.callbacks.forget_sequence`, or call ``Trainer.fit`` once
    per task with a new Trainer and this same callback. Metrics (Acc_f, Acc_r, Acc_o, Acc_m, Drop, H, group norms,
    zero-group ratio, trainable ratio, seconds per task) are logged after every validation and every task, kept in
    :attr:`history` (part of the checkpoint, so a resumed sequence continues it) and written as CSV/JSON/PNG.
    At the setup of each task the adapted layers and their groups are logged (Lightning's rank-zero INFO log),
    written to ``adapted_layers.csv`` in the report folder, and summarised for the Trainer's loggers with
    ``log_hyperparams`` (``gslora/adapted_layers``, ``gslora/groups``, ``gslora/rank``, ``gslora/lora_params``,
    ``gslora/trainable_params``, ``gslora/trainable_ratio``). By default (``early_stop=True``) a task ends once its
    classes are forgotten and the forgetting loss is saturated, after a cool-down of 3 epochs that anneals the
    learning rate, ``max_epochs`` being the cap; ``early_stop=False`` trains exactly ``max_epochs`` epochs per task.

    FP8: the target layers may be ``nn.Linear`` or :class:`lightning_plugins.fp8.FP8Linear` (a model converted by
    ``convert_to_fp8`` or trained with ``precision="fp8-msamp"`` before), and the forgetting fit itself may run
    under ``precision="fp8-msamp"``: the frozen layers run their FP8 GEMMs, the adapters train in fp32 and merge
    into the layers' weights in those weights' own dtype (FP16 at O2).

    Module protocol: ``forward(x)`` returns class logits ``[B, num_classes]``; batches are ``(x, y)`` or, from
    :class:`~lightning_plugins.callbacks.ForgettingDataModule`, ``{"retain": (x, y), "forget": (x, y)}``. A plain
    ``(x, y)`` batch is split by label: classes of the current or an earlier task are forgotten, the rest retained.
    GS-LoRA++ also needs ``embed(x) -> [B, d]``, the features the prototypes are built from. While fitting, the
    module's ``training_step`` is replaced by the GS-LoRA objective (and, if ``lr`` is set, its
    ``configure_optimizers`` by AdamW on the LoRA tensors); its ``validation_step``/``test_step`` still run,
    followed by the callback's split accuracies. The originals are restored at ``teardown``.

    Detectors: with ``objective="detection"`` (or ``"auto"`` and a module defining ``forgetting_losses``) the
    step is GS-LoRA's detection objective and the metrics are AP per split (see
    :class:`~lightning_plugins.callbacks.gslora.objectives.DetectionObjective` for the module protocol:
    ``forgetting_losses(images, targets) -> {"cls", "box"}``, ``detect(images)``, ``num_classes``, optional
    ``gslora_target``, used when ``target`` is ``None``); data from
    :class:`~lightning_plugins.callbacks.DetectionForgettingDataModule`. Other kinds of models plug in their own
    :class:`~lightning_plugins.callbacks.gslora.objectives.TaskObjective`.

    DataModule protocol (optional; :class:`ForgettingDataModule` implements it):
    ``set_forgetting_task(index, forgotten, old)``, ``missing_classes``, ``prototype_dataloader()``.

    Limits: Lightning checks that the module defines a ``training_step`` before any callback runs, so a module
    needs one (any; it is replaced). Use a launcher that keeps the callback in the main process (single device,
    ``strategy="ddp"``), not ``ddp_spawn``, whose workers' copies of the callback state are lost.

    Args:
        tasks: the classes to forget, one list per task, e.g. ``[[0, 1], [2, 3], [4, 5]]``.
        target: regex (or list) full-matched against module names to pick the LoRA layers (``nn.Linear`` or
            ``FP8Linear``); its named group
            ``block`` names the group. Default: :data:`~lightning_plugins.callbacks.gslora.lora.DEFAULT_TARGETS`
            (this project's/timm ViT ``blocks.N.mlp.fc1/fc2``, torchvision ViT ``encoder_layer_N.mlp.0/3``,
            Hugging Face ViT/BERT ``layer.N.intermediate.dense``/``layer.N.output.dense``, Llama
            ``layers.N.mlp.gate_proj/up_proj/down_proj``).
        grouping: ``"block"`` (one group per Transformer block, the paper), ``"layer"`` or ``"matrix"``.
        rank: LoRA rank (paper: 8).
        lora_alpha: LoRA alpha; scaling is ``lora_alpha / rank`` (paper: 1/8).
        beta: weight of the bounded forgetting loss; one value or one per task (paper: 0.2-0.25).
        bound: BND of ``ReLU(BND - CE)``. The paper's 105 suits CosFace logits (scale 64); for a plain linear head
            a value around 10-30 is the right scale (default 20).
        bound_per_sample: bound each forgotten sample's CE (``mean_i ReLU(BND - CE_i)``) instead of the batch
            mean (the paper). The batch mean can be satisfied by pushing one forgotten class very far while another
            is still recognised; this extension keeps pushing every sample until its own CE reaches BND.
        alpha: weight of the group-lasso term (paper: 1e-4).
        proximal: apply the group lasso as a proximal step after every optimizer step instead of as a loss term
            (``theta_g <- theta_g * max(0, 1 - lr * alpha / ||theta_g||)``, :func:`~.losses.group_soft_threshold_`):
            groups that are not needed become exactly zero, so the zero-group ratio measures real sparsity (with the
            loss term the norms only get small: the paper has no proximal step). ``alpha`` is then the shrink in
            norm per unit of learning rate; values around 0.1-1 switch blocks off here, 1e-4 does nothing visible.
        alpha_warmup_epochs: the group-lasso weight is 0 during the first epochs of each task (paper: 0 in its
            continual runs, 20-30 in some single-step runs).
        prototypes: GS-LoRA++: build per-class prototypes at the start of each task and add the prototype terms.
        proto_forget_weight: weight of ``ReLU(proto_bound - d(forgotten, prototype))``; one value or one per task.
        proto_retain_weight: weight of ``d(retained, prototype)`` (0 in all released runs of the paper). With few
            shots per class a weight around 1 (KL distance) helps: without it the forgotten samples tend to be pushed
            into one retained class, which then absorbs retained samples too (MNIST benchmark, 4 shots: Acc_r -16
            points on the last task without it, -2.5 with it); it slows forgetting, so give the task more steps.
        proto_bound: BND of the prototype push (paper: 18; 50 in its few-shot runs).
        proto_distance: ``"kl"`` (softmax over features, the paper) or ``"l2"``.
        lr: learning rate of the AdamW the callback builds over the LoRA tensors (cosine to ``min_lr`` over the
            task's ``max_epochs``; ``early_stop``'s cool-down anneals it to ``min_lr`` sooner). ``None`` keeps the
            module's ``configure_optimizers``, which must then include the LoRA tensors.
        weight_decay: AdamW weight decay on the LoRA tensors (paper: 0.05).
        min_lr: final learning rate of the cosine schedule (paper: 1e-5).
        num_classes: number of classes, to check class ids early; read from the module's or datamodule's
            ``num_classes`` when omitted, and always checked against the logits.
        zero_group_threshold: a group counts as zero (unselected) when its merged update ``||B A / 8||_F`` is at
            most this share of its frozen weights' norm (see :func:`~.metrics.zero_group_ratio`).
        freeze_batchnorm: keep BatchNorm layers in eval mode while forgetting, so their running statistics stay
            frozen like the rest of the model.
        eval_test: also measure the datamodule's test split before and after each task.
        output_dir: where ``history.csv``/``history.json``, ``adapted_layers.csv`` and the plots go (default
            ``<default_root_dir>/gslora``); written by global rank 0.
        plots: write PNG plots after each task (needs matplotlib).
        unload_at_end: after the last task, remove the adapters so that the model has its original layout.
        seed: seed of the LoRA initialisation of each task (independent of the global RNG, for exact resumes).
        early_stop: end a task once it is done, the Trainer's ``max_epochs`` being the cap (default ``True``; give the
            Trainer a generous ``max_epochs``, e.g. 50, the default of :func:`~.forget_sequence` and of the shipped
            config). The rule is checked at the end of every training epoch and holds when both: (1) the forgotten
            classes' accuracy on the validation split (Acc_f, the one logged as ``gslora/acc_f``) is at most
            ``stop_forget_acc``; (2) the bounded forgetting loss ``ReLU(bound - CE)`` is saturated: its mean over the
            epoch's training steps (logged as ``gslora/forget_term_epoch``) is at most ``stop_saturation * bound`` (the
            forgotten CE is at the bound, the loss no longer pushes), or it has flattened out below the bound: it fell
            by less than ``stop_plateau`` (relative) since the previous epoch. Once it holds, ``stop_cooldown`` more
            epochs (default 3) anneal the learning rate (cosine, from its value then down to ``min_lr``) and the task
            stops after them (``trainer.should_stop = True``, so ``min_epochs`` is honoured): the schedule otherwise
            spans ``max_epochs``, and stopping at a high learning rate costs retained accuracy (on the shipped MNIST
            recipe, stopping at once kept up to 4 points less Acc_r than 10 fixed epochs; with the cool-down it is
            within 1 point). The cool-down needs the callback's own optimizer (``lr`` set); with ``lr=None`` the task
            stops when the rule holds. The epoch and the reason are logged and recorded in the task's row (``epochs``,
            cool-down included, and ``stopped_by``). ``False`` trains every task for exactly ``max_epochs`` epochs, with
            the cosine schedule over them (the behaviour before the rule existed). Needs validation data (a datamodule
            or Trainer with a ``val_dataloader``); without it the rule is skipped with a warning and the task runs to
            ``max_epochs``. When the Trainer does not validate at the end of an epoch (``check_val_every_n_epoch > 1``,
            ``limit_val_batches=0``), the callback measures Acc_f on the validation data itself.
        stop_forget_acc: the Acc_f (in percent, like every accuracy here) at or below which a task counts as
            forgotten for ``early_stop``; default 1.0, i.e. 1 %.
        stop_saturation: the forgetting loss is at the bound for ``early_stop`` when its epoch mean is at most this
            share of ``bound`` (default 0.05: the forgotten CE is within 5 % of the bound on average).
        stop_plateau: the forgetting loss has flattened out for ``early_stop`` when its epoch mean fell by less
            than this share of the previous epoch's (default 0.05). A large ``bound`` may never be reached (the
            loss levels off above 0 while the forgotten CE is already far beyond what any retained class scores);
            0 switches this alternative off, so only ``stop_saturation`` counts.
        stop_cooldown: epochs of learning-rate annealing after the rule holds, before the task stops (default 3;
            never past ``max_epochs``); 0 stops at the epoch the rule holds.
        objective: the task objective (:mod:`~lightning_plugins.callbacks.gslora.objectives`): ``"auto"`` (default:
            ``"detection"`` when the module defines ``forgetting_losses``, else ``"classification"``),
            ``"classification"`` (:class:`~.objectives.ClassificationObjective`, with this callback's ``bound`` and
            ``bound_per_sample``), ``"detection"`` (:class:`~.objectives.DetectionObjective` with its defaults:
            bound 15, ``mode="bounded"``) or a :class:`~.objectives.TaskObjective` instance (in YAML:
            ``class_path``/``init_args``). Detection rows and logs use ``ap_f``/``ap_r``/``ap_o`` (AP in percent)
            where classification uses ``acc_f``/``acc_r``/``acc_o``/``acc_m``; Drop and H are computed alike.
        stop_forget_ap: detection only: the AP_f (percent) at or below which ``early_stop`` counts a task as
            forgotten (in place of ``stop_forget_acc``); ``None`` (default): 10 % of the task's AP_f before
            forgetting. The saturation test uses the detection objective's bound (``mode="bounded"``); with
            ``mode="background"`` the forgetting term has no bound and only the plateau test applies.

    Objectives and module methods: the training step is always the callback's (Lightning takes the loss from
    ``training_step``, and the module's own step cannot read ``{"retain", "forget"}`` batches), and so is
    ``configure_optimizers`` when ``lr`` is set. The evaluation steps are replaced only for the classification
    objective (the fallback that keeps classification bit-identical to the callback before objectives) or when the
    module defines no ``validation_step``/``test_step``; a detection module's own evaluation steps run unchanged
    and the callback collects its AP from its ``on_validation_batch_end``/``on_test_batch_end`` hooks, calling
    the module's ``detect``.
    """

    def __init__(
        self,
        tasks: Sequence[Sequence[int]],
        target: Union[str, Sequence[str], None] = None,
        grouping: str = "block",
        rank: int = 8,
        lora_alpha: float = 1.0,
        beta: Union[float, Sequence[float]] = 0.2,
        bound: float = 20.0,
        bound_per_sample: bool = False,
        alpha: float = 1e-4,
        proximal: bool = False,
        alpha_warmup_epochs: int = 0,
        prototypes: bool = False,
        proto_forget_weight: Union[float, Sequence[float]] = 0.01,
        proto_retain_weight: float = 0.0,
        proto_bound: float = 18.0,
        proto_distance: str = "kl",
        lr: Optional[float] = 1e-2,
        weight_decay: float = 0.05,
        min_lr: float = 1e-5,
        num_classes: Optional[int] = None,
        zero_group_threshold: float = 1e-3,
        freeze_batchnorm: bool = True,
        eval_test: bool = False,
        output_dir: Optional[str] = None,
        plots: bool = True,
        unload_at_end: bool = True,
        seed: int = 0,
        early_stop: bool = True,
        stop_forget_acc: float = 1.0,
        stop_saturation: float = 0.05,
        stop_plateau: float = 0.05,
        stop_cooldown: int = 3,
        objective: Union[str, TaskObjective] = "auto",
        stop_forget_ap: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.tasks = validate_tasks(tasks)
        compile_targets(target)
        self.target = target
        check_settings(
            self.tasks, grouping=grouping, rank=rank, lora_alpha=lora_alpha, bound=bound, proto_bound=proto_bound,
            alpha=alpha, proto_retain_weight=proto_retain_weight, weight_decay=weight_decay, min_lr=min_lr,
            zero_group_threshold=zero_group_threshold, alpha_warmup_epochs=alpha_warmup_epochs,
            proto_distance=proto_distance, lr=lr, num_classes=num_classes, early_stop=early_stop,
            stop_forget_acc=stop_forget_acc, stop_saturation=stop_saturation, stop_plateau=stop_plateau,
            stop_cooldown=stop_cooldown,
        )
        self.grouping, self.rank, self.lora_alpha = grouping, rank, float(lora_alpha)
        self.betas = PerTask("beta", beta, len(self.tasks))
        self.bound, self.bound_per_sample = float(bound), bound_per_sample
        self.alpha, self.proximal, self.alpha_warmup_epochs = float(alpha), bool(proximal), alpha_warmup_epochs
        self.prototypes = prototypes
        self.proto_forget_weights = PerTask("proto_forget_weight", proto_forget_weight, len(self.tasks))
        self.proto_retain_weight, self.proto_bound = float(proto_retain_weight), float(proto_bound)
        self.proto_distance, self.lr, self.weight_decay, self.min_lr = proto_distance, lr, weight_decay, min_lr
        self.num_classes, self.zero_group_threshold = num_classes, zero_group_threshold
        self.freeze_batchnorm, self.eval_test, self.output_dir = freeze_batchnorm, eval_test, output_dir
        self.plots, self.unload_at_end, self.seed, self.early_stop = plots, unload_at_end, seed, early_stop
        self.stop_forget_acc, self.stop_saturation = float(stop_forget_acc), float(stop_saturation)
        self.stop_plateau, self.stop_cooldown = float(stop_plateau), stop_cooldown
        check_objective(objective, stop_forget_ap)
        self.objective = objective
        self.stop_forget_ap = None if stop_forget_ap is None else float(stop_forget_ap)
        self._init_state()

    def _init_state(self) -> None:
        """The checkpointed state (before the first task) and the per-process state."""
        self._objective: Optional[TaskObjective] = None
        # checkpointed state
        self.task_index = 0
        self.history: list[dict[str, Any]] = []
        self._before: dict[int, dict[str, Optional[dict]]] = {}
        self._prototype_task: Optional[int] = None
        self._prototype_classes: Optional[torch.Tensor] = None
        self._prototype_values: Optional[torch.Tensor] = None
        self._elapsed = 0.0
        self._stop: Optional[dict[str, Any]] = None  # set when early_stop ended the current task
        # set when the rule held and the cool-down runs: its first scheduler step, its length in steps, the epoch
        # after which the task stops
        self._cooldown: Optional[dict[str, int]] = None
        self._previous_term: Optional[float] = None  # the forgetting term's mean over the previous epoch
        # per process
        self._trainer: Optional[pl.Trainer] = None
        self._module: Optional[pl.LightningModule] = None
        self._adapters: dict[str, LoRALinear] = {}
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._group_layers: dict[str, list[LoRALinear]] = {}
        self._wrapped: dict[str, Any] = {}
        self._requires_grad: Optional[list[tuple[nn.Parameter, bool]]] = None
        self._batchnorms: list[nn.Module] = []
        self._val_metric = LabelledCorrect()
        self._test_metric = LabelledCorrect()
        self._alpha_now = self.alpha
        self._steps_before_batch = 0
        self._started: Optional[float] = None
        self._task_closed = False
        self._setup_task: Optional[int] = None
        self._warned: set[str] = set()
        self._layers: list[TargetLayer] = []
        self._last_val: Optional[tuple[int, Optional[float]]] = None  # (global step, Acc_f) of the last validation
        self._forget_sum: Optional[torch.Tensor] = None  # sum of the forgetting term over this epoch's steps
        self._forget_steps = 0
        self._epoch_first_step = 0
        self._scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def finished(self) -> bool:
        """Whether every task has been forgotten and merged."""
        return self.task_index >= self.num_tasks

    def task_view(self, index: Optional[int] = None) -> TaskView:
        """Class sets of task ``index`` (default: the task being trained, or the last finished one)."""
        if index is None:
            index = min(self.task_index, self.num_tasks - 1)
        missing = getattr(self._datamodule(), "missing_classes", ()) or ()
        return view(self.tasks, index, missing)

    def task_results(self) -> list[dict[str, Any]]:
        """One row per finished task (metrics after the merge, before-task references, seconds, group stats)."""
        return [row for row in self.history if row["kind"] == "task"]

    # ---------------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module
        check_num_classes(self.tasks, self.num_classes, pl_module, trainer.datamodule)
        if stage == "fit" and self.finished:
            raise RuntimeError(
                f"all {self.num_tasks} forgetting tasks of this GSLoRA callback are done; nothing is left to fit. "
                "Create a new GSLoRA with the next tasks"
            )
        objective = self._resolve_objective(pl_module)
        if self.prototypes and not objective.supports_prototypes:
            raise TypeError(
                f"GSLoRA(prototypes=True) is not supported by the {objective.name} objective "
                f"({type(objective).__name__}); set prototypes=False"
            )
        objective.check_module(pl_module)
        if self.prototypes and not callable(getattr(pl_module, "embed", None)):
            raise TypeError(
                f"GSLoRA(prototypes=True) needs {type(pl_module).__name__}.embed(x) -> [B, d] (the features the class "
                "prototypes are built from); add such a method or set prototypes=False"
            )
        if not self.finished:
            self._attach_lora(pl_module)
        if stage == "fit":
            self._freeze(pl_module)
            self._announce_adapters(trainer, pl_module)
            self._sync_datamodule(trainer)
            self._setup_task = self.task_index
            wrap(pl_module, self._wrapped, "training_step", self._make_training_step(pl_module))
            self._wrap_eval_step(pl_module, "validation_step")
            if self.lr is not None:
                configure = self._make_configure_optimizers(trainer, pl_module)
                wrap(pl_module, self._wrapped, "configure_optimizers", configure)
        elif stage == "validate":
            self._wrap_eval_step(pl_module, "validation_step")
        elif stage == "test":
            self._wrap_eval_step(pl_module, "test_step")

    def _resolve_objective(self, pl_module: pl.LightningModule) -> TaskObjective:
        """The objective for ``pl_module`` (kept across tasks while it stays the same kind)."""
        if isinstance(self.objective, TaskObjective):
            objective = self.objective
        else:
            objective = resolve_objective(self.objective, pl_module)
            if self._objective is not None and type(self._objective) is type(objective):
                objective = self._objective
        if objective is not self._objective:
            objective.configure(self.tasks, self.bound, self.bound_per_sample)
            self._objective = objective
            self._val_metric = objective.new_metric()
            self._test_metric = objective.new_metric()
        return objective

    def _wrap_eval_step(self, pl_module: pl.LightningModule, name: str) -> None:
        if self._objective.replaces_eval_steps or user_step(pl_module, self._wrapped, name) is None:
            wrap(pl_module, self._wrapped, name, self._make_eval_step(pl_module, name))

    def _hooked_eval(self, name: str) -> bool:
        """Whether the split metric of ``name``'s loop is collected by the batch-end hook (not a replaced step)."""
        return self._objective is not None and name not in self._wrapped

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_methods(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_methods(pl_module)

    def _restore_methods(self, pl_module: pl.LightningModule) -> None:
        restore(pl_module, self._wrapped)
        self._wrapped = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._task_closed = False
        self._sync_datamodule(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        check_optimizer(trainer, self._adapters, type(self._module).__name__)
        task_view = self.task_view(self.task_index)
        if self.task_index not in self._before:
            before = {"val": self._evaluate(trainer, pl_module, "val", task_view)}
            if self.eval_test:
                before["test"] = self._evaluate(trainer, pl_module, "test", task_view)
            self._before[self.task_index] = before
            if before["val"] is not None:
                self.history.append(self._row("before", "val", task_view, trainer, before["val"], with_groups=False))
        if self.prototypes and self._prototype_task != self.task_index:
            self._compute_prototypes(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._alpha_now = 0.0 if trainer.current_epoch < self.alpha_warmup_epochs else self.alpha
        self._forget_sum, self._forget_steps = None, 0
        self._epoch_first_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.early_stop or self._task_closed or self.finished:
            return
        if self._cooldown is None:
            self._check_early_stop(trainer, pl_module)
        elif trainer.current_epoch >= self._cooldown["last_epoch"]:
            trainer.should_stop = True
            rank_zero_info(f"GSLoRA task {self.task_index}: stopping after epoch {trainer.current_epoch + 1} of at "
                           f"most {trainer.max_epochs}, at the end of the cool-down")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for module in self._batchnorms:
            module.eval()
        self._steps_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.proximal and self._alpha_now > 0 and trainer.global_step > self._steps_before_batch:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            group_soft_threshold_(list(self._groups.values()), lr * self._alpha_now)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_metric.reset()
        self._val_metric.to(pl_module.device)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test_metric.reset()
        self._test_metric.to(pl_module.device)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._hooked_eval("validation_step"):
            self._update_from_hook(trainer, pl_module, self._val_metric, batch, outputs)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._hooked_eval("test_step"):
            self._update_from_hook(trainer, pl_module, self._test_metric, batch, outputs)

    def _update_from_hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metric: Any, batch: Any,
                          outputs: Any) -> None:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            self._objective.update_metric(metric, pl_module, batch, outputs=outputs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._val_metric.reset()
            return
        fitting = trainer.state.fn == "fit"
        self._log_eval(trainer, pl_module, self._val_metric, "val" if fitting else "validate", "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_eval(trainer, pl_module, self._test_metric, "test", "test")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_task(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint taken after the task's last epoch skips the training loop (no
        # on_train_end): the task still has to be merged and closed.
        if not self._task_closed and not self.finished and trainer.fit_loop.done:
            self._finish_task(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return pack_state(self, self._elapsed_seconds())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state(state_dict, self.tasks, self.rank, self.lora_alpha)
        unpack_state(self, state_dict)
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            if self._setup_task is not None and self._setup_task != self.task_index and \
                    trainer.strategy.restore_checkpoint_after_setup:
                raise RuntimeError(
                    f"{type(trainer.strategy).__name__} restores checkpoints after the data is set up, so a "
                    f"checkpoint of task {self.task_index} cannot be resumed by a fresh GSLoRA (set up for task "
                    f"{self._setup_task}); resume with a single-device or DDP strategy"
                )
            self._sync_datamodule(trainer)

    def _elapsed_seconds(self) -> float:
        """The current task's training seconds, over all its (resumed) fits."""
        return self._elapsed + (time.perf_counter() - self._started if self._started is not None else 0.0)

    # ---------------------------------------------------------------------------------------------- LoRA + freeze
    def _lora_target(self, pl_module: pl.LightningModule) -> Any:
        if self.target is not None or self._objective is None:
            return self.target
        return self._objective.lora_target(pl_module)

    def _attach_lora(self, pl_module: pl.LightningModule) -> None:
        target = self._lora_target(pl_module)
        layers = find_target_layers(pl_module, target)
        adapters = inject_lora(pl_module, target, self.rank, self.lora_alpha)
        for i, adapter in enumerate(adapters.values()):
            if not bool(adapter.lora_B.detach().any()):
                # no pending update, so re-drawing A changes nothing now and makes it independent of the global RNG
                adapter.reset_lora(self._generator(self.task_index, i))
        self._adapters = adapters
        self._layers = layers
        self._groups = group_lora_parameters(adapters, layers, self.grouping)
        self._group_layers = group_layers(adapters, layers, self.grouping)

    def _generator(self, task: int, layer: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix(self.seed, task, layer))

    def _freeze(self, pl_module: pl.LightningModule) -> None:
        lora = {id(p) for a in self._adapters.values() for p in (a.lora_A, a.lora_B)}
        if self._requires_grad is None:
            self._requires_grad = [(p, p.requires_grad) for p in pl_module.parameters() if id(p) not in lora]
        for param in pl_module.parameters():
            param.requires_grad_(id(param) in lora)
        self._batchnorms = (
            [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if self.freeze_batchnorm else []
        )

    def _unload(self, pl_module: pl.LightningModule) -> None:
        remove_lora(pl_module, merge=True)
        for param, flag in self._requires_grad or []:
            param.requires_grad_(flag)
        self._requires_grad = None
        self._adapters, self._groups, self._group_layers, self._layers = {}, {}, {}, []

    # -------------------------------------------------------------------------------------------- method wrapping
    def _make_training_step(self, pl_module: pl.LightningModule):
        def training_step(batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self._training_step(pl_module, batch)

        return training_step

    def _make_eval_step(self, pl_module: pl.LightningModule, name: str):
        original = user_step(pl_module, self._wrapped, name)
        metric = self._test_metric if name == "test_step" else self._val_metric

        def eval_step(batch: Any, batch_idx: int = 0, dataloader_idx: Optional[int] = None) -> Any:
            output = None
            if original is not None:
                extra = () if dataloader_idx is None else (dataloader_idx,)
                output = original(batch, batch_idx, *extra)
            with torch.no_grad():
                self._objective.update_metric(metric, pl_module, batch)
            return output

        return eval_step

    def _make_configure_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        def configure_optimizers() -> dict[str, Any]:
            params = [p for p in pl_module.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            floor = min(1.0, self.min_lr / self.lr)
            planned = cosine(trainer.estimated_stepping_batches, floor)
            if planned is None:
                self._warn_once("schedule", "GSLoRA: the number of training steps is unknown (max_epochs=-1?); "
                                "using a constant learning rate")
                planned = constant
            schedule = with_cooldown(planned, floor, lambda: self._cooldown)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            self._scheduler = scheduler
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        return configure_optimizers

    # ---------------------------------------------------------------------------------------------- the objective
    def _training_step(self, pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
        task_view = self.task_view(self.task_index)
        prototypes = None
        if self.prototypes:
            prototypes = PrototypeSpec(self._prototype_classes, self._prototype_values, self.proto_bound,
                                       self.proto_forget_weights[self.task_index], self.proto_retain_weight,
                                       self.proto_distance)
        context = StepContext(task_view, beta=self.betas[self.task_index],
                              alpha=0.0 if self.proximal else self._alpha_now, alpha_now=self._alpha_now,
                              groups=list(self._groups.values()), prototypes=prototypes)
        loss = self._objective.training_loss(pl_module, batch, context)
        if self.early_stop and loss.forget_samples:
            term = loss.forget.detach()
            self._forget_sum = term if self._forget_sum is None else self._forget_sum + term
            self._forget_steps += 1
        pl_module.log_dict({f"gslora/{k}": v for k, v in loss.values.items()}, batch_size=loss.size,
                           prog_bar=False, on_step=True, on_epoch=False)
        pl_module.log("gslora/loss_epoch", loss.total, batch_size=loss.size, on_step=False, on_epoch=True,
                      prog_bar=True)
        return loss.total

    # ------------------------------------------------------------------------------------------------ prototypes
    def _compute_prototypes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = self._datamodule()
        if callable(getattr(datamodule, "prototype_dataloader", None)):
            loaders = [datamodule.prototype_dataloader()]
        else:
            loaders = _flatten_loaders(trainer.train_dataloader)
            self._warn_once("proto-loaders", "GSLoRA: the datamodule has no prototype_dataloader(); prototypes are "
                            "computed over one pass of each training dataloader")
        self._prototype_classes, self._prototype_values = class_prototypes(trainer, pl_module, loaders)
        self._prototype_task = self.task_index
        log.info("GSLoRA++ task %d: prototypes of %d classes (dim %d)", self.task_index,
                 len(self._prototype_classes), self._prototype_values.shape[1])

    # ------------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                  task_view: TaskView) -> Optional[dict]:
        loaders = self._eval_loaders(trainer, stage)
        if loaders is None:
            return None
        return evaluate_split_metrics(trainer, pl_module, self._objective, loaders, task_view)

    def _eval_loaders(self, trainer: pl.Trainer, stage: str) -> Optional[list]:
        datamodule = self._datamodule()
        if stage == "val":
            if trainer.val_dataloaders is not None:
                return _flatten_loaders(trainer.val_dataloaders)
            hook = getattr(datamodule, "val_dataloader", None)
            if datamodule is not None and is_overridden("val_dataloader", datamodule):
                return _flatten_loaders(hook())
            self._warn_once("no-val", "GSLoRA: no validation data, so the before/after-task accuracies, Drop and H "
                            "are not measured; give the Trainer a val_dataloader or a datamodule with one")
            return None
        if datamodule is None or not is_overridden("test_dataloader", datamodule):
            raise RuntimeError(
                "GSLoRA(eval_test=True) measures the datamodule's test split, but "
                f"{type(datamodule).__name__ if datamodule is not None else 'no datamodule'} offers no "
                "test_dataloader(); pass a datamodule with one or set eval_test=False"
            )
        return _flatten_loaders(datamodule.test_dataloader())

    def _log_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metric: Any, kind: str,
                  stage: str) -> None:
        if self._objective is None or not self._objective.measured(metric):
            metric.reset()
            return
        objective = self._objective
        fitting = kind == "val"
        index = self.task_index if fitting or self.task_index == 0 else self.task_index - 1
        index = min(index, self.num_tasks - 1)
        task_view = self.task_view(index)
        metrics = objective.compute_metric(metric, task_view)
        metric.reset()
        row = self._row(kind, stage, task_view, trainer, metrics, with_groups=fitting)
        self.history.append(row)
        if fitting:
            self._last_val = (trainer.global_step, row.get(objective.metric_keys[0]))
        prefix = "gslora" if fitting else f"gslora_{kind}"
        pl_module.log_dict({f"{prefix}/{k}": float(v) for k, v in _loggable(row).items()}, sync_dist=False)
        self._write_report(trainer, plots=False)

    def _row(self, kind: str, stage: str, task_view: TaskView, trainer: pl.Trainer, accuracies: dict,
             with_groups: bool) -> dict[str, Any]:
        before = (self._before.get(task_view.index) or {}).get(stage) or {}
        row = history_row(kind, stage, task_view, trainer, accuracies, before, self._metric_keys())
        if with_groups and self._groups:
            row.update(self._group_stats())
        return row

    def _metric_keys(self) -> tuple[str, ...]:
        return self._objective.metric_keys if self._objective is not None else ("acc_f", "acc_r", "acc_o", "acc_m")

    def _group_stats(self) -> dict[str, Any]:
        return group_stats(self._groups, self._group_layers, self._module, self.zero_group_threshold)

    # ---------------------------------------------------------------------------------------------- task closing
    def _finish_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._task_closed or self.finished:
            return
        index = self.task_index
        stats = self._group_stats() if self._groups else {}
        for i, adapter in enumerate(self._adapters.values()):
            adapter.merge_(self._generator(index + 1, i))
        seconds = self._elapsed_seconds()
        task_view = self.task_view(index)
        after = self._evaluate(trainer, pl_module, "val", task_view) or {}
        row = self._row("task", "val", task_view, trainer, after, with_groups=False)
        row.update(stats)
        row["epochs"] = trainer.current_epoch
        row["stopped_by"] = stopped_by(trainer, self._stop)
        row["seconds"] = seconds
        if self.eval_test:
            test_after = self._evaluate(trainer, pl_module, "test", task_view) or {}
            test_before = (self._before.get(index) or {}).get("test") or {}
            row.update(test_columns(test_after, test_before, self._metric_keys()))
        self.history.append(row)
        self.task_index += 1
        self._task_closed = True
        self._elapsed, self._started = 0.0, None
        self._stop, self._last_val, self._previous_term, self._cooldown = None, None, None, None
        self._scheduler = None
        self._prototype_task = self._prototype_classes = self._prototype_values = None
        if self.finished and self.unload_at_end:
            self._unload(pl_module)
        elif not self.finished:
            self._sync_datamodule(trainer)
        log.info("GSLoRA task %d done in %.1fs: %s", index, seconds, report.format_row(row))
        self._write_report(trainer, plots=self.plots)

    # ---------------------------------------------------------------------------------------------- early stopping
    def _check_early_stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ``early_stop`` rule, at the end of a training epoch (see the class docstring)."""
        term = epoch_mean(trainer, self._forget_sum, self._forget_steps)
        previous, self._previous_term = self._previous_term, term
        if term is None:
            self._warn_once("early-stop-no-forget", "GSLoRA(early_stop=True): an epoch had no samples to forget in "
                            "its training batches, so the forgetting loss cannot be judged and the task goes on")
            return
        pl_module.log("gslora/forget_term_epoch", term, on_step=False, on_epoch=True, sync_dist=False)
        acc_f = self._epoch_acc_f(trainer, pl_module)
        if acc_f is None:
            self._warn_once("early-stop-no-val", "GSLoRA(early_stop=True): no validation accuracy of the forgotten "
                            "classes (no val_dataloader, or no forgotten class in it), so the stopping rule cannot "
                            "be checked and every task runs to max_epochs; give the Trainer or datamodule "
                            "validation data with the forgotten classes")
            return
        saturated, why = saturation(term, previous, self._objective.saturation_bound, self.stop_saturation,
                                    self.stop_plateau)
        key = self._metric_keys()[0]
        before = ((self._before.get(self.task_index) or {}).get("val") or {}).get(key)
        threshold, threshold_name = forget_threshold(self._objective.name, key, self.stop_forget_acc,
                                                     self.stop_forget_ap, before)
        if not trainer.strategy.reduce_boolean_decision(acc_f <= threshold and saturated is not None, all=True):
            return
        epoch = trainer.current_epoch
        # the cool-down: stop_cooldown more epochs in which the callback's schedule anneals the learning rate to
        # min_lr (not past the cap; none when the module's own optimizer is used, lr=None)
        cooldown = 0
        if self.lr is not None and self._scheduler is not None:
            cooldown = cooldown_epochs(trainer, epoch, self.stop_cooldown)
        self._stop = {"epoch": epoch, key: acc_f, "forget_term": term, "saturation": saturated, "cooldown": cooldown}
        what = "ReLU(bound - CE)" if self._objective.name == "classification" else "the forgetting term"
        condition = (f"{self._objective.forget_label} {acc_f:.2f} % <= {threshold_name} {threshold:g} % and the "
                     f"forgetting loss (epoch mean of {what}) is {why}")
        if cooldown:
            steps = max(1, trainer.global_step - self._epoch_first_step) * cooldown
            self._cooldown = {"start": int(self._scheduler.last_epoch), "steps": int(steps),
                              "last_epoch": epoch + cooldown}
            rank_zero_info(
                f"GSLoRA task {self.task_index}: the stopping rule holds after epoch {epoch + 1} of at most "
                f"{trainer.max_epochs}: {condition}; {cooldown} cool-down epoch(s) anneal the learning rate to "
                f"min_lr {self.min_lr:g}, then the task stops"
            )
            return
        trainer.should_stop = True
        rank_zero_info(
            f"GSLoRA task {self.task_index}: stopping after epoch {epoch + 1} of at most {trainer.max_epochs}: "
            f"{condition}"
        )

    def _epoch_acc_f(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[float]:
        """Acc_f of this epoch: from the validation that ran after its last step, else measured now."""
        if self._last_val is not None and self._last_val[0] == trainer.global_step:
            return self._last_val[1]
        task_view = self.task_view(self.task_index)
        accuracies = self._evaluate(trainer, pl_module, "val", task_view)
        acc_f = (accuracies or {}).get(self._metric_keys()[0])
        self._last_val = (trainer.global_step, acc_f)
        return acc_f

    # ---------------------------------------------------------------------------------------------- adapted layers
    def _announce_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log, write and summarise the layers this task adapts (see :func:`~.adapted.announce_adapters`)."""
        if self._adapters:
            rows = adapter_rows(self.task_index, self._layers, self._adapters, self._groups)
            announce_adapters(trainer, pl_module, rows, self.task_index, self.rank, self.grouping,
                              self._output_dir(trainer))

    # ---------------------------------------------------------------------------------------------------- helpers
    def _datamodule(self) -> Any:
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def _sync_datamodule(self, trainer: pl.Trainer) -> None:
        if self.finished:
            return
        datamodule = trainer.datamodule
        if callable(getattr(datamodule, "set_forgetting_task", None)):
            task_view = view(self.tasks, self.task_index)
            datamodule.set_forgetting_task(self.task_index, sorted(task_view.forgotten), sorted(task_view.old))
        else:
            self._warn_once("plain-data", "GSLoRA: the training data has no set_forgetting_task(); batches (x, y) "
                            "are split by label: current and earlier task classes are forgotten, the rest retained")

    def _write_report(self, trainer: pl.Trainer, plots: bool) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        directory = self._output_dir(trainer)
        report.write_history(self.history, directory)
        if plots:
            try:
                report.plot_history(self.history, directory)
            except ImportError as err:
                self._warn_once("plots", f"GSLoRA: plots not written ({err}); pip install matplotlib")

    def _output_dir(self, trainer: pl.Trainer) -> str:
        return self.output_dir or os.path.join(trainer.default_root_dir, "gslora")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
