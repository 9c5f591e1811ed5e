"""Native readers and writers for InsightFace's face data formats, without mxnet.

* RecordIO folders (``train.rec`` + ``train.idx`` + ``property``) as produced by insightface's ``face2rec`` /
  mxnet's ``MXIndexedRecordIO``: dmlc records holding an ``IRHeader`` plus an encoded image.
* ``.bin`` verification pair sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``): a pickle of
  ``(bins, issame_list)``, loaded with a restricted unpickler that never runs arbitrary pickle code.

Record framing (dmlc recordio): ``uint32 magic, uint32 lrec`` with ``cflag = lrec >> 29`` and
``length = lrec & (2**29 - 1)``, then the payload and zero padding to a multiple of 4. A payload in which the magic
number occurs at a 4-aligned offset is stored in parts (cflag 1 = first, 2 = middle, 3 = last) with those 4 bytes
dropped; reading rejoins the parts with the magic in between.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "RECORD_MAGIC",
    "RecordHeader",
    "pack_record",
    "unpack_record",
    "RecordIOReader",
    "RecordIOWriter",
    "InsightFaceRecordDataset",
    "write_insightface_record",
    "read_verification_bin",
    "write_verification_bin",
    "UnsafePickleError",
]

RECORD_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_FRAME = struct.Struct("<II")  # magic, lrec
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2 (24 bytes, same as mxnet's native 'IfQQ' on x86/ARM)
_FLOAT32_EXACT_INT = 1 << 24  # largest range of integers float32 labels represent exactly


# ---------------------------------------------------------------------------------------------------------------
# IRHeader payloads


@dataclass(frozen=True)
class RecordHeader:
    """mxnet's ``IRHeader``: ``label`` is a float, or a tuple of ``flag`` floats when ``flag > 0``."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack_record(header: RecordHeader, image_bytes: bytes = b"") -> bytes:
    """Serialise ``header`` (24-byte IRHeader, then ``flag`` float32 labels if any) followed by ``image_bytes``."""
    label = header.label
    if isinstance(label, (tuple, list, np.ndarray, torch.Tensor)):
        labels = [float(x) for x in (label.tolist() if hasattr(label, "tolist") else label)]
        if not labels:
            raise ValueError("RecordHeader with an empty label sequence; use a scalar label with flag=0")
        if header.flag != len(labels):
            raise ValueError(f"RecordHeader flag={header.flag} but label has {len(labels)} values (they must match)")
        head = _IR_HEADER.pack(len(labels), 0.0, header.id, header.id2) + struct.pack(f"<{len(labels)}f", *labels)
    else:
        if header.flag != 0:
            raise ValueError(f"RecordHeader flag={header.flag} needs a tuple of {header.flag} labels, got {label!r}")
        head = _IR_HEADER.pack(0, float(label), header.id, header.id2)
    return head + bytes(image_bytes)


def unpack_record(payload: bytes) -> tuple[RecordHeader, bytes]:
    """Split a record payload into its :class:`RecordHeader` and the remaining (image) bytes."""
    if len(payload) < _IR_HEADER.size:
        raise ValueError(f"record payload of {len(payload)} bytes is shorter than the {_IR_HEADER.size}-byte IRHeader")
    flag, label, rec_id, rec_id2 = _IR_HEADER.unpack_from(payload, 0)
    pos = _IR_HEADER.size
    if flag > 0:
        end = pos + 4 * flag
        if len(payload) < end:
            raise ValueError(f"IRHeader says flag={flag} labels ({4 * flag} bytes) but only {len(payload) - pos} "
                             "bytes follow the header")
        label = tuple(float(x) for x in struct.unpack_from(f"<{flag}f", payload, pos))
        pos = end
    else:
        label = float(label)
    return RecordHeader(int(flag), label, int(rec_id), int(rec_id2)), bytes(payload[pos:])


# ---------------------------------------------------------------------------------------------------------------
# dmlc record framing


