"""``FaceDataModule``: face identities for training and identification, pair sets for verification.

Sources: the embedded instance identities (``"lfw_subset"``, see :mod:`.embedded`), identity folders
``root/<identity>/<image>`` (optionally detected and aligned with MTCNN, cached), InsightFace RecordIO folders
(``train.rec`` + ``train.idx`` + ``property``, read without mxnet) and tensor files. Verification sets: InsightFace
``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``) and, for the embedded data, pairs of faces never
trained on. Every image reaches the model as ``[3, S, S]`` scaled to [-1, 1] (``(x / 255 - 0.5) / 0.5``, as
insightface does).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_plugins.modules.data.classification import IMAGE_SUFFIXES
from lightning_plugins.modules.data.datasets import AugmentingCollate, LabelledImageDataset, stratified_split
from lightning_plugins.modules.face.embedded import instance_identity_split
from lightning_plugins.modules.face.formats import InsightFaceRecordDataset, read_verification_bin

log = logging.getLogger(__name__)

EMBEDDED = "lfw_subset"


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` (or float in [0, 1]) -> float ``[..., 3, size, size]`` in [-1, 1]."""
    batched = images if images.ndim == 4 else images.unsqueeze(0)
    pixels = batched.float() / 255.0 if batched.dtype == torch.uint8 else batched.float()
    if pixels.shape[-2:] != (size, size):
        pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0.0, 1.0)
    pixels = (pixels - 0.5) / 0.5
    return pixels if images.ndim == 4 else pixels[0]


class ToModelInput:
    """Per-item transform: :func:`to_model_input` at a fixed size (picklable for DataLoader workers)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return to_model_input(image, self.size)


class RandomHorizontalFlip:
    """Mirror each image of a batch with probability 1/2 (the only augmentation of insightface's recipe)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mirror = torch.rand(images.shape[0], device=images.device) < 0.5
        return torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)


class VerificationPairs(Dataset):
    """Pairs ``(image_a, image_b, issame, index)`` from images ``[2N, 3, H, W]`` (pair i = rows 2i, 2i+1)."""

    def __init__(self, images: torch.Tensor, issame: torch.Tensor, size: int) -> None:
        if images.ndim != 4 or images.shape[0] != 2 * len(issame):
            raise ValueError(f"need 2 images per pair: {len(issame)} pairs, images of shape {list(images.shape)}")
        self.images, self.issame, self.size = images, issame.bool(), size

    def __len__(self) -> int:
        return len(self.issame)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        first, second = self.images[2 * index], self.images[2 * index + 1]
        return to_model_input(first, self.size), to_model_input(second, self.size), self.issame[index], index


class FaceFolderDataset(Dataset):
    """Images listed by path with identity labels, decoded lazily (RGB) to uint8 ``[3, H, W]``, then ``transform``."""

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], transform: Optional[Callable] = None) -> None:
        self.paths, self.targets, self.transform = list(paths), [int(t) for t in targets], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            pixels = torch.from_numpy(_rgb_array(image)).permute(2, 0, 1).contiguous()
        return (self.transform(pixels) if self.transform else pixels), self.targets[index]


