"""In-memory labelled image datasets and seeded stratified splits."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate


class LabelledImageDataset(Dataset):
    """Images ``[N, C, H, W]`` (float in [0, 1]) with integer labels, held in memory.

    ``targets`` is a plain list of ints, so per-class subsets (e.g. for forgetting) are cheap to take with
    :meth:`select`, which keeps the labels visible (unlike ``torch.utils.data.Subset``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int] | torch.Tensor,
        classes: Optional[Sequence[str]] = None,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {list(images.shape)}")
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.ndim != 1 or len(targets) != len(images):
            raise ValueError(f"need one label per image: {len(images)} images, labels of shape {list(targets.shape)}")
        if len(targets) and targets.min() < 0:
            raise ValueError(f"labels must be >= 0, found {int(targets.min())}")
        self.images = images
        self.targets: list[int] = targets.tolist()
        num_classes = (max(self.targets) + 1) if self.targets else 0
        self.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def select(self, indices: Sequence[int], transform: Optional[Callable] = ...) -> "LabelledImageDataset":
        """A new dataset with the given rows (same classes; same transform unless one is given)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return LabelledImageDataset(
            self.images[index],
            [self.targets[i] for i in index.tolist()],
            self.classes,
            self.transform if transform is ... else transform,
        )


def stratified_split(
    targets: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Split indices into parts with the given fractions, class by class, reproducibly.

    Every class is split with the same fractions (rounded, last part takes the rest), so each part has the
    class balance of the whole. Parts are returned sorted.
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(targets), dtype=torch.long)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        start = 0
        for part, fraction in zip(parts[:-1], fractions[:-1]):
            count = round(fraction * len(members))
            part.extend(members[start:start + count])
            start += count
        parts[-1].extend(members[start:])
    return [sorted(part) for part in parts]


class RandomAffineBatch:
    """Random translation, rotation and scaling of a whole batch ``[B, C, H, W]`` at once (one draw per image).

    Vectorized with ``affine_grid``/``grid_sample``; edges are filled by repeating the border pixels, which is
    the background for centred digit/face crops whether or not the images are already normalized.

    Args:
        max_shift: largest translation in pixels along each axis.
        max_rotation: largest rotation in degrees.
        max_scale: largest relative zoom, e.g. 0.1 for a factor in [0.9, 1.1].
    """

    def __init__(self, max_shift: float = 0.0, max_rotation: float = 0.0, max_scale: float = 0.0) -> None:
        for name, value in (("max_shift", max_shift), ("max_rotation", max_rotation), ("max_scale", max_scale)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if max_scale >= 1:
            raise ValueError(f"max_scale must be < 1, got {max_scale}")
        self.max_shift = max_shift
        self.max_rotation = max_rotation
        self.max_scale = max_scale

    @property
    def active(self) -> bool:
        return bool(self.max_shift or self.max_rotation or self.max_scale)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return images
        batch, _, height, width = images.shape

        def uniform(bound: float) -> torch.Tensor:
            return (torch.rand(batch) * 2 - 1) * bound

        angle = uniform(self.max_rotation) * math.pi / 180
        zoom = 1 + uniform(self.max_scale)
        # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2 s / size
        shift_x, shift_y = uniform(self.max_shift) * 2 / width, uniform(self.max_shift) * 2 / height
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = torch.cos(angle) / zoom
        theta[:, 0, 1] = -torch.sin(angle) / zoom
        theta[:, 1, 0] = torch.sin(angle) / zoom
        theta[:, 1, 1] = torch.cos(angle) / zoom
        theta[:, 0, 2] = shift_x
        theta[:, 1, 2] = shift_y
        grid = nn.functional.affine_grid(theta.to(images), list(images.shape), align_corners=False)
        return nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)


class AugmentingCollate:
    """``default_collate`` followed by a batch augmentation of the images (picklable for worker processes)."""

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.augment = augment

    def __call__(self, samples: list) -> list:
        images, labels = default_collate(samples)
        return [self.augment(images), labels]


class Normalize:
    """Per-channel ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std