def _frame(cflag: int, data: bytes) -> bytes:
    return _FRAME.pack(RECORD_MAGIC, (cflag << 29) | len(data)) + data


def _encode_record(payload: bytes) -> bytes:
    """Frame ``payload`` as dmlc's writer does: split at every 4-aligned magic occurrence, pad to 4 bytes."""
    payload = bytes(payload)
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds the recordio limit of {_LENGTH_MASK} bytes")
    out = []
    start = 0
    hit = payload.find(_MAGIC_BYTES)
    while hit != -1:
        if hit % 4:  # only aligned occurrences are split out
            hit = payload.find(_MAGIC_BYTES, hit + 1)
            continue
        out.append(_frame(1 if start == 0 else 2, payload[start:hit]))
        start = hit + 4
        hit = payload.find(_MAGIC_BYTES, start)
    out.append(_frame(3 if start else 0, payload[start:]))
    out.append(b"\0" * (-len(payload) % 4))
    return b"".join(out)


class RecordIOReader:
    """Indexed reader over a dmlc ``.rec`` file and its ``.idx`` (``key<TAB>offset`` lines).

    The ``.rec`` is opened lazily and reopened in a new process (DataLoader workers), so one reader can be shared.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"record file {self.rec_path} does not exist")
        if not self.idx_path.is_file():
            raise FileNotFoundError(f"index file {self.idx_path} does not exist")
        self._offsets = self._parse_index()
        self.keys: list[int] = list(self._offsets)
        self._file = None
        self._pid: int | None = None
        self._size = 0

    def _parse_index(self) -> dict[int, int]:
        offsets: dict[int, int] = {}
        with open(self.idx_path, encoding="ascii", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    if len(fields) != 2:
                        raise ValueError
                    key, offset = int(fields[0]), int(fields[1])
                except ValueError:
                    raise ValueError(f"{self.idx_path}: line {lineno}: expected 'key<TAB>offset', "
                                     f"got {line.rstrip()!r}") from None
                if offset < 0:
                    raise ValueError(f"{self.idx_path}: line {lineno}: negative offset {offset}")
                if key in offsets:
                    raise ValueError(f"{self.idx_path}: line {lineno}: duplicate key {key}")
                offsets[key] = offset
        return offsets

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            if self._file is not None:  # inherited through fork: close this process's copy, use a fresh handle
                self._file.close()
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
            self._size = os.fstat(self._file.fileno()).st_size
        return self._file

    def _part(self, f, offset: int, key: int, limit: int | None) -> tuple[int, bytes, int]:
        """Read one frame at ``offset``: (cflag, data (at most ``limit`` bytes), offset of the next frame)."""
        if offset + _FRAME.size > self._size:
            raise ValueError(f"{self.rec_path}: record for key {key}: offset {offset} points past the end of the "
                             f"file ({self._size} bytes); .rec truncated or .idx not for this file ({self.idx_path})")
        f.seek(offset)
        magic, lrec = _FRAME.unpack(f.read(_FRAME.size))
        if magic != RECORD_MAGIC:
            raise ValueError(f"bad magic 0x{magic:08x} at offset {offset} in file {self.rec_path} (key {key}; "
                             f"expected 0x{RECORD_MAGIC:08x}); corrupt file or .idx not for this .rec")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        end = offset + _FRAME.size + length
        if end > self._size:
            raise ValueError(f"{self.rec_path}: record for key {key} at offset {offset} claims {length} bytes but the "
                             f"file ends at {self._size} (truncated .rec?)")
        data = f.read(length if limit is None else min(length, limit))
        return cflag, data, offset + _FRAME.size + ((length + 3) & ~3)

    def _read(self, key: int, limit: int | None = None) -> bytes:
        try:
            offset = self._offsets[key]
        except KeyError:
            raise KeyError(f"key {key} is not in index {self.idx_path}") from None
        f = self._handle()
        cflag, data, nxt = self._part(f, offset, key, limit)
        if cflag == 0:
            return data
        if cflag != 1:
            raise ValueError(f"{self.rec_path}: record for key {key} at offset {offset} has cflag {cflag}; a record "
                             "must start with cflag 0 (whole) or 1 (first part)")
        parts = [data]
        total = len(data)
        while limit is None or total < limit:
            part_offset = nxt
            cflag, data, nxt = self._part(f, part_offset, key, None)
            if cflag not in (2, 3):
                raise ValueError(f"{self.rec_path}: split record for key {key}: expected a continuation part "
                                 f"(cflag 2 or 3) at offset {part_offset}, found cflag {cflag}")
            parts += [_MAGIC_BYTES, data]
            total += 4 + len(data)
            if cflag == 3:
                break
        return b"".join(parts)

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (split parts rejoined)."""
        return self._read(int(key))

    def read_header(self, key: int) -> RecordHeader:
        """Only the :class:`RecordHeader` of record ``key`` (reads just the header bytes, not the image)."""
        key = int(key)
        head = self._read(key, _IR_HEADER.size)
        try:
            flag = _IR_HEADER.unpack_from(head, 0)[0] if len(head) >= _IR_HEADER.size else 0
            if flag > 0:
                head = self._read(key, _IR_HEADER.size + 4 * flag)
            return unpack_record(head[:_IR_HEADER.size + 4 * flag])[0]
        except ValueError as e:
            raise ValueError(f"{self.rec_path}: record key {key}: {e}") from None

    def close(self) -> None:
        """Close the ``.rec`` handle (it is reopened on the next read)."""
        if self._file is not None:
            self._file.close()
        self._file = None
        self._pid = None

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._offsets

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state