def _rgb_array(image: Image.Image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def heldout_pairs(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every same-identity pair of ``labels`` plus as many distinct different-identity pairs, drawn with ``seed``.

    Returns ``(pairs [P, 2] indices, issame [P])``, same and different pairs alternating.
    """
    same = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels)) if labels[i] == labels[j]]
    if not same:
        raise ValueError("the held-out identities need at least 2 views each to form same-identity pairs")
    generator = torch.Generator().manual_seed(seed)
    different: set[tuple[int, int]] = set()
    while len(different) < len(same):
        i, j = sorted(torch.randint(len(labels), (2,), generator=generator).tolist())
        if labels[i] != labels[j]:
            different.add((i, j))
    # alternate same and different pairs, so every contiguous fold of the 10-fold protocol holds both kinds
    pairs = [pair for both in zip(same, sorted(different)) for pair in both]
    return torch.tensor(pairs), torch.tensor([True, False] * len(same))


def identity_folders(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """``root/<identity>/<image>`` -> (image paths, identity labels, identity names); non-images are counted."""
    identities = sorted(entry for entry in root.iterdir() if entry.is_dir())
    if not identities:
        raise ValueError(f"{root} has no identity sub-folders; expected {root}/<identity>/<image files>")
    paths, labels, names, empty, ignored = [], [], [], [], 0
    for folder in identities:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += len(files) - len(images)
        if not images:
            empty.append(folder.name)
            continue
        paths.extend(images)
        labels.extend([len(names)] * len(images))
        names.append(folder.name)
    if ignored:
        log.warning("%s: ignored %d files that are not images (suffixes other than %s)", root, ignored,
                    ", ".join(IMAGE_SUFFIXES))
    if empty:
        log.warning("%s: %d identity folders hold no images and are left out: %s", root, len(empty),
                    ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))
    return paths, labels, names


class FaceDataModule(pl.LightningDataModule):
    """Face identities for training and closed-set identification, plus verification pair sets.

    ``source`` is one of:

    * ``"lfw_subset"`` (default): the embedded *instance identities*: each of the 100 LFW face crops shipped in
      scikit-image is an identity and samples are augmented views of it. The first ``train_identities`` faces are
      trained on (``train_views`` views each; ``eval_views`` other views each for validation and for test); the
      rest never are, and their views form the ``"heldout"`` verification set (all same-face pairs and as many
      different-face pairs). It measures invariance to synthetic augmentation and generalisation to unseen
      faces, not robustness to real changes of a person (pose, age, light): bring real identities for that.
    * a folder ``root/<identity>/<image>``; with ``align=True`` every image is first detected and aligned to the
      ArcFace template with MTCNN (needs facenet-pytorch; results are cached by file content, images without a
      face are counted and left out).
    * an InsightFace RecordIO folder (``train.rec``, ``train.idx``, ``property``: MS1M, CASIA-WebFace, ... as
      distributed), read without mxnet.
    * a ``.pt`` file holding ``{"images": [N, 3, H, W] (uint8, or float in [0, 1]), "labels": [N]}``.

    Folder, record and tensor sources are split per identity into train/val/test images (``val_fraction``,
    ``test_fraction``, seeded). ``verification`` adds ``.bin`` pair sets (named by file stem) to validation and
    test. Validation/test dataloaders are ``[identification, *pair sets]``; their names are in
    ``val_loader_names``/``test_loader_names`` (read by :class:`FaceRecognizer` to name its metrics).

    Args:
        source: ``"lfw_subset"``, a folder of identity folders, a RecordIO folder, or a ``.pt`` file.
        verification: ``.bin`` verification files.
        image_size: side of the images the model sees (``None``: 32 for ``lfw_subset``, 112 otherwise).
        batch_size: batch size (training and evaluation).
        val_fraction: share of each identity's images held out for validation (not ``lfw_subset``).
        test_fraction: share held out for testing (not ``lfw_subset``).
        seed: seed of the split (and of the embedded views).
        train_identities: ``lfw_subset``: identities trained on (the rest are held out for verification).
        train_views: ``lfw_subset``: training views per identity.
        eval_views: ``lfw_subset``: validation and test views per identity (and views per held-out identity).
        flip: mirror training images at random.
        align: detect and align folder images with MTCNN (5-point similarity to the ArcFace template).
        align_cache_dir: cache of aligned crops (default ``$XDG_CACHE_HOME/lightning-plugins/face-align``).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        source: str = EMBEDDED,
        verification: Sequence[str] = (),
        image_size: Optional[int] = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        train_identities: int = 80,
        train_views: int = 40,
        eval_views: int = 10,
        flip: bool = True,
        align: bool = False,
        align_cache_dir: Optional[str] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data")
        if image_size is not None and image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.save_hyperparameters()
        self.source = source
        self.kind = self._source_kind(source)
        if align and self.kind != "folder":
            raise ValueError(f"align=True applies to identity folders; {source!r} is a {self.kind} source "
                             "(RecordIO and .bin sets are distributed already aligned)")
        self.verification_files = [Path(path) for path in verification]
        for path in self.verification_files:
            if not path.is_file():
                raise FileNotFoundError(f"verification set {path} does not exist (expected an InsightFace .bin file)")
        self.image_size = image_size or (32 if self.kind == EMBEDDED else 112)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_fraction, self.test_fraction, self.flip = val_fraction, test_fraction, flip
        self.train_identities, self.train_views, self.eval_views = train_identities, train_views, eval_views
        self.align, self.align_cache_dir = align, align_cache_dir
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.pair_sets: dict[str, VerificationPairs] = {}  # .bin sets: the same pairs in validation and test
        self.heldout_pairs: dict[str, VerificationPairs] = {}  # lfw_subset: other views in validation and test
        self.identities: list[str] = []

    @staticmethod
    def _source_kind(source: str) -> str:
        if source == EMBEDDED:
            return EMBEDDED
        path = Path(source)
        if path.suffix == ".pt" and path.is_file():
            return "tensors"
        if path.is_dir():
            return "record" if any(path.glob("*.rec")) else "folder"
        raise ValueError(
            f"source {source!r} is neither 'lfw_subset', an existing folder (identity folders or an InsightFace "
            "train.rec/train.idx/property folder) nor a .pt file"
        )

    # -- shape facts ----------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if self.kind == EMBEDDED:
            return self.train_identities
        if self.kind == "record":
            return self._record_dataset().num_classes
        if not self.identities:
            self._load_identities()
        return len(self.identities)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def val_loader_names(self) -> list[str]:
        return ["identification", *self._pair_names()]

    @property
    def test_loader_names(self) -> list[str]:
        return self.val_loader_names

    def _pair_names(self) -> list[str]:
        names = ["heldout"] if self.kind == EMBEDDED else []
        return names + [path.stem for path in self.verification_files]

    # -- loading --------------------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        if self.kind == EMBEDDED:
            self._setup_embedded()
        else:
            self._setup_identities()
        for path in self.verification_files:
            images, issame = read_verification_bin(path)
            self.pair_sets[path.stem] = VerificationPairs(images, issame, self.image_size)
            log.info("verification set %s: %d pairs (%d same)", path.stem, len(issame), int(issame.sum()))
        log.info("%s: %d identities, train/val/test = %d/%d/%d images, verification sets %s",
                 type(self).__name__, self.num_classes, len(self.train_set), len(self.val_set),
                 len(self.test_set), self._pair_names() or "none")

    def _setup_embedded(self) -> None:
        split = instance_identity_split(self.train_identities, self.train_views, self.eval_views, self.image_size,
                                        self.seed)
        normalize = ToModelInput(self.image_size)
        names = [f"lfw_subset_{i:03d}" for i in range(self.train_identities)]
        self.identities = names
        self.train_set = LabelledImageDataset(*split.train, names, normalize)
        self.val_set = LabelledImageDataset(*split.val, names, normalize)
        self.test_set = LabelledImageDataset(*split.test, names, normalize)
        for stage, (images, labels) in (("val", split.heldout_val), ("test", split.heldout_test)):
            pairs, issame = heldout_pairs(labels, self.seed)
            self.heldout_pairs[stage] = VerificationPairs(images[pairs.flatten()], issame, self.image_size)

    def _setup_identities(self) -> None:
        if self.kind == "record":
            full: Dataset = self._record_dataset()
            targets = full.targets
            self.identities = [str(i) for i in range(full.num_classes)]
        elif self.kind == "tensors":
            images, targets = self._load_tensors()
            full = LabelledImageDataset(images, targets, transform=ToModelInput(self.image_size))
            self.identities = [str(i) for i in range(max(targets) + 1)]
        else:
            paths, targets = self._load_identities()
            if self.align:
                images, targets = self._aligned(paths, targets)
                full = LabelledImageDataset(images, targets, self.identities, ToModelInput(self.image_size))
            else:
                full = FaceFolderDataset(paths, targets, ToModelInput(self.image_size))
        fractions = (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)
        train_idx, val_idx, test_idx = stratified_split(targets, fractions, self.seed)
        self.train_set, self.val_set, self.test_set = (Subset(full, idx) for idx in (train_idx, val_idx, test_idx))

    def _record_dataset(self) -> InsightFaceRecordDataset:
        if getattr(self, "_records", None) is None:
            rec = sorted(Path(self.source).glob("*.rec"))[0]
            self._records = InsightFaceRecordDataset(self.source, ToModelInput(self.image_size), rec_name=rec.stem)
        return self._records

    def _load_tensors(self) -> tuple[torch.Tensor, list[int]]:
        data = torch.load(self.source, weights_only=True)
        if not isinstance(data, dict) or not {"images", "labels"} <= set(data):
            raise ValueError(f"{self.source} must hold a dict with 'images' [N, 3, H, W] and 'labels' [N]")
        images, labels = data["images"], torch.as_tensor(data["labels"]).long()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.source}: 'images' must be [N, 3, H, W], got {list(images.shape)}")
        return images, labels.tolist()

    def _load_identities(self) -> tuple[list[Path], list[int]]:
        paths, targets, self.identities = identity_folders(Path(self.source))
        return paths, targets

    def _aligned(self, paths: list[Path], targets: list[int]) -> tuple[torch.Tensor, list[int]]:
        from lightning_plugins.modules.face.align import FaceAligner

        cache = self.align_cache_dir or Path(
            os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lightning-plugins", "face-align")
        aligner = FaceAligner(image_size=self.image_size, cache_dir=cache)
        faces = aligner.align_files(paths)
        kept = [i for i, face in enumerate(faces) if face.image is not None]
        missing = [paths[i] for i, face in enumerate(faces) if face.image is None]
        if missing:
            log.warning("MTCNN found no face in %d of %d images; they are left out: %s", len(missing), len(paths),
                        ", ".join(str(p) for p in missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if not kept:
            raise ValueError(f"MTCNN found no face in any of the {len(paths)} images under {self.source}")
        return torch.stack([faces[i].image for i in kept]), [targets[i] for i in kept]

    # -- loaders --------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        collate = AugmentingCollate(RandomHorizontalFlip()) if self.flip else None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.val_set), *self._pair_loaders("val")]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.test_set), *self._pair_loaders("test")]

    def _pair_loaders(self, stage: str) -> list[DataLoader]:
        sets = [self.heldout_pairs[stage]] if self.kind == EMBEDDED else []
        return [self._eval_loader(pairs) for pairs in sets + [self.pair_sets[p.stem] for p in self.verification_files]]

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
