"""Face detection (MTCNN, facenet-pytorch) + 5-point similarity alignment to the ArcFace template, with a disk cache.

Pipeline per image: MTCNN ``detect`` (boxes, probabilities, 5 landmarks: left eye, right eye, nose, left and right
mouth corner) -> one face picked (largest box or highest probability) -> least-squares similarity transform
(rotation + uniform scale + translation, Umeyama) from its landmarks to the ArcFace template -> bilinear warp to
``image_size x image_size`` with border 0 (torch ``affine_grid``/``grid_sample``, no OpenCV).

Coordinates are pixel coordinates with pixel centres at integers (the OpenCV / scikit-image convention), so
``warp_faces`` matches ``skimage.transform.warp(img, tform.inverse, output_shape=(S, S), order=1)``.

Template sizes follow insightface: a side ``S`` with ``S % 112 == 0`` scales the 112 template by ``S / 112``;
otherwise ``S % 128 == 0`` scales it by ``S / 128`` and shifts x by ``8 * S / 128``; any other side is refused
(``ValueError``).

Cache: with ``cache_dir`` set, the result for a file is stored under a key made of the sha256 of the file's bytes
and a hash of the settings that can change it (detector settings, output size, template). A face is stored as a PNG
(the aligned uint8 crop) + a JSON (box, landmarks, probability, settings, source file name); "no face" as a JSON with
``"face": false``. A second run over the same files runs no detector. The compute device is not part of the key.

facenet-pytorch is imported lazily (only when a ``FaceAligner`` is built); install it with
``pip install --no-deps facenet-pytorch==2.6.0`` (its declared pins would downgrade torch).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "AlignedFace",
    "FaceAligner",
    "arcface_template",
    "estimate_similarity",
    "warp_faces",
]

FACENET_INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"
SELECT_METHODS = ("largest", "probable")
CACHE_FORMAT = 1

ARCFACE_TEMPLATE_112 = torch.tensor(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=torch.float32,
)


def arcface_template(size: int = 112) -> torch.Tensor:
    """The ArcFace 5-point template ``[5, 2]`` (float32, x/y pixels) for an output side ``size``.

    ``size % 112 == 0``: the 112 template scaled by ``size / 112``; else ``size % 128 == 0``: scaled by
    ``size / 128`` and shifted right by ``8 * size / 128``. Other sizes raise ``ValueError``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"template size must be a positive int multiple of 112 or 128, got {size!r}")
    if size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (size / 112.0)
    if size % 128 == 0:
        ratio = size / 128.0
        out = ARCFACE_TEMPLATE_112 * ratio
        out[:, 0] += 8.0 * ratio
        return out
    raise ValueError(f"template size must be a multiple of 112 or 128 (e.g. 112, 128, 224, 256), got {size}")


