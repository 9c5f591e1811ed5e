"""Forgetting tasks: validation of the class sequence and the class sets seen at one point of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence


@dataclass(frozen=True)
class TaskView:
    """The class sets at task ``index``: ``forgotten`` by this task, ``old`` = forgotten by earlier tasks.

    Every other class is *retained*; ``missing`` are retained classes without training samples.
    """

    index: int
    forgotten: frozenset[int]
    old: frozenset[int]
    missing: frozenset[int] = frozenset()

    def split_of(self, label: int) -> str:
        """``"forgotten"``, ``"old"``, ``"missing"`` or ``"retained"``."""
        if label in self.forgotten:
            return "forgotten"
        if label in self.old:
            return "old"
        if label in self.missing:
            return "missing"
        return "retained"


def validate_tasks(tasks: Sequence[Iterable[int]]) -> tuple[tuple[int, ...], ...]:
    """Check a task sequence and return it as tuples of ints.

    Raises:
        TypeError: ``tasks`` is not a list of lists of integers.
        ValueError: no task, an empty task, a negative class id, a class repeated in a task, or a class that
            appears in two tasks (a class can be forgotten only once).
    """
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of class-id lists, e.g. [[0, 1], [2, 3]]; got {tasks!r}")
    if len(tasks) == 0:
        raise ValueError("tasks is empty: give at least one forgetting task, e.g. tasks=[[0, 1]]")
    checked: list[tuple[int, ...]] = []
    first_seen: dict[int, int] = {}
    for index, task in enumerate(tasks):
        if isinstance(task, (str, bytes)) or not isinstance(task, Iterable):
            raise TypeError(f"task {index} must be a list of class ids, got {task!r}")
        classes = list(task)
        if not classes:
            raise ValueError(f"task {index} is empty: every task must name at least one class to forget")
        for cls in classes:
            if isinstance(cls, bool) or not isinstance(cls, int):
                raise TypeError(f"task {index} holds {cls!r} ({type(cls).__name__}); class ids must be integers")
            if cls < 0:
                raise ValueError(f"task {index} holds class id {cls}; class ids must be >= 0")
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise ValueError(f"task {index} lists class(es) {repeated} more than once; list each class once")
        for cls in classes:
            if cls in first_seen:
                raise ValueError(
                    f"class {cls} is in task {first_seen[cls]} and again in task {index}: tasks overlap, and a "
                    "class can be forgotten only once. Remove it from one of the tasks"
                )
            first_seen[cls] = index
        checked.append(tuple(classes))
    return tuple(checked)


def check_class_range(tasks: Sequence[Sequence[int]], num_classes: int, source: str) -> None:
    """Raise ``ValueError`` if a class id of ``tasks`` is ``>= num_classes`` (``source`` says where it came from)."""
    for index, task in enumerate(tasks):
        bad = sorted(c for c in task if c >= num_classes)
        if bad:
            raise ValueError(
                f"task {index} holds class id(s) {bad}, out of range for {num_classes} classes ({source}); "
                f"class ids must be in [0, {num_classes - 1}]"
            )


def view(tasks: Sequence[Sequence[int]], index: int, missing: Optional[Iterable[int]] = None) -> TaskView:
    """The :class:`TaskView` of task ``index``."""
    old = frozenset(c for task in tasks[:index] for c in task)
    return TaskView(index, frozenset(tasks[index]), old, frozenset(missing or ()))
