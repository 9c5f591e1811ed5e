"""Per-task data for continual forgetting, built from any labelled datasets or an existing DataModule.

For task ``t`` (classes ``F_t`` to forget, classes ``O_t`` forgotten earlier):

* **forget subset**: training samples of ``F_t`` (a ratio of them, or ``shots`` per class);
* **retain replay subset**: training samples of the retained classes (a ratio, or ``shots`` per class); the
  ``missing_classes`` get none (the paper's missing-data setting), old classes get none;
* **evaluation splits**: forgotten (``F_t``), retained (the rest, with data), old (``O_t``), missing.

Sampling is per class and seeded by ``(seed, task)``, independent of the global RNG, so it does not depend on
how the model was built (a pitfall of the reference code) and a resumed run draws the same subsets. Training
batches are ``{"retain": (x, y), "forget": (x, y)}``; Lightning cycles the shorter loader ("max_size_cycle"),
as the reference does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from lightning_plugins.callbacks.gslora.tasks import TaskView

log = logging.getLogger(__name__)


def _mix(*values: int) -> int:
    """A seed from several integers (deterministic across processes, unlike ``hash`` of strings)."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
    return seed


class SeededRandomSampler(Sampler[int]):
    """Random order drawn from ``(seed, epoch, draw)`` only: the same order in a resumed run.

    Lightning calls :meth:`set_epoch` at every epoch start. ``draw`` counts the passes within an epoch (a cycled
    loader is iterated more than once per epoch), so each pass gets its own order.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0
        self._draw = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._draw = 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, self._draw))
        self._draw += 1
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def dataset_targets(dataset: Dataset) -> list[int]:
    """Integer labels of a dataset: its ``targets`` attribute (also through ``Subset``/``ConcatDataset``), else
    read once from ``dataset[i][1]``."""
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [t for part in dataset.datasets for t in dataset_targets(part)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)]
    log.info("%s has no `targets` attribute: reading every item once to get its labels", type(dataset).__name__)
    labels = []
    for index in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(
                f"{type(dataset).__name__}[{index}] is a {type(item).__name__}; forgetting needs (input, label) "
                "items or a `targets` attribute"
            )
        labels.append(int(item[1]))
    return labels


def class_split_indices(targets: Sequence[int], view: TaskView) -> dict[str, list[int]]:
    """Indices of ``targets`` in each evaluation split: forgotten, retained, old, missing."""
    out: dict[str, list[int]] = {"forgotten": [], "retained": [], "old": [], "missing": []}
    for index, label in enumerate(targets):
        out[view.split_of(int(label))].append(index)
    return out


def draw_members(members: Sequence[int], seed: tuple[int, ...], shots: Optional[int], ratio: float,
                 what: str) -> list[int]:
    """A seeded draw from one class's sample indices: ``shots`` of them (all, with a warning naming ``what``, if
    there are fewer) or ``max(1, round(ratio * n))``. The order depends only on ``seed`` (e.g. seed, task, class)."""
    shuffled = torch.tensor(list(members))
    generator = torch.Generator().manual_seed(_mix(*seed))
    shuffled = shuffled[torch.randperm(len(shuffled), generator=generator)].tolist()
    if shots is None:
        return shuffled[:max(1, round(ratio * len(shuffled)))]
    if len(shuffled) < shots:
        log.warning("%s, fewer than shots=%d: using all", what % len(shuffled), shots)
    return shuffled[:shots]


@dataclass(frozen=True)
class TaskSamples:
    """Training indices of one task: ``forget`` and ``retain`` (replay), each sorted."""

    forget: list[int]
    retain: list[int]


def select_task_samples(
    targets: Sequence[int],
    view: TaskView,
    replay_ratio: float = 0.1,
    forget_ratio: Optional[float] = None,
    shots: Optional[int] = None,
    seed: int = 0,
) -> TaskSamples:
    """Draw the forget and retain-replay training indices of a task, class by class.

    With ``shots`` every class contributes exactly ``shots`` samples (all of them, with a warning, if it has fewer);
    otherwise a class with ``n`` samples contributes ``max(1, round(ratio * n))`` (``forget_ratio`` for the classes
    to forget, default ``replay_ratio``). Old and missing classes contribute nothing.

    Raises:
        ValueError: a class to forget has no training sample, or no retained class has one.
    """
    forget_ratio = replay_ratio if forget_ratio is None else forget_ratio
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(int(label), []).append(index)
    empty = sorted(c for c in view.forgotten if c not in by_class)
    if empty:
        raise ValueError(
            f"class(es) {empty} of task {view.index} have no training samples, so there is nothing to forget them "
            "with; remove them from the task or add their data"
        )
    forget, retain = [], []
    for label in sorted(by_class):
        split = view.split_of(label)
        if split in ("old", "missing"):
            continue
        ratio = forget_ratio if split == "forgotten" else replay_ratio
        drawn = draw_members(by_class[label], (seed, view.index, label), shots, ratio,
                             f"class {label} has %d training samples")
        (forget if split == "forgotten" else retain).extend(drawn)
    if not retain:
        raise ValueError(
            f"task {view.index} leaves no retained class with training samples (all classes are forgotten, old or "
            "missing); GS-LoRA needs replay data of at least one retained class"
        )
    return TaskSamples(sorted(forget), sorted(retain))


class ForgettingDataModule(pl.LightningDataModule):
    """Training subsets per forgetting task and full evaluation sets, around any labelled data.

    Give either ``datamodule`` (set up on demand; its ``train_set``/``val_set``/``test_set`` or
    ``train_dataset``/... attributes are used, else its dataloaders' datasets) or the datasets themselves. Items
    are ``(input, label)``. The :class:`~lightning_plugins.callbacks.GSLoRA` callback tells this module the
    current task through :meth:`set_forgetting_task` (the protocol a custom DataModule can implement too).

    Args:
        datamodule: a DataModule to wrap.
        train_set: training data (instead of ``datamodule``).
        val_set: validation data (instead of ``datamodule``).
        test_set: test data (optional).
        replay_ratio: share of each retained class's training samples replayed (paper: 0.1).
        forget_ratio: share of each forgotten class's training samples used (default: ``replay_ratio``).
        shots: few-shot setting: exactly this many samples per class, forgotten and retained (overrides ratios).
        missing_classes: retained classes given no training samples at all (the paper's missing-data setting).
        batch_size: batch size of the retain and of the forget loader (a step sees one of each).
        eval_batch_size: batch size for validation/test (default ``batch_size``).
        seed: seed of the per-task subsets and of the shuffling.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        datamodule: Optional[pl.LightningDataModule] = None,
        train_set: Optional[Dataset] = None,
        val_set: Optional[Dataset] = None,
        test_set: Optional[Dataset] = None,
        replay_ratio: float = 0.1,
        forget_ratio: Optional[float] = None,
        shots: Optional[int] = None,
        missing_classes: Sequence[int] = (),
        batch_size: int = 48,
        eval_batch_size: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (datamodule is None) == (train_set is None):
            raise ValueError("give exactly one of datamodule=... or train_set=... (with val_set=...)")
        if datamodule is None and val_set is None:
            raise ValueError("val_set is needed with train_set: the forgetting metrics are measured on it")
        for name, value in (("replay_ratio", replay_ratio), ("forget_ratio", forget_ratio)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
            raise ValueError(f"shots must be an integer >= 1 (or None for ratios), got {shots!r}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size!r} / {eval_batch_size!r}")
        bad = [c for c in missing_classes if isinstance(c, bool) or not isinstance(c, int) or c < 0]
        if bad:
            raise ValueError(f"missing_classes must be class ids >= 0, got {bad}")
        self.datamodule = datamodule
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.replay_ratio = replay_ratio
        self.forget_ratio = forget_ratio
        self.shots = shots
        self.missing_classes: tuple[int, ...] = tuple(sorted(set(missing_classes)))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._train_targets: Optional[list[int]] = None
        self._view: Optional[TaskView] = None
        self._samples: Optional[TaskSamples] = None

    # -- data ----------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.datamodule is not None:
            self.datamodule.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train_targets is not None:
            return
        if self.datamodule is not None:
            self.datamodule.setup(stage)
            self.train_set = self._wrapped_set("train")
            self.val_set = self._wrapped_set("val")
            self.test_set = self._wrapped_set("test", required=False)
        self._train_targets = dataset_targets(self.train_set)
        present = set(self._train_targets)
        absent = [c for c in self.missing_classes if c not in present]
        if absent:
            raise ValueError(
                f"missing_classes {absent} have no training samples at all; missing classes are retained classes "
                f"whose samples are withheld. Classes present: {sorted(present)}"
            )

    def _wrapped_set(self, split: str, required: bool = True) -> Optional[Dataset]:
        dm = self.datamodule
        for attr in (f"{split}_set", f"{split}_dataset"):
            if getattr(dm, attr, None) is not None:
                return getattr(dm, attr)
        hook = getattr(dm, f"{split}_dataloader", None)
        try:
            loader = hook() if callable(hook) else None
        except (NotImplementedError, RuntimeError):
            loader = None
        if isinstance(loader, DataLoader):
            return loader.dataset
        if required:
            raise ValueError(
                f"{type(dm).__name__} exposes no {split} data: give it a `{split}_set` attribute or a "
                f"{split}_dataloader(), or pass {split}_set=... to ForgettingDataModule"
            )
        return None

    @property
    def num_classes(self) -> int:
        """Number of classes: the wrapped datamodule's ``num_classes``, else the largest training label + 1."""
        declared = getattr(self.datamodule, "num_classes", None)
        if isinstance(declared, int):
            return declared
        self._require_setup()
        return max(self._train_targets) + 1  # type: ignore[arg-type]

    # -- the task protocol (called by GSLoRA) ---------------------------------------------------------------------
    def set_forgetting_task(self, index: int, forgotten: Sequence[int], old: Sequence[int]) -> None:
        """Select task ``index``: ``forgotten`` are the classes to forget now, ``old`` those forgotten before."""
        clash = sorted(set(forgotten) & set(self.missing_classes))
        if clash:
            raise ValueError(
                f"class(es) {clash} of task {index} are also missing_classes (retained without data); a class to "
                "forget needs training samples. Remove them from missing_classes or from the task"
            )
        new_view = TaskView(index, frozenset(forgotten), frozenset(old), frozenset(self.missing_classes))
        if new_view != self._view:
            self._view, self._samples = new_view, None

    @property
    def task(self) -> TaskView:
        if self._view is None:
            raise RuntimeError(
                "no forgetting task is selected: attach the GSLoRA callback to the Trainer, or call "
                "set_forgetting_task(index, forgotten, old) first"
            )
        return self._view

    def task_samples(self) -> TaskSamples:
        """The forget and retain training indices of the current task (drawn once per task)."""
        self._require_setup()
        if self._samples is None:
            self._samples = select_task_samples(
                self._train_targets, self.task, self.replay_ratio, self.forget_ratio, self.shots, self.seed
            )
            log.info("forgetting task %d: %d samples to forget, %d retained for replay", self.task.index,
                     len(self._samples.forget), len(self._samples.retain))
        return self._samples

    def forget_dataset(self) -> Dataset:
        return Subset(self.train_set, self.task_samples().forget)

    def retain_dataset(self) -> Dataset:
        return Subset(self.train_set, self.task_samples().retain)

    def retained_full_dataset(self) -> Dataset:
        """All training samples of the retained classes with data (for a retrain-from-scratch baseline)."""
        self._require_setup()
        split = class_split_indices(self._train_targets, self.task)  # type: ignore[arg-type]
        return Subset(self.train_set, split["retained"])

    def eval_splits(self, stage: str = "val") -> dict[str, Dataset]:
        """``{"forgotten", "retained", "old", "missing"}`` subsets of the validation (or ``"test"``) data."""
        dataset = self._eval_set(stage)
        split = class_split_indices(dataset_targets(dataset), self.task)
        return {name: Subset(dataset, indices) for name, indices in split.items()}

    # -- loaders -------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> dict[str, DataLoader]:
        offset = 1000 * (self.task.index + 1)
        return {
            "retain": self._loader(self.retain_dataset(), self.batch_size, SeededRandomSampler, self.seed + offset),
            "forget": self._loader(self.forget_dataset(), self.batch_size, SeededRandomSampler,
                                   self.seed + offset + 500),
        }

    def prototype_dataloader(self) -> DataLoader:
        """Forget and retain training subsets of the task, in order (for the GS-LoRA++ class prototypes)."""
        return self._loader(ConcatDataset([self.forget_dataset(), self.retain_dataset()]), self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._eval_set("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_set("test"), self.eval_batch_size)

    def _eval_set(self, stage: str) -> Dataset:
        self._require_setup()
        if stage not in ("val", "test"):
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        dataset = self.val_set if stage == "val" else self.test_set
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {stage} data; pass {stage}_set=... or a datamodule with it"
            )
        return dataset

    def _loader(self, dataset: Dataset, batch_size: int, sampler_cls: Any = None, seed: int = 0) -> DataLoader:
        sampler = sampler_cls(len(dataset), seed) if sampler_cls is not None else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _require_setup(self) -> None:
        if self._train_targets is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run first (the Trainer calls it)")