class RecordIOWriter:
    """Writes a ``.rec`` + ``.idx`` pair the way dmlc's ``MXIndexedRecordIO`` does (idx lines in write order)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")
        self._keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> None:
        """Append record ``key`` with ``payload`` (magic occurrences at aligned offsets are split out)."""
        key = int(key)
        if self._rec is None:
            raise ValueError(f"RecordIOWriter for {self.rec_path} is closed")
        if key in self._keys:
            raise ValueError(f"duplicate key {key} written to {self.rec_path}")
        self._keys.add(key)
        offset = self._rec.tell()
        self._rec.write(_encode_record(payload))
        self._idx.write(f"{key}\t{offset}\n")

    def close(self) -> None:
        """Flush and close both files."""
        if self._rec is not None:
            self._rec.close()
            self._idx.close()
        self._rec = self._idx = None

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# images


def _to_pil(image: Any) -> Image.Image:
    """uint8 HWC/HW numpy array, uint8 CHW/HW tensor or PIL image -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        bad_channels = image.dim() == 3 and image.shape[0] not in (1, 3)
        if image.dtype != torch.uint8 or image.dim() not in (2, 3) or bad_channels:
            raise ValueError(f"image tensor must be uint8 [3, H, W], [1, H, W] or [H, W]; got {image.dtype} "
                             f"{tuple(image.shape)}")
        array = image.detach().cpu().numpy()
        if array.ndim == 3:
            array = array.transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)):
            raise ValueError(f"image array must be uint8 [H, W, 3], [H, W, 1] or [H, W]; got {array.dtype} "
                             f"{array.shape}")
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}; expected a numpy array, tensor or PIL image")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def _encode_image(pil: Image.Image, image_format: str, quality: int) -> bytes:
    fmt = image_format.lower()
    buffer = io.BytesIO()
    if fmt in ("jpeg", "jpg"):
        pil.save(buffer, format="JPEG", quality=int(quality))
    elif fmt == "png":
        pil.save(buffer, format="PNG")
    else:
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    return buffer.getvalue()


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _pil_to_chw(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _int_label(value: Any, what: str) -> int:
    value = float(value)
    if not value.is_integer():
        raise ValueError(f"{what}: label {value} is not an integer")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# InsightFace RecordIO folders


def _read_property(path: Path) -> tuple[int, tuple[int, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"property file {path} is missing; expected one line 'num_classes,H,W'")
    text = path.read_text(errors="replace").strip()
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) != 3 or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: malformed property {text!r}; expected 'num_classes,H,W' "
                         "(three positive integers)") from None
    return values[0], (values[1], values[2])


