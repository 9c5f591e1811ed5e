"""MTCNN detection + ArcFace 5-point alignment (``modules/face/align.py``), checked against scikit-image references."""

import importlib.util
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("facenet_pytorch")
skdata = pytest.importorskip("skimage.data")
sktransform = pytest.importorskip("skimage.transform")

from lightning_plugins.modules.face import align as align_mod  # noqa: E402
from lightning_plugins.modules.face.align import (  # noqa: E402
    ARCFACE_TEMPLATE_112,
    FaceAligner,
    arcface_template,
    estimate_similarity,
    warp_faces,
)

# Measured with facenet-pytorch 2.6.0 on skimage.data.astronaut().
ASTRONAUT_BOX = [181.1, 62.2, 267.7, 172.1]
ASTRONAUT_POINTS = [[205.0, 101.7], [246.8, 103.7], [224.7, 129.0], [201.7, 139.2], [245.3, 141.9]]


def _similarity(scale, degrees, tx, ty):
    a = np.radians(degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(mat, pts):
    mat = np.asarray(mat, dtype=np.float64)
    return np.asarray(pts, dtype=np.float64) @ mat[:, :2].T + mat[:, 2]


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()


@pytest.fixture(scope="module")
def lfw_uint8():
    return (skdata.lfw_subset() * 255).round().astype(np.uint8)  # [200, 25, 25]: 100 faces, then 100 non-faces


@pytest.fixture(scope="module")
def aligner():
    return FaceAligner()


@pytest.fixture(scope="module")
def astronaut_face(aligner, astronaut):
    return aligner.align_image(astronaut)


# ------------------------------------------------------------------------------------------------ template / math
def test_template_sizes():
    assert ARCFACE_TEMPLATE_112.shape == (5, 2) and ARCFACE_TEMPLATE_112.dtype == torch.float32
    torch.testing.assert_close(arcface_template(112), ARCFACE_TEMPLATE_112)
    torch.testing.assert_close(arcface_template(224), ARCFACE_TEMPLATE_112 * 2)
    expected_128 = ARCFACE_TEMPLATE_112.clone()
    expected_128[:, 0] += 8.0
    torch.testing.assert_close(arcface_template(128), expected_128)
    expected_256 = ARCFACE_TEMPLATE_112 * 2
    expected_256[:, 0] += 16.0
    torch.testing.assert_close(arcface_template(256), expected_256)
    with pytest.raises(ValueError, match="160"):
        arcface_template(160)


def test_estimate_similarity_recovers_known_transform():
    dst = ARCFACE_TEMPLATE_112.double().numpy()
    truths = [_similarity(1.7, 23.0, -40.0, 12.5), _similarity(0.45, -110.0, 300.0, -7.0)]
    # src = truth^-1(dst), so the map src -> dst is exactly ``truth``.
    srcs = []
    for t in truths:
        inv = np.linalg.inv(np.vstack([t, [0, 0, 1]]))[:2]
        srcs.append(_apply(inv, dst))
    mats = estimate_similarity(torch.tensor(np.stack(srcs)), torch.tensor(dst))
    assert mats.shape == (2, 2, 3) and mats.dtype == torch.float64
    for mat, truth in zip(mats.numpy(), truths):
        np.testing.assert_allclose(mat, truth, atol=1e-9)
    single = estimate_similarity(torch.tensor(srcs[0], dtype=torch.float32), ARCFACE_TEMPLATE_112)
    assert single.shape == (2, 3) and single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), truths[0], atol=1e-3)


