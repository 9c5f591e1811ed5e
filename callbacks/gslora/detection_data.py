"""Per-task data for forgetting object categories (GS-LoRA's object-detection setting).

For task ``t`` (categories ``F_t`` to forget, ``O_t`` forgotten earlier, the rest retained):

* **forget set**: training images that contain an object of ``F_t`` (all of them by default, ``forget_ratio`` or
  ``shots`` per category to subsample; with ``include_old`` also of ``O_t``), with the **forgotten annotations
  only**; each forget target also carries
  the image's retained objects as ``retained_boxes``/``retained_labels`` (the ``mode="background"`` objective of
  :class:`~lightning_plugins.callbacks.gslora.objectives.DetectionObjective` trains on those);
* **retain (replay) set**: training images that contain a retained object (``replay_ratio`` of the images of each
  retained category, or ``shots`` per category; the union over categories), with the **retained annotations
  only**: forgotten and old objects in them are background;
* **evaluation**: the wrapped module's full validation/test split, annotations untouched (AP per category splits
  it into AP_f/AP_r/AP_o).

Sampling is per category and seeded by ``(seed, task, category)``, independent of the global RNG (a resumed run
draws the same subsets); the training order is seeded by ``(seed, task, epoch)`` as in
:class:`~lightning_plugins.callbacks.ForgettingDataModule`. Training batches are
``{"retain": (images, targets), "forget": (images, targets)}`` with ``images`` a list of tensors and ``targets`` a
list of dicts (the detection batch contract); Lightning cycles the shorter loader.

Dataset protocol: items ``(image, target)`` with ``target = {"boxes": [N, 4], "labels": [N], ...}``; optionally
(faster: the images are then not loaded to read the labels) ``image_labels() -> list[set[int]]`` (the categories
present in each image) and ``annotations_of(index) -> target`` (an image's annotations without its pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

from lightning_plugins.callbacks.gslora.data import SeededRandomSampler, draw_members
from lightning_plugins.callbacks.gslora.objectives import RETAINED_BOXES, RETAINED_LABELS
from lightning_plugins.callbacks.gslora.tasks import TaskView

log = logging.getLogger(__name__)


def detection_collate(batch: Sequence[tuple[Any, dict]]) -> tuple[list, list]:
    """``(images, targets)`` as two lists (images of different sizes stay separate tensors)."""
    return [item[0] for item in batch], [item[1] for item in batch]


def image_labels(dataset: Dataset) -> list[set[int]]:
    """The categories present in each image: ``dataset.image_labels()``, else ``annotations_of(i)["labels"]``,
    else read from ``dataset[i][1]["labels"]`` (loads every image once)."""
    method = getattr(dataset, "image_labels", None)
    if callable(method):
        return [set(int(c) for c in labels) for labels in method()]
    annotations = getattr(dataset, "annotations_of", None)
    if not callable(annotations):
        log.info("%s has no image_labels()/annotations_of(): reading every item once to get its labels",
                 type(dataset).__name__)
    out = []
    for index in range(len(dataset)):  # type: ignore[arg-type]
        target = annotations(index) if callable(annotations) else _target_of(dataset[index], index, dataset)
        out.append(set(int(c) for c in torch.as_tensor(target["labels"]).flatten().tolist()))
    return out


def _target_of(item: Any, index: int, dataset: Dataset) -> dict:
    if not isinstance(item, (tuple, list)) or len(item) < 2 or not isinstance(item[1], dict) \
            or "labels" not in item[1]:
        raise TypeError(
            f"{type(dataset).__name__}[{index}] is not (image, target) with target a dict holding 'boxes' and "
            "'labels'; detection forgetting needs such items"
        )
    return item[1]


def filter_target(target: dict, keep: Sequence[int], extra: Optional[Sequence[int]] = None) -> dict:
    """``target`` with only the objects whose label is in ``keep`` (every per-object tensor, i.e. each value with
    as many rows as there are labels, is filtered alike); with ``extra``, the objects of those classes are added
    as ``retained_boxes``/``retained_labels``."""
    labels = torch.as_tensor(target["labels"])
    count = labels.shape[0]
    mask = torch.isin(labels, torch.tensor(sorted(keep), dtype=labels.dtype)) if len(keep) else \
        torch.zeros(count, dtype=torch.bool)
    out = {}
    for key, value in target.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == count:
            out[key] = value[mask]
        else:
            out[key] = value
    if extra is not None:
        other = torch.isin(labels, torch.tensor(sorted(extra), dtype=labels.dtype)) if len(extra) else \
            torch.zeros(count, dtype=torch.bool)
        out[RETAINED_BOXES] = torch.as_tensor(target["boxes"])[other]
        out[RETAINED_LABELS] = labels[other]
    return out


class FilteredDetectionDataset(Dataset):
    """Images ``indices`` of ``dataset`` with only the annotations of the ``keep`` classes (and, with ``extra``,
    those classes' objects as ``retained_boxes``/``retained_labels``)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], keep: Sequence[int],
                 extra: Optional[Sequence[int]] = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.keep = sorted(keep)
        self.extra = None if extra is None else sorted(extra)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        image, target = self.dataset[self.indices[index]][:2]
        return image, filter_target(target, self.keep, self.extra)


@dataclass(frozen=True)
class DetectionTaskSamples:
    """Training image indices of one task (sorted) and the class sets their annotations are filtered to."""

    forget: list[int]
    retain: list[int]
    forgotten: tuple[int, ...]
    retained: tuple[int, ...]


def select_detection_samples(labels_per_image: Sequence[set[int]], view: TaskView, replay_ratio: float = 0.1,
                             forget_ratio: float = 1.0, shots: Optional[int] = None, seed: int = 0,
                             include_old: bool = False) -> DetectionTaskSamples:
    """Forget and retain image indices of a task, drawn per category (see the module docstring).

    With ``shots``, each category contributes ``shots`` of its images (all, with a warning, if it has fewer);
    otherwise ``max(1, round(ratio * n))`` of its ``n`` images. An image drawn for several categories counts once.

    Raises:
        ValueError: a category to forget appears in no training image, or no retained category does.
    """
    by_class: dict[int, list[int]] = {}
    for index, labels in enumerate(labels_per_image):
        for label in labels:
            by_class.setdefault(int(label), []).append(index)
    empty = sorted(c for c in view.forgotten if c not in by_class)
    if empty:
        raise ValueError(
            f"category(ies) {empty} of task {view.index} appear in no training image, so there is nothing to "
            "forget them with; remove them from the task or add their data"
        )
    forget: set[int] = set()
    retain: set[int] = set()
    retained: list[int] = []
    for label in sorted(by_class):
        split = view.split_of(label)
        if split == "missing" or (split == "old" and not include_old):
            continue
        if split == "retained":
            retained.append(label)
        forgetting = split in ("forgotten", "old")
        drawn = draw_members(by_class[label], (seed, view.index, label), shots,
                             forget_ratio if forgetting else replay_ratio, f"category {label} is in %d training images")
        (forget if forgetting else retain).update(drawn)
    if not retain:
        raise ValueError(
            f"task {view.index} leaves no retained category in any training image; GS-LoRA needs replay data of at "
            "least one retained category"
        )
    forgotten = set(view.forgotten) | (set(view.old) if include_old else set())
    return DetectionTaskSamples(sorted(forget), sorted(retain), tuple(sorted(forgotten)), tuple(retained))


class DetectionForgettingDataModule(pl.LightningDataModule):
    """Per-task forget/retain training sets and the full evaluation splits, around a detection DataModule.

    Implements the forgetting-data protocol of the ``GSLoRA`` callback (:meth:`set_forgetting_task`, like
    :class:`~lightning_plugins.callbacks.ForgettingDataModule`); see the module docstring for what each set holds.

    Args:
        datamodule: the detection DataModule to wrap (set up on demand; its ``train_set``/``val_set``/``test_set``
            or ``train_dataset``/... attributes are used, else its dataloaders' datasets).
        replay_ratio: share of each retained category's training images replayed (paper: 0.1).
        shots: few-shot setting: this many images per category, forgotten and retained (paper: 32).
        batch_size: images per retain batch and per forget batch (a step sees one of each).
        seed: seed of the per-task subsets and of the shuffling.
        forget_ratio: share of each forgotten category's images used (default 1.0: all of them).
        eval_batch_size: images per validation/test batch (default ``batch_size``).
        num_workers: DataLoader workers.
        include_old: keep forgetting the categories of earlier tasks: their images join the forget set (drawn like
            the current ones) with their objects among the forgotten annotations. Without it (default, the paper's
            setting) nothing in a later task holds them down, and a dense detector's earlier-forgotten categories
            can come back (AP_o).
    """

    def __init__(self, datamodule: pl.LightningDataModule, replay_ratio: float = 0.1, shots: Optional[int] = None,
                 batch_size: int = 4, seed: int = 0, forget_ratio: float = 1.0,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, include_old: bool = False) -> None:
        super().__init__()
        for name, value in (("replay_ratio", replay_ratio), ("forget_ratio", forget_ratio)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
            raise ValueError(f"shots must be an integer >= 1 (or None for ratios), got {shots!r}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size!r} / {eval_batch_size!r}")
        self.datamodule = datamodule
        self.replay_ratio = replay_ratio
        self.shots = shots
        self.forget_ratio = forget_ratio
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.include_old = bool(include_old)
        self.missing_classes: tuple[int, ...] = ()
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self._labels: Optional[list[set[int]]] = None
        self._view: Optional[TaskView] = None
        self._samples: Optional[DetectionTaskSamples] = None

    # -- data ----------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        if self._labels is not None:
            return
        self.datamodule.setup(stage)
        self.train_set = self._wrapped_set("train")
        self.val_set = self._wrapped_set("val")
        self.test_set = self._wrapped_set("test", required=False)
        self._labels = image_labels(self.train_set)

    def _wrapped_set(self, split: str, required: bool = True) -> Optional[Dataset]:
        dm = self.datamodule
        for attr in (f"{split}_set", f"{split}_dataset"):
            if getattr(dm, attr, None) is not None:
                return getattr(dm, attr)
        hook = getattr(dm, f"{split}_dataloader", None)
        try:
            loader = hook() if callable(hook) else None
        except (NotImplementedError, RuntimeError, MisconfigurationException):
            loader = None
        if isinstance(loader, DataLoader):
            return loader.dataset
        if required:
            raise ValueError(
                f"{type(dm).__name__} exposes no {split} data: give it a `{split}_set` attribute or a "
                f"{split}_dataloader()"
            )
        return None

    @property
    def num_classes(self) -> Optional[int]:
        """The wrapped datamodule's ``num_classes``, else the largest training label + 1 (after setup)."""
        declared = getattr(self.datamodule, "num_classes", None)
        if isinstance(declared, int):
            return declared
        if self._labels is None:
            return None
        return max((max(labels) for labels in self._labels if labels), default=-1) + 1

    # -- the task protocol (called by GSLoRA) ---------------------------------------------------------------------
    def set_forgetting_task(self, index: int, forgotten: Sequence[int], old: Sequence[int]) -> None:
        """Select task ``index``: ``forgotten`` are the categories to forget now, ``old`` those forgotten before."""
        new_view = TaskView(index, frozenset(forgotten), frozenset(old))
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

    def task_samples(self) -> DetectionTaskSamples:
        """The forget and retain training images of the current task (drawn once per task)."""
        self._require_setup()
        if self._samples is None:
            self._samples = select_detection_samples(self._labels, self.task, self.replay_ratio, self.forget_ratio,
                                                     self.shots, self.seed, self.include_old)
            log.info("detection forgetting task %d: %d images to forget, %d retained for replay", self.task.index,
                     len(self._samples.forget), len(self._samples.retain))
        return self._samples

    def forget_dataset(self) -> Dataset:
        """Forget images with their forgotten annotations only (retained objects as ``retained_*``)."""
        samples = self.task_samples()
        return FilteredDetectionDataset(self.train_set, samples.forget, samples.forgotten, extra=samples.retained)

    def retain_dataset(self) -> Dataset:
        """Replay images with their retained annotations only."""
        samples = self.task_samples()
        return FilteredDetectionDataset(self.train_set, samples.retain, samples.retained)

    # -- loaders -------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> dict[str, DataLoader]:
        offset = 1000 * (self.task.index + 1)
        return {
            "retain": self._loader(self.retain_dataset(), self.batch_size, self.seed + offset),
            "forget": self._loader(self.forget_dataset(), self.batch_size, self.seed + offset + 500),
        }

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._eval_set("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_set("test"), self.eval_batch_size)

    def _eval_set(self, stage: str) -> Dataset:
        self._require_setup()
        dataset = self.val_set if stage == "val" else self.test_set
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {stage} data: the wrapped datamodule offers none")
        return dataset

    def _loader(self, dataset: Dataset, batch_size: int, seed: Optional[int] = None) -> DataLoader:
        sampler = SeededRandomSampler(len(dataset), seed) if seed is not None else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=detection_collate)

    def _require_setup(self) -> None:
        if self._labels is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run first (the Trainer calls it)")