class InsightFaceRecordDataset(Dataset):
    """InsightFace training folder: ``root/{rec_name}.rec``, ``root/{rec_name}.idx`` and ``root/property``.

    Items are ``(uint8 tensor [3, H, W] (RGB), int label)``; ``transform`` is applied to the tensor. Labels of all
    images are read from the record headers at construction (``targets``) without decoding any image.
    """

    def __init__(self, root: str | os.PathLike, transform=None, rec_name: str = "train"):
        self.root = Path(root)
        self.transform = transform
        self.num_classes, self.image_size = _read_property(self.root / "property")
        self._reader = RecordIOReader(self.root / f"{rec_name}.rec", self.root / f"{rec_name}.idx")
        reader = self._reader
        self.identity_ranges: dict[int, tuple[int, int]] = {}
        header0 = reader.read_header(0) if 0 in reader else None
        if header0 is not None and header0.flag > 0:
            if len(header0.label) < 2:
                raise ValueError(f"{reader.rec_path}: key 0 header has flag {header0.flag} but needs the two labels "
                                 "[first identity key, end of identity keys]")
            first_identity = _int_label(header0.label[0], f"{reader.rec_path} key 0")
            end_identity = _int_label(header0.label[1], f"{reader.rec_path} key 0")
            keys = list(range(1, first_identity))
            identity_keys = list(range(first_identity, end_identity))
            missing = [k for k in keys + identity_keys if k not in reader]
            if missing:
                raise ValueError(f"{reader.rec_path}: key 0 header announces images 1..{first_identity - 1} and "
                                 f"identities {first_identity}..{end_identity - 1}, but {len(missing)} of these keys "
                                 f"are missing from {reader.idx_path} (first: {missing[0]})")
            for key in identity_keys:
                header = reader.read_header(key)
                if header.flag < 2:
                    raise ValueError(f"{reader.rec_path}: identity record key {key} has no [start, end) label "
                                     f"(flag {header.flag})")
                where = f"{reader.rec_path} identity key {key}"
                self.identity_ranges[key - first_identity] = (_int_label(header.label[0], where),
                                                              _int_label(header.label[1], where))
        else:
            keys = list(reader.keys)
        self.keys: list[int] = keys
        self.targets: list[int] = [self._label(key, reader.read_header(key)) for key in keys]
        if self.targets:
            low, high = min(self.targets), max(self.targets)
            if low < 0:
                raise ValueError(f"{reader.rec_path}: negative label {low}")
            if high >= self.num_classes:
                raise ValueError(f"{self.root / 'property'} says num_classes={self.num_classes} but "
                                 f"{reader.rec_path} has label {high}")

    def _label(self, key: int, header: RecordHeader) -> int:
        label = header.label[0] if isinstance(header.label, tuple) else header.label
        return _int_label(label, f"{self._reader.rec_path} key {key}")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        key = self.keys[index]
        payload = self._reader.read(key)
        try:
            _, image_bytes = unpack_record(payload)
            if not image_bytes:
                raise ValueError("record has no image bytes")
            image = _pil_to_chw(_decode_image(image_bytes))
        except Exception as e:
            raise ValueError(f"{self._reader.rec_path}: record key {key}: image failed to decode ({e})") from e
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def write_insightface_record(root: str | os.PathLike, samples: Iterable[tuple[Any, int]], image_format: str = "jpeg",
                             identity_header: bool = True, quality: int = 95, rec_name: str = "train") -> None:
    """Write ``(image, label)`` samples as an InsightFace RecordIO folder (``.rec``, ``.idx``, ``property``).

    Samples are ordered stably by label. With ``identity_header`` (insightface's layout): key 0 holds
    ``flag=2, label=(a, b)``, images are keys ``1..a-1``, and keys ``a..b-1`` hold one ``(start, end)`` record per
    class ``0..num_classes-1`` (``num_classes = max label + 1``). Without it, images are keys ``0..n-1`` with
    ``flag=0``. Images are written as they arrive (one pass, nothing held in memory); the ``.idx`` maps keys to them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path, prop_path = root / f"{rec_name}.rec", root / f"{rec_name}.idx", root / "property"
    placeholder = _encode_record(pack_record(RecordHeader(2, (0.0, 0.0), 0, 0)))
    entries: list[tuple[int, int]] = []  # (label, offset) in arrival order
    size: tuple[int, int] | None = None
    try:
        with open(rec_path, "wb") as rec:
            if identity_header:
                rec.write(placeholder)
            for i, (image, label) in enumerate(samples):
                label = _int_label(label, f"sample {i}")
                if not 0 <= label < _FLOAT32_EXACT_INT:
                    raise ValueError(f"sample {i}: label {label} must be in [0, 2**24) (stored as float32)")
                pil = _to_pil(image)
                if size is None:
                    size = (pil.height, pil.width)
                elif (pil.height, pil.width) != size:
                    raise ValueError(f"sample {i} is {pil.height}x{pil.width} but earlier samples are "
                                     f"{size[0]}x{size[1]}; all images must have the same size")
                entries.append((label, rec.tell()))
                rec.write(_encode_record(pack_record(RecordHeader(0, float(label), i, 0),
                                                     _encode_image(pil, image_format, quality))))
            if not entries:
                raise ValueError("no samples to write")
            num_classes = max(label for label, _ in entries) + 1
            order = sorted(range(len(entries)), key=lambda j: entries[j][0])
            index: list[tuple[int, int]] = []
            if identity_header:
                first_identity = len(entries) + 1
                end_identity = first_identity + num_classes
                if end_identity > _FLOAT32_EXACT_INT:
                    raise ValueError(f"{len(entries)} images + {num_classes} classes exceed what the float32 key-0 "
                                     "header can address exactly; use identity_header=False")
                index.append((0, 0))
                starts = [0] * (num_classes + 1)  # per class: first image key; filled from the sorted labels
                counts = [0] * num_classes
                for key, j in enumerate(order, start=1):
                    index.append((key, entries[j][1]))
                    counts[entries[j][0]] += 1
                starts[0] = 1
                for c in range(num_classes):
                    starts[c + 1] = starts[c] + counts[c]
                for c in range(num_classes):
                    index.append((first_identity + c, rec.tell()))
                    rec.write(_encode_record(pack_record(
                        RecordHeader(2, (float(starts[c]), float(starts[c + 1])), 0, 0))))
                header = _encode_record(pack_record(
                    RecordHeader(2, (float(first_identity), float(end_identity)), 0, 0)))
                assert len(header) == len(placeholder)
                rec.seek(0)
                rec.write(header)
            else:
                index = [(key, entries[j][1]) for key, j in enumerate(order)]
        with open(idx_path, "w", encoding="ascii") as f:
            f.writelines(f"{key}\t{offset}\n" for key, offset in index)
        prop_path.write_text(f"{num_classes},{size[0]},{size[1]}\n")
    except BaseException:
        for path in (rec_path, idx_path):
            path.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# .bin verification pair sets


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle refers to a global outside the small allow-list (nothing from it was executed)."""


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode`` as used by Python 3 pickles of bytes (protocol < 3): latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"_codecs.encode is only allowed for latin-1 text, got encoding {encoding!r}")
    return text.encode("latin-1")


