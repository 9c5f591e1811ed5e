"""InsightFace RecordIO folders and .bin pair sets, read natively (no mxnet)."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightning_plugins.modules.face.formats import (
    RECORD_MAGIC,
    InsightFaceRecordDataset,
    RecordHeader,
    RecordIOReader,
    RecordIOWriter,
    UnsafePickleError,
    pack_record,
    read_verification_bin,
    unpack_record,
    write_insightface_record,
    write_verification_bin,
)

MAGIC = struct.pack("<I", 0xCED7230A)


def frame(cflag, data, pad=True):
    """A dmlc frame built by hand: magic, lrec, data, zero padding."""
    out = MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data
    return out + b"\0" * (-len(data) % 4) if pad else out


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def random_images(n, h=8, w=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def smooth_image(seed, h=16, w=16):
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 12 + seed * 7, y * 12 + seed * 3, (x + y) * 6 + seed], axis=-1)
    return (base % 256).astype(np.uint8)


def scan_cflags(rec_path):
    """(offset, cflag, length) of every frame in a .rec, walking the raw bytes."""
    raw = rec_path.read_bytes()
    frames, pos = [], 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == 0xCED7230A
        length = lrec & ((1 << 29) - 1)
        frames.append((pos, lrec >> 29, length))
        pos += 8 + length + (-length % 4)
    assert pos == len(raw)
    return frames


# ----------------------------------------------------------------------------------------------- record level


def test_hand_built_records_read_back(tmp_path):
    image = png_bytes(random_images(1)[0])
    rec0 = struct.pack("<IfQQ", 0, 7.0, 5, 0) + image
    rec1 = struct.pack("<IfQQ", 2, 0.0, 9, 1) + struct.pack("<2f", 3.0, 11.0)  # label array, no image
    raw = frame(0, rec0) + frame(0, rec1)
    (tmp_path / "a.rec").write_bytes(raw)
    (tmp_path / "a.idx").write_text(f"10\t0\n4\t{len(frame(0, rec0))}\n")
    with RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx") as reader:
        assert reader.keys == [10, 4] and len(reader) == 2
        assert reader.read(10) == rec0
        header, data = unpack_record(reader.read(10))
        assert header == RecordHeader(0, 7.0, 5, 0) and data == image
        header, data = unpack_record(reader.read(4))
        assert header == RecordHeader(2, (3.0, 11.0), 9, 1) and data == b""
        assert reader.read_header(4) == header
        with pytest.raises(KeyError, match="key 3 is not in index"):
            reader.read(3)


def test_hand_built_split_record_is_rejoined(tmp_path):
    parts = [b"abcd" * 2, b"", b"xyz"]  # payload = parts joined by the magic
    raw = frame(1, parts[0]) + frame(2, parts[1]) + frame(3, parts[2]) + frame(0, b"next")
    (tmp_path / "s.rec").write_bytes(raw)
    (tmp_path / "s.idx").write_text(f"0\t0\n1\t{len(raw) - 12}\n")
    reader = RecordIOReader(tmp_path / "s.rec", tmp_path / "s.idx")
    assert reader.read(0) == parts[0] + MAGIC + parts[1] + MAGIC + parts[2]
    assert reader.read(1) == b"next"


def test_pack_record_matches_struct_layout():
    assert pack_record(RecordHeader(0, 3.0, 7, 8), b"img") == struct.pack("<IfQQ", 0, 3.0, 7, 8) + b"img"
    packed = pack_record(RecordHeader(2, (1.0, 5.0), 0, 0))
    assert packed == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", 1.0, 5.0)
    assert unpack_record(packed + b"tail") == (RecordHeader(2, (1.0, 5.0), 0, 0), b"tail")
    with pytest.raises(ValueError, match="flag=3 but label has 2"):
        pack_record(RecordHeader(3, (1.0, 5.0), 0, 0))
    with pytest.raises(ValueError, match="needs a tuple"):
        pack_record(RecordHeader(1, 2.0, 0, 0))
    with pytest.raises(ValueError, match="shorter than"):
        unpack_record(b"\0" * 10)
    with pytest.raises(ValueError, match="flag=4"):
        unpack_record(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)


def test_writer_splits_at_aligned_magic_like_dmlc(tmp_path):
    assert MAGIC == struct.pack("<I", RECORD_MAGIC)
    # magic at aligned offsets 8 and 12 (back to back) and 20; unaligned at 26 (kept inline)
    payload = b"A" * 8 + MAGIC + MAGIC + b"B" * 4 + MAGIC + b"CC" + MAGIC + b"D"
    assert payload.find(MAGIC, 21) == 26
    tail = b"EFGH" + MAGIC  # aligned magic as the last 4 bytes: an empty last part
    with RecordIOWriter(tmp_path / "w.rec", tmp_path / "w.idx") as writer:
        writer.write(5, b"plain")
        writer.write(6, payload)
        writer.write(7, tail)
    first = frame(0, b"plain")
    second = frame(1, b"A" * 8) + frame(2, b"") + frame(2, b"B" * 4) + frame(3, b"CC" + MAGIC + b"D")
    assert (tmp_path / "w.rec").read_bytes() == first + second + frame(1, b"EFGH") + frame(3, b"")
    assert [cflag for _, cflag, _ in scan_cflags(tmp_path / "w.rec")] == [0, 1, 2, 2, 3, 1, 3]
    assert (tmp_path / "w.idx").read_text() == f"5\t0\n6\t{len(first)}\n7\t{len(first + second)}\n"
    reader = RecordIOReader(tmp_path / "w.rec", tmp_path / "w.idx")
    assert reader.read(6) == payload and reader.read(5) == b"plain" and reader.read(7) == tail


def test_record_with_magic_in_image_round_trips(tmp_path):
    image = b"\x89PNG" + MAGIC + b"rest" + MAGIC  # magic at payload offsets 28 and 36 (24-byte header first)
    payload = pack_record(RecordHeader(0, 1.0, 0, 0), image)
    assert payload.find(MAGIC) % 4 == 0
    with RecordIOWriter(tmp_path / "m.rec", tmp_path / "m.idx") as writer:
        writer.write(0, payload)
    assert {cflag for _, cflag, _ in scan_cflags(tmp_path / "m.rec")} >= {1, 3}
    reader = RecordIOReader(tmp_path / "m.rec", tmp_path / "m.idx")
    assert unpack_record(reader.read(0)) == (RecordHeader(0, 1.0, 0, 0), image)
    assert reader.read_header(0) == RecordHeader(0, 1.0, 0, 0)


def test_magic_inside_header_is_read_by_read_header(tmp_path):
    header = RecordHeader(0, 2.0, RECORD_MAGIC, 0)  # id's low word sits at payload offset 8: split inside the header
    with RecordIOWriter(tmp_path / "h.rec", tmp_path / "h.idx") as writer:
        writer.write(0, pack_record(header, b"image-bytes"))
    # 35 payload bytes: the first 8, the magic (dropped), the other 23
    assert [(cflag, length) for _, cflag, length in scan_cflags(tmp_path / "h.rec")] == [(1, 8), (3, 23)]
    reader = RecordIOReader(tmp_path / "h.rec", tmp_path / "h.idx")
    assert reader.read_header(0) == header
    assert unpack_record(reader.read(0)) == (header, b"image-bytes")


def test_reader_errors_name_file_and_offset(tmp_path):
    with RecordIOWriter(tmp_path / "e.rec", tmp_path / "e.idx") as writer:
        writer.write(0, b"x" * 10)
        writer.write(1, b"y" * 10)
    rec, idx = tmp_path / "e.rec", tmp_path / "e.idx"
    raw = rec.read_bytes()

    idx.write_text("0\t0\n1\t4\n")  # offset 4 lands inside record 0
    with pytest.raises(ValueError, match=r"bad magic 0x[0-9a-f]{8} at offset 4 in file .*e\.rec"):
        RecordIOReader(rec, idx).read(1)

    idx.write_text(f"0\t0\n1\t{len(raw) + 100}\n")
    with pytest.raises(ValueError, match="points past the end"):
        RecordIOReader(rec, idx).read(1)

    idx.write_text("0\t0\n1\t20\n")
    rec.write_bytes(raw[:-6])  # record 1 truncated
    with pytest.raises(ValueError, match="claims 10 bytes but the file ends"):
        RecordIOReader(rec, idx).read(1)

    idx.write_text("0\t0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"e\.idx: line 2: expected 'key<TAB>offset'"):
        RecordIOReader(rec, idx)

    rec.write_bytes(frame(2, b"abcd"))  # a continuation part where a record must start
    idx.write_text("0\t0\n")
    with pytest.raises(ValueError, match="cflag 2"):
        RecordIOReader(rec, idx).read(0)

    rec.write_bytes(frame(1, b"abcd") + frame(0, b"efgh"))  # split record whose next frame is not a continuation
    with pytest.raises(ValueError, match="expected a continuation part"):
        RecordIOReader(rec, idx).read(0)


# ---------------------------------------------------------------------------------------------- dataset level

LABELS = [2, 0, 1, 0, 2, 2]


def sorted_samples(images, labels):
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    return [images[i] for i in order], [labels[i] for i in order]


@pytest.fixture
def png_dataset(tmp_path):
    images = random_images(len(LABELS))
    write_insightface_record(tmp_path / "hdr", zip(images, LABELS), image_format="png")
    write_insightface_record(tmp_path / "flat", zip(images, LABELS), image_format="png", identity_header=False)
    return tmp_path, images


def test_identity_header_layout(png_dataset):
    root, images = png_dataset
    reader = RecordIOReader(root / "hdr" / "train.rec", root / "hdr" / "train.idx")
    assert reader.keys == list(range(10))  # header, 6 images, 3 identities
    assert reader.read_header(0) == RecordHeader(2, (7.0, 10.0), 0, 0)
    assert [reader.read_header(k).label for k in (7, 8, 9)] == [(1.0, 3.0), (3.0, 4.0), (4.0, 7.0)]
    assert (root / "hdr" / "property").read_text().strip() == "3,8,6"

    ds = InsightFaceRecordDataset(root / "hdr")
    want_images, want_labels = sorted_samples(images, LABELS)
    assert len(ds) == 6 and ds.keys == [1, 2, 3, 4, 5, 6]
    assert ds.targets == want_labels == [0, 0, 1, 2, 2, 2]
    assert ds.num_classes == 3 and ds.image_size == (8, 6)
    assert ds.identity_ranges == {0: (1, 3), 1: (3, 4), 2: (4, 7)}
    for i in range(6):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 6)
        assert isinstance(label, int) and label == want_labels[i]
        assert torch.equal(image, torch.from_numpy(want_images[i]).permute(2, 0, 1))  # PNG: pixel exact


def test_both_layouts_agree(png_dataset):
    root, _ = png_dataset
    flat_reader = RecordIOReader(root / "flat" / "train.rec", root / "flat" / "train.idx")
    assert flat_reader.keys == list(range(6)) and flat_reader.read_header(0).flag == 0
    hdr, flat = InsightFaceRecordDataset(root / "hdr"), InsightFaceRecordDataset(root / "flat")
    assert flat.identity_ranges == {} and flat.keys == list(range(6))
    assert flat.targets == hdr.targets and flat.num_classes == hdr.num_classes and flat.image_size == hdr.image_size
    for i in range(6):
        assert torch.equal(flat[i][0], hdr[i][0]) and flat[i][1] == hdr[i][1]


def test_jpeg_round_trip_and_inputs(tmp_path):
    arrays = [smooth_image(s) for s in range(4)]
    samples = [(arrays[0], 0), (torch.from_numpy(arrays[1]).permute(2, 0, 1), 1),
               (Image.fromarray(arrays[2]), 1), (arrays[3], np.int64(0))]
    write_insightface_record(tmp_path, samples, quality=95, rec_name="faces")
    ds = InsightFaceRecordDataset(tmp_path, rec_name="faces", transform=lambda t: t.float() / 255)
    assert ds.targets == [0, 0, 1, 1]
    for i, j in enumerate([0, 3, 1, 2]):
        image, _ = ds[i]
        assert image.dtype == torch.float32
        diff = (image * 255 - torch.from_numpy(arrays[j]).permute(2, 0, 1).float()).abs()
        assert diff.mean() < 4 and diff.max() < 48


def test_sparse_labels_get_empty_identity_ranges(tmp_path):
    write_insightface_record(tmp_path, zip(random_images(3), [3, 0, 3]), image_format="png")
    ds = InsightFaceRecordDataset(tmp_path)
    assert ds.num_classes == 4 and ds.targets == [0, 3, 3]
    assert ds.identity_ranges == {0: (1, 2), 1: (2, 2), 2: (2, 2), 3: (2, 4)}


def test_writer_rejects_bad_samples(tmp_path):
    with pytest.raises(ValueError, match="same size"):
        write_insightface_record(tmp_path, [(np.zeros((4, 4, 3), np.uint8), 0), (np.zeros((5, 4, 3), np.uint8), 0)])
    with pytest.raises(ValueError, match="no samples"):
        write_insightface_record(tmp_path, [])
    with pytest.raises(ValueError, match="must be in"):
        write_insightface_record(tmp_path, [(np.zeros((4, 4, 3), np.uint8), -1)])
    with pytest.raises(ValueError, match="uint8"):
        write_insightface_record(tmp_path, [(np.zeros((4, 4, 3), np.float32), 0)])
    assert not (tmp_path / "train.rec").exists()


def test_dataset_errors(tmp_path):
    write_insightface_record(tmp_path, zip(random_images(3), [0, 1, 1]), image_format="png")
    prop = tmp_path / "property"
    prop.write_text("1,8,6\n")
    with pytest.raises(ValueError, match="num_classes=1 but .* has label 1"):
        InsightFaceRecordDataset(tmp_path)
    prop.write_text("2;8;6\n")
    with pytest.raises(ValueError, match="expected 'num_classes,H,W'"):
        InsightFaceRecordDataset(tmp_path)
    prop.unlink()
    with pytest.raises(FileNotFoundError, match="property"):
        InsightFaceRecordDataset(tmp_path)

    prop.write_text("2,8,6\n")  # identity header announcing a key the index lacks
    idx = tmp_path / "train.idx"
    idx.write_text("".join(line for line in idx.read_text().splitlines(True) if not line.startswith("2\t")))
    with pytest.raises(ValueError, match="missing from .*train.idx"):
        InsightFaceRecordDataset(tmp_path)


def test_undecodable_image_names_key(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(RecordHeader(0, 0.0, 0, 0), png_bytes(random_images(1)[0])))
        writer.write(1, pack_record(RecordHeader(0, 1.0, 1, 0), b"not an image at all"))
    (tmp_path / "property").write_text("2,8,6")
    ds = InsightFaceRecordDataset(tmp_path)  # no identity header: every key is an image
    assert ds.targets == [0, 1] and ds.identity_ranges == {}
    assert ds[0][0].shape == (3, 8, 6)
    with pytest.raises(ValueError, match="record key 1: image failed to decode"):
        ds[1]


def test_dataloader_with_workers(png_dataset):
    root, _ = png_dataset
    ds = InsightFaceRecordDataset(root / "hdr")
    first = ds[0][0]  # the parent has the file open before the workers fork
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    images, labels = zip(*loader)
    images, labels = torch.cat(images), torch.cat(labels)
    assert labels.tolist() == ds.targets
    assert torch.equal(images[0], first)
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(len(ds))]))
    state = pickle.loads(pickle.dumps(ds))  # spawn-style workers pickle the dataset
    assert torch.equal(state[5][0], images[5])


# ---------------------------------------------------------------------------------------------- .bin pair sets


def test_verification_bin_round_trip_png(tmp_path):
    images = torch.from_numpy(np.stack(random_images(4, 12, 10))).permute(0, 3, 1, 2).contiguous()
    write_verification_bin(tmp_path / "p.bin", images, [True, False], image_format="png")
    with open(tmp_path / "p.bin", "rb") as f:
        assert f.read(2) == b"\x80\x04"  # protocol 4
    bins, issame = pickle.loads((tmp_path / "p.bin").read_bytes())
    assert issame == [True, False] and all(isinstance(b, bytes) for b in bins) and len(bins) == 4
    out, same = read_verification_bin(tmp_path / "p.bin")
    assert out.dtype == torch.uint8 and torch.equal(out, images)
    assert same.dtype == torch.bool and same.tolist() == [True, False]


def test_verification_bin_jpeg_and_resize(tmp_path):
    arrays = [smooth_image(s, 20, 20) for s in range(2)]
    write_verification_bin(tmp_path / "j.bin", arrays, torch.tensor([True]))
    out, same = read_verification_bin(tmp_path / "j.bin")
    assert out.shape == (2, 3, 20, 20) and same.tolist() == [True]
    assert (out.float() - torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()).abs().mean() < 4
    small, _ = read_verification_bin(tmp_path / "j.bin", image_size=10)
    want = np.array(Image.fromarray(out[0].permute(1, 2, 0).numpy()).resize((10, 10), Image.BILINEAR))
    assert small.shape == (2, 3, 10, 10)
    assert torch.equal(small[0].permute(1, 2, 0), torch.from_numpy(want))


def test_python3_protocol2_pickles(tmp_path):
    arrays = random_images(4, 8, 8)
    bins = [png_bytes(a) for a in arrays]
    (tmp_path / "b.bin").write_bytes(pickle.dumps((bins, [False, True]), protocol=2))  # bytes via _codecs.encode
    out, same = read_verification_bin(tmp_path / "b.bin")
    assert torch.equal(out, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)) and same.tolist() == [False, True]

    as_arrays = [np.frombuffer(b, dtype=np.uint8) for b in bins]
    for protocol in (2, 5):
        (tmp_path / "n.bin").write_bytes(pickle.dumps((as_arrays, np.array([False, True])), protocol=protocol))
        out2, same2 = read_verification_bin(tmp_path / "n.bin")
        assert torch.equal(out2, out) and same2.tolist() == [False, True]


def _py2_str(data):
    return b"T" + struct.pack("<i", len(data)) + data  # BINSTRING: a Python 2 str


def _py2_uint8_array(data):
    """Opcodes Python 2 numpy writes for np.frombuffer(data, np.uint8) (str payloads, numpy.core names)."""
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
            + b"(K\x01" + b"J" + struct.pack("<i", len(data)) + b"\x85"
            + b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
            + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            + b"\x89" + _py2_str(data) + b"tb")


def _py2_pickle(items, issame):
    """A protocol-2 pickle as Python 2 writes it: ([str or ndarray, ...], [bool, ...])."""
    out = b"\x80\x02](" + b"".join(items) + b"e](" + b"".join(b"\x88" if s else b"\x89" for s in issame)
    return out + b"e\x86."


def test_python2_pickles_load_with_bytes_encoding(tmp_path):
    arrays = random_images(2, 8, 8, seed=3)
    bins = [png_bytes(a) for a in arrays]
    data = _py2_pickle([_py2_str(b) for b in bins], [True])
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # what a plain Python 3 load does with it
    (tmp_path / "py2.bin").write_bytes(data)
    out, same = read_verification_bin(tmp_path / "py2.bin")
    assert torch.equal(out, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)) and same.tolist() == [True]

    (tmp_path / "py2np.bin").write_bytes(_py2_pickle([_py2_uint8_array(b) for b in bins], [True]))
    out2, _ = read_verification_bin(tmp_path / "py2np.bin")
    assert torch.equal(out2, out)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_Exploit(marker), b""], [True]), protocol=2))
    message = r"evil\.bin: pickle refers to disallowed global '(posix|os|nt)\.system'"
    with pytest.raises(UnsafePickleError, match=message):
        read_verification_bin(tmp_path / "evil.bin")
    assert not marker.exists()

    (tmp_path / "eval.bin").write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(UnsafePickleError, match="'builtins.eval'"):
        read_verification_bin(tmp_path / "eval.bin")

    codec = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00base64\x86R."
    (tmp_path / "codec.bin").write_bytes(codec)
    with pytest.raises(UnsafePickleError, match="latin-1"):
        read_verification_bin(tmp_path / "codec.bin")


def test_verification_bin_errors(tmp_path):
    a, b = random_images(2, 8, 8)
    c = random_images(1, 10, 10)[0]
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps(([png_bytes(a), png_bytes(c)], [True])))
    with pytest.raises(ValueError, match="image 1 is 10x10 but image 0 is 8x8; pass image_size"):
        read_verification_bin(path)
    assert read_verification_bin(path, image_size=8)[0].shape == (2, 3, 8, 8)

    path.write_bytes(pickle.dumps(([png_bytes(a), png_bytes(b), png_bytes(a)], [True])))
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        read_verification_bin(path)

    path.write_bytes(pickle.dumps(([png_bytes(a), b"garbage"], [False])))
    with pytest.raises(ValueError, match=r"image 1 \(pair 0\) failed to decode"):
        read_verification_bin(path)

    good = pickle.dumps(([png_bytes(a), png_bytes(b)], [False]))
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"x\.bin: not a readable pickle"):
        read_verification_bin(path)

    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_verification_bin(path, [a, b, a], [True])
