"""mmdet backend: the pure-PyTorch mmcv ``_ext`` shim against references, and a tiny DETR-family detector end to end.

Everything runs offline on CPU at one torch thread; downloads are made to fail loudly.
"""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet (with mmengine and mmcv / mmcv-lite) is not installed")
pytest.importorskip("mmengine", reason="mmengine is not installed")
pytest.importorskip("mmcv", reason="mmcv / mmcv-lite is not installed")

from lightning_plugins.modules.detection.backends import mmcv_ops  # noqa: E402
from lightning_plugins.modules.detection.backends.mmdet import (  # noqa: E402
    DETR_FFN_TARGET,
    TINY_DETR_OVERRIDES,
    MMDetBackend,
    _prepare_model_cfg,
    find_config,
)


def _no_download(*args, **kwargs):
    raise RuntimeError(f"network access attempted in an offline test: {args[:1]}")


@pytest.fixture(scope="module", autouse=True)
def offline_shim():
    """Shim installed (as MMDetBackend does) and every download entry point made to raise, for the module."""
    import urllib.request

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(torch.hub, "load_state_dict_from_url", _no_download)
        mp.setattr(torch.hub, "download_url_to_file", _no_download)
        mp.setattr(urllib.request, "urlopen", _no_download)
        mmcv_ops.install()
        yield


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ------------------------------------------------------------------------------------------------------ shim ops
def _boxes(n: int, size: float = 50.0, generator=None) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_nms_matches_torchvision():
    from mmcv.ops import batched_nms, nms
    from torchvision.ops import batched_nms as tv_batched_nms
    from torchvision.ops import nms as tv_nms

    g = torch.Generator().manual_seed(0)
    boxes, scores = _boxes(300, generator=g), torch.rand(300, generator=g, dtype=torch.float64)
    for thr in (0.3, 0.5, 0.7):
        dets, keep = nms(boxes, scores, thr)
        assert torch.equal(keep, tv_nms(boxes, scores, thr))
        assert torch.equal(dets[:, 4], scores[keep])
        # legacy offset=1 convention == torchvision on boxes grown by one pixel
        _, keep1 = nms(boxes, scores, thr, offset=1)
        grown = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        assert torch.equal(keep1, tv_nms(grown, scores, thr))
    idxs = torch.randint(0, 4, (300,), generator=g)
    _, keep = batched_nms(boxes, scores, idxs, dict(type="nms", iou_threshold=0.5))
    assert torch.equal(keep, tv_batched_nms(boxes, scores, idxs, 0.5))
    _, empty = nms(boxes[:0], scores[:0], 0.5)
    assert empty.numel() == 0


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (False, 0)])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
    from mmcv.ops import RoIAlign
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(1)
    feats = torch.rand(2, 3, 16, 20, generator=g, dtype=torch.float64)
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).double(), _boxes(12, 30.0, g)], dim=1)
    x1 = feats.clone().requires_grad_(True)
    x2 = feats.clone().requires_grad_(True)
    layer = RoIAlign((5, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio, pool_mode="avg", aligned=aligned)
    out = layer(x1, rois)
    ref = roi_align(x2, rois, (5, 4), 0.5, sampling_ratio, aligned)
    assert torch.equal(out, ref)
    grad = torch.rand(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x1.grad, x2.grad)

    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        RoIAlign((5, 4), 0.5, pool_mode="max")(feats, rois)


def test_ms_deform_attn_function_equals_pytorch_reference():
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction, multi_scale_deformable_attn_pytorch

    g = torch.Generator().manual_seed(2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    bs, heads, dims, queries, levels, points = 2, 2, 4, 5, 2, 3
    keys = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.rand(bs, keys, heads, dims, generator=g, dtype=torch.float64)
    loc = torch.rand(bs, queries, heads, levels, points, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(bs, queries, heads, levels, points, generator=g, dtype=torch.float64).softmax(-1)
    a = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    b = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    out = MultiScaleDeformableAttnFunction.apply(a[0], shapes, start, a[1], a[2], 64)
    ref = multi_scale_deformable_attn_pytorch(b[0], shapes, b[1], b[2])
    assert out.shape == (bs, queries, heads * dims)
    assert (out - ref).abs().max().item() == 0.0
    grad = torch.rand(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    for x, y in zip(a, b):
        assert (x.grad - y.grad).abs().max().item() == 0.0


def test_sigmoid_focal_loss_matches_mmdet_reference():
    from mmcv.ops import sigmoid_focal_loss
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    g = torch.Generator().manual_seed(3)
    n, c = 40, 5
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    target = torch.randint(0, c + 1, (n,), generator=g)  # c == background
    one_hot = torch.nn.functional.one_hot(target, c + 1)[:, :c]
    for reduction in ("none", "sum", "mean"):
        got = sigmoid_focal_loss(logits, target, 2.0, 0.25, None, reduction)
        ref = py_sigmoid_focal_loss(ref_logits, one_hot, None, 2.0, 0.25, "none")
        ref = {"none": ref, "sum": ref.sum(), "mean": ref.sum() / n}[reduction]
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    weights = torch.rand(n, c, generator=g, dtype=torch.float64)
    (sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "none") * weights).sum().backward()
    (py_sigmoid_focal_loss(ref_logits, one_hot, None, 2.0, 0.25, "none") * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-10, atol=1e-12)


def test_unsupported_op_raises_clear_error():
    from mmcv.ops import DeformConv2d

    layer = DeformConv2d(3, 4, 3, padding=1)
    x, offset = torch.rand(1, 3, 8, 8), torch.zeros(1, 18, 8, 8)
    with pytest.raises(NotImplementedError) as info:
        layer(x, offset)
    message = str(info.value)
    assert "deform_conv_forward" in message and "deformable convolution" in message
    assert "mmcv==2.1.0" in message and "--no-binary" in message


def test_install_idempotent_and_noop_with_compiled_ext(monkeypatch):
    shim = sys.modules[mmcv_ops.EXT_NAME]
    assert mmcv_ops.is_installed() and not mmcv_ops.compiled_ext_available()
    assert mmcv_ops.install() is True and mmcv_ops.install() is True
    assert sys.modules[mmcv_ops.EXT_NAME] is shim
    # no loader on the spec: mmengine's mmcv_full_available() does not mistake the shim for a full mmcv
    from mmengine.utils.dl_utils import mmcv_full_available

    assert not mmcv_full_available()

    # a compiled extension on disk (find_spec finds a loader): install() changes nothing
    monkeypatch.delitem(sys.modules, mmcv_ops.EXT_NAME)
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == mmcv_ops.EXT_NAME:
            return importlib.machinery.ModuleSpec(name, loader=object(), origin="/x/mmcv/_ext.so")
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    assert mmcv_ops.compiled_ext_available()
    assert mmcv_ops.install() is False
    assert mmcv_ops.EXT_NAME not in sys.modules
    # a compiled extension already imported: left alone
    compiled = types.ModuleType(mmcv_ops.EXT_NAME)
    monkeypatch.setitem(sys.modules, mmcv_ops.EXT_NAME, compiled)
    assert mmcv_ops.install() is False and sys.modules[mmcv_ops.EXT_NAME] is compiled


# ------------------------------------------------------------------------------------------------------ configs
def test_config_resolution_and_preparation():
    path = find_config("deformable-detr_r50_16xb2-50e_coco")
    assert path.endswith("deformable_detr/deformable-detr_r50_16xb2-50e_coco.py")
    assert find_config("deformable-detr/deformable-detr_r50_16xb2-50e_coco") == path
    assert find_config("mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py") == path
    assert find_config(path) == path
    with pytest.raises(FileNotFoundError, match="Did you mean: deformable-detr_r50_16xb2-50e_coco"):
        find_config("deformable-detr_r50_16xb2-50e_cocco")

    from mmengine.config import Config

    model = Config.fromfile(find_config("cascade-rcnn_r50_fpn_1x_coco")).model.to_dict()
    cfg = _prepare_model_cfg(model, 7, {"backbone": {"depth": 18}}, 0.0, 50, False)
    assert cfg["rpn_head"].get("num_classes", 1) == 1  # class-agnostic RPN untouched
    assert [h["num_classes"] for h in cfg["roi_head"]["bbox_head"]] == [7, 7, 7]
    assert cfg["backbone"]["init_cfg"] is None and cfg["backbone"]["frozen_stages"] == -1
    assert cfg["backbone"]["norm_cfg"] == dict(type="BN", requires_grad=True) and not cfg["backbone"]["norm_eval"]
    assert cfg["neck"]["in_channels"] == [64, 128, 256, 512]
    assert cfg["test_cfg"]["rcnn"]["score_thr"] == 0.0 and cfg["test_cfg"]["rcnn"]["max_per_img"] == 50
    assert cfg["test_cfg"]["rpn"]["max_per_img"] == 1000  # proposals untouched
    with pytest.raises(ValueError, match="pretrained weights"):
        _prepare_model_cfg(model, 7, {"neck": {"init_cfg": dict(type="Xavier", checkpoint="https://x/y.pth")}},
                           0.0, 50, False)


def test_split_losses_rule():
    split = MMDetBackend.split_losses
    one = torch.tensor(1.0)
    keys = ["loss_cls", "d0.loss_cls", "enc_loss_cls", "dn_loss_cls", "d1.dn_loss_cls", "loss_rpn_cls", "s2.loss_cls",
            "loss_obj", "loss_bbox", "d0.loss_iou", "enc_loss_bbox", "loss_rpn_bbox", "loss_centerness", "loss_l1",
            "s1.loss_bbox", "loss_dfl"]
    parts = split(None, {k: one for k in keys} | {"loss_mask": one})
    assert parts["cls"].item() == 8 and parts["box"].item() == 8
    with pytest.raises(KeyError, match="loss_foo"):
        split(None, {"loss_cls": one, "loss_foo": one})


# ------------------------------------------------------------------------------------------------------ end to end
def _rectangles(n: int, size: int, num_classes: int, generator: torch.Generator):
    images, targets = [], []
    for _ in range(n):
        image = torch.zeros(3, size, size)
        w, h = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=generator))
        x, y = (int(v) for v in torch.randint(0, size - max(w, h), (2,), generator=generator))
        label = int(torch.randint(0, num_classes, (1,), generator=generator))
        image[label % 3, y:y + h, x:x + w] = 1.0  # class <-> colour
        images.append(image)
        targets.append({"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
                        "labels": torch.tensor([label])})
    return images, targets


def test_deformable_detr_trains_predicts_and_exposes_ffns():
    torch.manual_seed(0)
    num_classes, size = 2, 64
    backend = MMDetBackend(num_classes=num_classes, model="deformable-detr_r50_16xb2-50e_coco",
                           model_overrides=TINY_DETR_OVERRIDES)
    assert backend.num_classes == num_classes and backend.gslora_target == DETR_FFN_TARGET

    ffns = {name: type(m) for name, m in backend.named_modules() if re.fullmatch(backend.gslora_target, name)}
    assert sorted(ffns) == [
        "detector.decoder.layers.0.ffn.layers.0.0", "detector.decoder.layers.0.ffn.layers.1",
        "detector.encoder.layers.0.ffn.layers.0.0", "detector.encoder.layers.0.ffn.layers.1",
    ]
    assert all(issubclass(t, torch.nn.Linear) for t in ffns.values())

    g = torch.Generator().manual_seed(0)
    data = [_rectangles(2, size, num_classes, g) for _ in range(4)]
    optimizer = torch.optim.AdamW(backend.parameters(), lr=2e-4)
    backend.train()
    history = []
    for step in range(50):
        images, targets = data[step % len(data)]
        losses = backend.losses(images, targets)
        parts = backend.split_losses(losses)
        total = sum(losses.values())
        torch.testing.assert_close(parts["cls"] + parts["box"], total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    first, last = sum(history[:25]) / 25, sum(history[25:]) / 25
    assert last < 0.5 * first, (first, last)

    backend.eval()
    images, _ = data[0]
    images = images + [torch.rand(3, 48, 80)]  # sizes may differ
    bn = next(m for m in backend.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    with torch.no_grad():
        predictions = backend.predict(images)
        eval_losses = backend.losses(*data[0])  # losses work in eval mode too: training graph, frozen BN, no dropout
        again = backend.losses(*data[0])
    assert set(eval_losses) == set(losses) and all(torch.equal(eval_losses[k], again[k]) for k in again)
    assert torch.equal(bn.running_mean, stats) and not any(m.training for m in backend.modules())
    for image, pred in zip(images, predictions):
        h, w = image.shape[1:]
        k = pred["boxes"].shape[0]
        assert k > 0 and pred["boxes"].shape == (k, 4) and pred["scores"].shape == (k,) and pred["labels"].shape == (k,)
        assert pred["labels"].dtype == torch.int64 and pred["labels"].min() >= 0 and pred["labels"].max() < num_classes
        assert pred["scores"].min() >= 0 and pred["scores"].max() <= 1
        assert torch.all(pred["scores"][:-1] >= pred["scores"][1:])
        boxes = pred["boxes"]
        assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0 and boxes[:, 2].max() <= w and boxes[:, 3].max() <= h
        assert torch.all(boxes[:, 2] >= boxes[:, 0]) and torch.all(boxes[:, 3] >= boxes[:, 1])

    # images without objects
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    with torch.no_grad():
        assert all(torch.isfinite(v) for v in backend.losses([images[0]], [empty]).values())

    # the state dict round-trips through a plain nn.Module load (no mmengine checkpoint loader)
    clone = MMDetBackend(num_classes=num_classes, model="deformable-detr_r50_16xb2-50e_coco",
                         model_overrides=TINY_DETR_OVERRIDES).eval()
    clone.load_state_dict(backend.state_dict())
    with torch.no_grad():
        again = clone.predict(images)[0]
    torch.testing.assert_close(again["scores"], predictions[0]["scores"])
    torch.testing.assert_close(again["boxes"], predictions[0]["boxes"])


def test_compiled_only_op_config_gives_clear_error():
    backend = MMDetBackend(num_classes=2, model="faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco",
                           model_overrides={"backbone": {"base_channels": 8}})
    assert backend.gslora_target is None
    images, targets = _rectangles(1, 64, 2, torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match=r"mmcv\._ext\.deform_conv_forward is not available.*DCN"):
        backend.losses(images, targets)