def estimate_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transform (Umeyama, with scale, no reflection) mapping ``src`` points onto ``dst``.

    ``src`` ``[N, K, 2]`` or ``[K, 2]``, ``dst`` ``[K, 2]`` (or ``[N, K, 2]``). Returns the forward matrices
    ``[N, 2, 3]`` (or ``[2, 3]``) with ``dst ~= M[:, :2] @ p + M[:, 2]``, computed in float64, returned in float32
    for float32/float16 input (float64 stays float64).
    """
    src = torch.as_tensor(src)
    dst = torch.as_tensor(dst)
    single = src.dim() == 2
    out_dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    s = src.to(torch.float64).reshape(-1, *src.shape[-2:])
    d = dst.to(device=s.device, dtype=torch.float64)
    if d.dim() == 2:
        d = d.unsqueeze(0).expand_as(s)
    if s.shape[-1] != 2 or d.shape != s.shape:
        raise ValueError(f"estimate_similarity wants src [N,K,2] or [K,2] and dst [K,2]; got {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    k = s.shape[1]
    s_mean = s.mean(dim=1, keepdim=True)
    d_mean = d.mean(dim=1, keepdim=True)
    s_c = s - s_mean
    d_c = d - d_mean
    cov = d_c.transpose(1, 2) @ s_c / k  # [N, 2, 2]
    u, sig, vh = torch.linalg.svd(cov)
    sign = torch.ones_like(sig)
    # The optimal rotation keeps det +1: flip the last singular direction when U V^T would be a reflection.
    flip = torch.linalg.det(u) * torch.linalg.det(vh)
    sign[:, -1] = torch.where(flip < 0, -1.0, 1.0).to(sig.dtype)
    rot = u @ torch.diag_embed(sign) @ vh
    var_src = s_c.pow(2).sum(dim=(1, 2)) / k
    scale = (sig * sign).sum(dim=1) / var_src
    lin = scale[:, None, None] * rot
    trans = d_mean.transpose(1, 2) - lin @ s_mean.transpose(1, 2)  # [N, 2, 1]
    mat = torch.cat([lin, trans], dim=2).to(out_dtype)
    return mat[0] if single else mat


def _invert_affine(mat: torch.Tensor) -> torch.Tensor:
    """Inverse of ``[N, 2, 3]`` affine maps (float64)."""
    lin = mat[:, :, :2]
    inv = torch.linalg.inv(lin)
    return torch.cat([inv, -inv @ mat[:, :, 2:]], dim=2)


def warp_faces(images: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Warp ``images`` ``[N, C, H, W]`` by forward maps ``matrices`` ``[N, 2, 3]`` (source pixel -> output pixel).

    Bilinear, border 0, pixel centres at integer coordinates (as ``cv2.warpAffine`` / ``skimage.transform.warp``
    with ``order=1``). Returns ``[N, C, size, size]`` in the input dtype (uint8 rounded and clamped).
    """
    if images.dim() != 4:
        raise ValueError(f"warp_faces wants images [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    mats = torch.as_tensor(matrices).to(device=images.device, dtype=torch.float64)
    if mats.dim() == 2:
        mats = mats.unsqueeze(0)
    if mats.shape != (n, 2, 3):
        raise ValueError(f"warp_faces wants matrices [{n}, 2, 3], got shape {tuple(mats.shape)}")
    inv = _invert_affine(mats)  # output pixel -> source pixel
    # affine_grid (align_corners=False) works in normalised coordinates: x_n = (2x + 1) / W - 1 for a pixel x.
    # theta = to_norm_src @ inv @ from_norm_out, all as 3x3 homogeneous maps.
    f64 = dict(dtype=torch.float64, device=images.device)
    from_norm_out = torch.tensor([[size / 2.0, 0.0, (size - 1) / 2.0],
                                  [0.0, size / 2.0, (size - 1) / 2.0],
                                  [0.0, 0.0, 1.0]], **f64)
    to_norm_src = torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0],
                                [0.0, 2.0 / h, 1.0 / h - 1.0],
                                [0.0, 0.0, 1.0]], **f64)
    bottom = torch.tensor([[[0.0, 0.0, 1.0]]], **f64).expand(n, 1, 3)
    inv3 = torch.cat([inv, bottom], dim=1)
    theta = (to_norm_src @ inv3 @ from_norm_out)[:, :2]
    work_dtype = images.dtype if images.is_floating_point() and images.dtype != torch.float16 else torch.float32
    src = images.to(work_dtype)
    grid = F.affine_grid(theta.to(work_dtype), [n, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(images.dtype)


@dataclass
class AlignedFace:
    """One alignment result; ``image`` etc. are ``None`` when no face was found.

    ``image``: uint8 ``[3, S, S]``; ``box``: ``[x1, y1, x2, y2]`` and ``landmarks``: 5 ``[x, y]`` in the source image's
    pixels; ``prob``: detector probability; ``from_cache``: read from the disk cache (no detector run).
    """

    image: torch.Tensor | None
    box: list[float] | None
    landmarks: list[list[float]] | None
    prob: float | None
    from_cache: bool = False

    @property
    def face(self) -> bool:
        """Whether a face was found."""
        return self.image is not None


def _to_rgb_array(image: Any) -> np.ndarray:
    """PIL image / uint8 HWC or HW array / uint8 CHW or HW tensor -> contiguous uint8 HWC RGB array."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(f"tensor images must be uint8 (MTCNN needs 0..255 values), got {image.dtype}")
        t = image.detach().cpu()
        if t.dim() == 3:
            t = t.permute(1, 2, 0)  # CHW -> HWC
        arr = t.numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"array images must be uint8 (MTCNN needs 0..255 values), got {image.dtype}")
        arr = image
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: use a PIL image, a uint8 HWC array or a "
                        "uint8 CHW tensor")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HW, HWC (numpy) or CHW (tensor) with 1, 3 or 4 channels, got shape "
                         f"{tuple(image.shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FaceAligner:
    """MTCNN detection + 5-point similarity alignment, with an optional on-disk cache.

    ``image_size``: output side (multiple of 112 or 128). ``min_face_size``, ``thresholds``, ``factor``: MTCNN
    settings. ``select``: ``"largest"`` (box area) or ``"probable"`` (detector probability) when several faces.
    ``min_upsample``: images whose shorter side is below it are upsampled (bicubic) to that shorter side before
    detection (tiny crops need ~160); landmarks are mapped back and the warp reads the original image.
    ``stats`` counts ``images``, ``faces``, ``no_face``, ``cache_hits``, ``detector_runs`` since construction.
    """

    def __init__(
        self,
        image_size: int = 112,
        cache_dir: str | Path | None = None,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        select: str = "largest",
        min_upsample: int = 0,
        device: str = "cpu",
    ):
        if select not in SELECT_METHODS:
            raise ValueError(f"select={select!r} is not one of {SELECT_METHODS}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or (
            image_size % 112 and image_size % 128
        ):
            raise ValueError(f"image_size={image_size!r}: must be a positive multiple of 112 or 128 "
                             "(e.g. 112, 128, 224, 256)")
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != 3 or not all(0.0 < t < 1.0 for t in thresholds):
            raise ValueError(f"thresholds={thresholds!r}: need 3 values (P-, R-, O-net), each in (0, 1)")
        if not 0.0 < float(factor) < 1.0:
            raise ValueError(f"factor={factor!r}: the pyramid scale factor must be in (0, 1)")
        if int(min_face_size) < 1:
            raise ValueError(f"min_face_size={min_face_size!r}: must be a positive number of pixels")
        if int(min_upsample) < 0:
            raise ValueError(f"min_upsample={min_upsample!r}: must be >= 0 (0 disables upsampling)")
        try:
            from facenet_pytorch import MTCNN
        except ImportError as err:
            raise ImportError(
                f"FaceAligner needs facenet-pytorch (MTCNN); install it with `{FACENET_INSTALL}` "
                "(--no-deps: its declared pins would downgrade torch)"
            ) from err

        self.image_size = image_size
        self.min_face_size = int(min_face_size)
        self.thresholds = thresholds
        self.factor = float(factor)
        self.select = select
        self.min_upsample = int(min_upsample)
        self.device = torch.device(device)
        self.template = arcface_template(image_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        # keep_all + our own selection: facenet's detect only sorts by area (select_largest=True), never by prob.
        self._mtcnn = MTCNN(
            image_size=image_size, margin=0, min_face_size=self.min_face_size, thresholds=list(thresholds),
            factor=self.factor, post_process=False, select_largest=False, keep_all=True, device=self.device,
        )
        self._mtcnn.eval()
        self.settings = {
            "format": CACHE_FORMAT,
            "detector": "facenet-pytorch MTCNN",
            "image_size": image_size,
            "template": [[round(float(v), 6) for v in row] for row in self.template.tolist()],
            "min_face_size": self.min_face_size,
            "thresholds": list(thresholds),
            "factor": self.factor,
            "select": select,
            "min_upsample": self.min_upsample,
        }
        self.settings_hash = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()
        self.stats = {"images": 0, "faces": 0, "no_face": 0, "cache_hits": 0, "detector_runs": 0}

    # ----------------------------------------------------------------- cache
    def _cache_paths(self, key: str) -> tuple[Path, Path]:
        assert self.cache_dir is not None
        entry = hashlib.sha256(f"{key}\n{self.settings_hash}".encode()).hexdigest()
        folder = self.cache_dir / entry[:2]
        return folder / f"{entry}.json", folder / f"{entry}.png"

    def _cache_load(self, key: str) -> AlignedFace | None:
        from PIL import Image

        meta_path, png_path = self._cache_paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("settings") != self.settings:
                return None
            if not meta["face"]:
                return AlignedFace(None, None, None, None, from_cache=True)
            with Image.open(png_path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, KeyError):
            return None  # missing or unreadable entry: a miss (it is rewritten)
        if arr.shape != (self.image_size, self.image_size, 3):
            return None
        return AlignedFace(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), meta["box"],
                           meta["landmarks"], meta["prob"], from_cache=True)

    def _cache_store(self, key: str, result: AlignedFace, source: str | None) -> None:
        from PIL import Image

        meta_path, png_path = self._cache_paths(key)
        meta = {"face": result.image is not None, "box": result.box, "landmarks": result.landmarks,
                "prob": result.prob, "settings": self.settings, "source": source, "key": key}
        if result.image is not None:
            buf = io.BytesIO()
            Image.fromarray(result.image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            _atomic_write(png_path, buf.getvalue())
        _atomic_write(meta_path, json.dumps(meta, indent=1).encode())  # written last: marks the entry complete

    # ------------------------------------------------------------- detection
    def _detect(self, rgb: np.ndarray) -> tuple[list[float], list[list[float]], float] | None:
        """Run MTCNN on one HWC uint8 RGB array; the selected face's box, landmarks, prob (source pixels)."""
        from PIL import Image

        h, w = rgb.shape[:2]
        pil = Image.fromarray(rgb)
        sx = sy = 1.0
        short = min(h, w)
        if self.min_upsample and short < self.min_upsample:
            ratio = self.min_upsample / short
            nw, nh = max(1, round(w * ratio)), max(1, round(h * ratio))
            pil = pil.resize((nw, nh), Image.BICUBIC)
            sx, sy = nw / w, nh / h
        self.stats["detector_runs"] += 1
        with torch.no_grad():
            boxes, probs, points = self._mtcnn.detect(pil, landmarks=True)
        if boxes is None or len(boxes) == 0:
            return None
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)
        if self.select == "largest":
            idx = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        else:
            idx = int(np.argmax(probs))
        box, pts = boxes[idx].copy(), points[idx].copy()
        if sx != 1.0 or sy != 1.0:
            # Resizing maps pixel centres as (x + 0.5) * s - 0.5; invert that.
            box[[0, 2]] = (box[[0, 2]] + 0.5) / sx - 0.5
            box[[1, 3]] = (box[[1, 3]] + 0.5) / sy - 0.5
            pts[:, 0] = (pts[:, 0] + 0.5) / sx - 0.5
            pts[:, 1] = (pts[:, 1] + 0.5) / sy - 0.5
        return box.tolist(), pts.tolist(), float(probs[idx])

    def _align_rgb(self, rgb: np.ndarray) -> AlignedFace:
        found = self._detect(rgb)
        if found is None:
            return AlignedFace(None, None, None, None, from_cache=False)
        box, pts, prob = found
        mat = estimate_similarity(torch.tensor(pts, dtype=torch.float64), self.template)
        img = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
        crop = warp_faces(img, mat.unsqueeze(0), self.image_size)[0].contiguous()
        return AlignedFace(crop, box, pts, prob, from_cache=False)

    def _count(self, result: AlignedFace) -> AlignedFace:
        self.stats["images"] += 1
        self.stats["faces" if result.image is not None else "no_face"] += 1
        if result.from_cache:
            self.stats["cache_hits"] += 1
        return result

    # ------------------------------------------------------------ public API
    def align_image(self, image: Any, key: str | None = None) -> AlignedFace:
        """Detect and align the face in ``image`` (PIL, uint8 HWC/HW array or uint8 CHW/HW tensor; grey -> RGB).

        ``key`` (e.g. a content hash of the image) enables the disk cache when ``cache_dir`` is set.
        """
        use_cache = self.cache_dir is not None and key is not None
        if use_cache:
            hit = self._cache_load(key)
            if hit is not None:
                return self._count(hit)
        result = self._align_rgb(_to_rgb_array(image))
        if use_cache:
            self._cache_store(key, result, source=None)
        return self._count(result)

    def align_file(self, path: str | Path) -> AlignedFace:
        """Detect and align the face in an image file; keyed on the sha256 of its bytes when ``cache_dir`` is set."""
        from PIL import Image

        path = Path(path)
        data = path.read_bytes()
        key = hashlib.sha256(data).hexdigest()
        if self.cache_dir is not None:
            hit = self._cache_load(key)
            if hit is not None:
                return self._count(hit)
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        result = self._align_rgb(rgb)
        if self.cache_dir is not None:
            self._cache_store(key, result, source=path.name)
        return self._count(result)

    def align_files(self, paths: Iterable[str | Path], progress: bool = True) -> list[AlignedFace]:
        """``align_file`` over ``paths`` (tqdm bar if ``progress`` and tqdm is installed); logs one INFO summary."""
        paths = list(paths)
        before = dict(self.stats)
        iterator: Iterable = paths
        if progress:
            try:
                from tqdm.auto import tqdm

                iterator = tqdm(paths, desc="align faces", unit="img")
            except ImportError:  # no progress bar without tqdm; the summary line below is still logged
                iterator = paths
        results = [self.align_file(p) for p in iterator]
        d = {k: self.stats[k] - before[k] for k in self.stats}
        logger.info("aligned %d files: %d faces, %d no face, %d cache hits, %d detector runs",
                    len(paths), d["faces"], d["no_face"], d["cache_hits"], d["detector_runs"])
        return results

    def __repr__(self) -> str:
        return (f"FaceAligner(image_size={self.image_size}, select={self.select!r}, "
                f"thresholds={self.thresholds}, min_face_size={self.min_face_size}, factor={self.factor}, "
                f"min_upsample={self.min_upsample}, cache_dir={str(self.cache_dir) if self.cache_dir else None!r})")