def _numpy_attr(name: str, candidates: Sequence[str]):
    for module in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    for module in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray), ("list", list),
                          ("tuple", tuple), ("dict", dict), ("bytes", bytes), ("str", str), ("int", int),
                          ("bool", bool), ("float", float)):
            allowed[(module, name)] = obj
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    for name, modules in (("_reconstruct", multiarray), ("scalar", multiarray), ("_frombuffer", numeric)):
        obj = _numpy_attr(name, modules)
        if obj is not None:
            for module in modules:
                allowed[(module, name)] = obj
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, **kwargs):
        super().__init__(file, **kwargs)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self._path}: pickle refers to disallowed global '{module}.{name}'; only "
                                    "containers, bytes, bool/int/str and numpy arrays are allowed (refused; nothing "
                                    "was executed)") from None


def _safe_load(path: Path):
    data = path.read_bytes()

    def load(encoding: str):
        return _RestrictedUnpickler(io.BytesIO(data), path, encoding=encoding).load()

    try:
        try:
            return load("ASCII")
        except UnicodeDecodeError:  # a Python 2 pickle of str objects holding binary data
            return load("bytes")
    except UnsafePickleError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable pickle of (bins, issame_list) ({type(e).__name__}: {e}); "
                         "truncated or corrupt file?") from e