def test_estimate_similarity_matches_skimage_on_noisy_points():
    rng = np.random.default_rng(0)
    dst = ARCFACE_TEMPLATE_112.double().numpy()
    srcs = np.stack([_apply(_similarity(rng.uniform(0.3, 3), rng.uniform(-60, 60), *rng.uniform(-50, 300, 2)), dst)
                     + rng.normal(0, 3, (5, 2)) for _ in range(4)])
    mats = estimate_similarity(torch.tensor(srcs), torch.tensor(dst)).numpy()
    for src, mat in zip(srcs, mats):
        ref = sktransform.SimilarityTransform.from_estimate(src, dst)
        np.testing.assert_allclose(mat, ref.params[:2], atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------- warp
def test_warp_matches_skimage(astronaut):
    crop = np.ascontiguousarray(astronaut[40:240, 150:330])
    mats = np.stack([_similarity(0.8, 17.0, 20.3, -30.7), _similarity(1.3, -5.0, -60.0, -20.0)])
    images = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0).repeat(2, 1, 1, 1)
    out_u8 = warp_faces(images, torch.tensor(mats), 112)
    out_f = warp_faces(images.double() / 255, torch.tensor(mats), 112)
    assert out_u8.shape == (2, 3, 112, 112) and out_u8.dtype == torch.uint8 and out_f.dtype == torch.float64
    for i, mat in enumerate(mats):
        tform = sktransform.AffineTransform(matrix=np.vstack([mat, [0, 0, 1]]))
        ref = sktransform.warp(crop, inverse_map=tform.inverse, output_shape=(112, 112), order=1)  # float [0, 1]
        got_f = out_f[i].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got_f, ref, atol=1e-9)
        diff = np.abs(out_u8[i].permute(1, 2, 0).numpy().astype(np.float64) - ref * 255)
        assert diff.mean() <= 0.5 and diff.max() <= 0.5 + 1e-6  # only uint8 rounding


def test_warp_integer_translation_is_exact():
    img = torch.randint(1, 256, (2, 3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mats = torch.tensor([[[1.0, 0.0, 5.0], [0.0, 1.0, -3.0]], [[1.0, 0.0, -7.0], [0.0, 1.0, 2.0]]])
    out = warp_faces(img, mats, 32)
    assert torch.equal(out[0, :, 0:32, 5:32], img[0, :, 3:35, 0:27])  # out[y, x] = img[y + 3, x - 5]
    assert (out[0, :, :, :5] == 0).all()
    assert torch.equal(out[1, :, 2:32, 0:32], img[1, :, 0:30, 7:39])  # out[y, x] = img[y - 2, x + 7]
    assert (out[1, :, :2] == 0).all()


# ----------------------------------------------------------------------------------------------------- detection
def test_astronaut_one_face_aligned_to_template(aligner, astronaut_face):
    face = astronaut_face
    assert face.image is not None and not face.from_cache
    assert face.image.shape == (3, 112, 112) and face.image.dtype == torch.uint8
    np.testing.assert_allclose(face.box, ASTRONAUT_BOX, atol=3.0)
    np.testing.assert_allclose(face.landmarks, ASTRONAUT_POINTS, atol=3.0)
    assert face.prob > 0.99
    # The detected points, mapped by the fitted similarity, sit on the template.
    mat = estimate_similarity(torch.tensor(face.landmarks), ARCFACE_TEMPLATE_112).double().numpy()
    residual = np.linalg.norm(_apply(mat, face.landmarks) - ARCFACE_TEMPLATE_112.double().numpy(), axis=1)
    assert residual.mean() < 8.0
    lin = mat[:, :2]
    assert abs(np.sqrt(np.linalg.det(lin)) - 0.882) < 0.02
    assert abs(np.degrees(np.arctan2(lin[1, 0], lin[0, 0])) - (-3.7)) < 1.0
    # End to end: re-detect on the aligned crop (upsampled for MTCNN); its eyes land on the template's eyes.
    redetect = FaceAligner(min_upsample=160).align_image(face.image)
    assert redetect.image is not None
    eyes = np.asarray(redetect.landmarks)[:2]
    assert np.linalg.norm(eyes - ARCFACE_TEMPLATE_112.numpy()[:2], axis=1).max() < 4.0


def test_input_types_and_largest_face(aligner, astronaut, astronaut_face):
    # uint8 CHW tensor and PIL give the same crop as the HWC array.
    as_tensor = aligner.align_image(torch.from_numpy(astronaut).permute(2, 0, 1))
    assert torch.equal(as_tensor.image, astronaut_face.image)
    with pytest.raises(ValueError, match="uint8"):
        aligner.align_image(torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255)
    # Two faces: a full-size astronaut and a half-size one; "largest" keeps the full-size one.
    small = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.BICUBIC))
    canvas = np.zeros((512, 800, 3), np.uint8)
    canvas[:, 288:] = astronaut
    canvas[100:356, :256] = small
    face = aligner.align_image(Image.fromarray(canvas))
    np.testing.assert_allclose(face.box, np.add(ASTRONAUT_BOX, [288, 0, 288, 0]), atol=3.0)