def _as_bytes(obj: Any, path: Path, i: int) -> bytes:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, np.ndarray) and obj.dtype in (np.uint8, np.int8) and obj.ndim == 1:
        return obj.tobytes()
    if isinstance(obj, str):  # Python 2 str loaded as text
        return obj.encode("latin-1")
    raise ValueError(f"{path}: bins[{i}] is {type(obj).__name__}"
                     f"{' ' + str(obj.dtype) + str(obj.shape) if isinstance(obj, np.ndarray) else ''}; "
                     "expected the encoded image as bytes or a 1-D uint8 array")


def read_verification_bin(path: str | os.PathLike,
                          image_size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an insightface ``.bin`` pair set: ``(images uint8 [2N, 3, H, W] RGB, issame bool [N])``.

    Pair ``i`` is ``(images[2i], images[2i+1])``. ``image_size`` (int or (H, W)) resizes bilinearly; without it all
    images must decode to the same size.
    """
    path = Path(path)
    obj = _safe_load(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if isinstance(issame, np.ndarray):
        issame = issame.tolist()
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: bins and issame_list must be sequences, got {type(bins).__name__} and "
                         f"{type(issame).__name__}")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    images: np.ndarray | None = None
    for i, item in enumerate(bins):
        data = _as_bytes(item, path, i)
        try:
            pil = _decode_image(data)
        except Exception as e:
            raise ValueError(f"{path}: image {i} (pair {i // 2}) failed to decode ({e})") from e
        if image_size is not None and (pil.height, pil.width) != tuple(image_size):
            pil = pil.resize((image_size[1], image_size[0]), Image.BILINEAR)
        array = np.asarray(pil, dtype=np.uint8)
        if images is None:
            images = np.empty((len(bins), *array.shape), dtype=np.uint8)
        elif array.shape != images.shape[1:]:
            raise ValueError(f"{path}: image {i} is {array.shape[0]}x{array.shape[1]} but image 0 is "
                             f"{images.shape[1]}x{images.shape[2]}; pass image_size= to resize")
        images[i] = array
    if images is None:
        h, w = image_size if image_size is not None else (0, 0)
        images = np.empty((0, h, w, 3), dtype=np.uint8)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return tensor, torch.tensor([bool(x) for x in issame], dtype=torch.bool)


def write_verification_bin(path: str | os.PathLike, images, issame, image_format: str = "jpeg",
                           quality: int = 95) -> None:
    """Write an insightface ``.bin`` pair set: pickle (protocol 4) of ``(list of encoded image bytes, list of bool)``.

    ``images``: uint8 tensor [2N, 3, H, W] or a sequence of images (HWC arrays, CHW tensors, PIL images).
    """
    if isinstance(images, torch.Tensor) and images.dim() != 4:
        raise ValueError(f"images tensor must be [2N, 3, H, W], got {tuple(images.shape)}")
    if isinstance(issame, (torch.Tensor, np.ndarray)):
        issame = issame.tolist()
    issame = [bool(x) for x in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    bins = [_encode_image(_to_pil(image), image_format, quality) for image in images]
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