def test_lfw_subset_faces_and_non_faces(lfw_uint8):
    aligner = FaceAligner(min_upsample=160)
    faces = [aligner.align_image(lfw_uint8[i]) for i in range(4)]
    others = [aligner.align_image(lfw_uint8[100 + i]) for i in range(4)]
    assert all(f.image is not None and f.image.shape == (3, 112, 112) for f in faces)
    assert all(f.image is None and f.box is None and f.landmarks is None and f.prob is None for f in others)
    # Landmarks are mapped back to the 25x25 crop.
    assert all(0 <= x <= 25 and 0 <= y <= 25 for f in faces for x, y in f.landmarks)
    assert aligner.stats == {"images": 8, "faces": 4, "no_face": 4, "cache_hits": 0, "detector_runs": 8}


# --------------------------------------------------------------------------------------------------------- cache
def test_cache_reuses_results_by_content(tmp_path, astronaut, lfw_uint8, caplog):
    src = tmp_path / "images"
    src.mkdir()
    paths = [src / "astronaut.png"]
    Image.fromarray(astronaut).save(paths[0])
    for i in (0, 1, 100, 101):
        paths.append(src / f"lfw_{i}.png")
        Image.fromarray(lfw_uint8[i]).save(paths[-1])
    cache = tmp_path / "cache"

    first = FaceAligner(cache_dir=cache, min_upsample=160)
    with caplog.at_level(logging.INFO, logger=align_mod.__name__):
        res1 = first.align_files(paths, progress=False)
    assert [r.image is not None for r in res1] == [True, True, True, False, False]
    assert first.stats["detector_runs"] == 5 and first.stats["cache_hits"] == 0
    assert any("5 files" in rec.getMessage() for rec in caplog.records)

    second = FaceAligner(cache_dir=cache, min_upsample=160)
    res2 = second.align_files(paths, progress=False)
    assert second.stats == {"images": 5, "faces": 3, "no_face": 2, "cache_hits": 5, "detector_runs": 0}
    assert all(r.from_cache for r in res2)
    for a, b in zip(res1, res2):
        assert (a.image is None) == (b.image is None)
        if a.image is not None:
            assert torch.equal(a.image, b.image) and b.image.dtype == torch.uint8
            np.testing.assert_allclose(b.landmarks, a.landmarks)
            assert b.box == pytest.approx(a.box) and b.prob == pytest.approx(a.prob)

    # The key is the content: a copy under another name hits.
    copy = tmp_path / "renamed.png"
    shutil.copy(paths[1], copy)
    assert second.align_file(copy).from_cache and second.stats["detector_runs"] == 0

    # Another setting misses.
    other = FaceAligner(cache_dir=cache, min_upsample=160, thresholds=(0.6, 0.7, 0.8))
    res3 = other.align_files(paths[1:3], progress=False)
    assert other.stats["detector_runs"] == 2 and not any(r.from_cache for r in res3)

    # align_image with a key uses the cache too.
    keyed = FaceAligner(cache_dir=cache, min_upsample=160)
    keyed.align_image(lfw_uint8[0], key="lfw-0")
    again = keyed.align_image(lfw_uint8[0], key="lfw-0")
    assert again.from_cache and keyed.stats["detector_runs"] == 1


# -------------------------------------------------------------------------------------------------------- errors
def test_missing_facenet_raises_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # makes ``import facenet_pytorch`` fail
    # The module itself imports without facenet-pytorch (loaded afresh under another name).
    spec = importlib.util.spec_from_file_location("_face_align_without_facenet", align_mod.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(fresh)
    with pytest.raises(ImportError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        fresh.FaceAligner()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"select": "first"}, r"'first'.*largest.*probable"),
        ({"image_size": 160}, "160"),
        ({"thresholds": (0.6, 0.7, 1.2)}, r"1\.2"),
        ({"factor": 1.5}, r"1\.5"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaceAligner(**kwargs)
