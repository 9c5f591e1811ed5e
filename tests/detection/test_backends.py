"""Detection backends: the torchvision and transformers adapters behind one contract, and the registry."""

import pytest
import torch

from lightning_plugins.modules.detection.backends import build_backend
from lightning_plugins.modules.detection.backends.transformers import cxcywh_to_xyxy, xyxy_to_cxcywh

TV_MODELS = ["fcos", "retinanet", "fasterrcnn", "ssdlite"]
LOSS_KEYS = {
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "retinanet": {"classification", "bbox_regression"},
    "fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "ssdlite": {"classification", "bbox_regression"},
}
TINY_DETR = dict(d_model=64, encoder_layers=1, decoder_layers=2, ffn_dim=128, num_queries=20, num_heads=4,
                 backbone_depths=[1, 1, 1, 1], backbone_widths=[16, 32, 64, 64])


def rectangles(n=2, size=64, label=2, seed=0):
    """White rectangles on black canvases with their exact boxes (one per image)."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        w, h = (int(v) for v in torch.randint(14, 30, (2,), generator=gen))
        x, y = (int(v) for v in torch.randint(0, size - 30, (2,), generator=gen))
        image = torch.zeros(3, size, size)
        image[:, y:y + h, x:x + w] = 1.0
        images.append(image)
        targets.append({"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
                        "labels": torch.tensor([label])})
    return images, targets


def check_predictions(predictions, images, num_classes):
    assert len(predictions) == len(images)
    for pred, image in zip(predictions, images):
        assert set(pred) == {"boxes", "scores", "labels"}
        k = len(pred["scores"])
        assert pred["boxes"].shape == (k, 4) and pred["labels"].shape == (k,) and pred["labels"].dtype == torch.int64
        if k:
            height, width = image.shape[-2:]
            assert (pred["labels"] >= 0).all() and (pred["labels"] < num_classes).all()
            assert (pred["scores"] >= 0).all() and (pred["scores"] <= 1).all()
            assert (pred["boxes"][:, 0::2] >= -1e-4).all() and (pred["boxes"][:, 0::2] <= width + 1e-4).all()
            assert (pred["boxes"][:, 1::2] >= -1e-4).all() and (pred["boxes"][:, 1::2] <= height + 1e-4).all()
            assert (pred["scores"][:-1] >= pred["scores"][1:]).all()  # best first


def bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("model", TV_MODELS)
def test_torchvision_losses_predictions_and_frozen_bn(model):
    torch.manual_seed(0)
    backend = build_backend("torchvision", model, num_classes=3)
    assert backend.num_classes == 3
    images, targets = rectangles()
    backend.train()
    losses = backend.losses(images, targets)
    assert set(losses) == LOSS_KEYS[model] and all(torch.isfinite(v) for v in losses.values())
    split = backend.split_losses(losses)
    assert torch.allclose(split["cls"] + split["box"], sum(losses.values()))
    # eval mode: the same terms as train mode with frozen BN, and no running statistic changes
    backend.eval()
    before = bn_state(backend)
    assert before, "the detector should have BatchNorm running statistics"
    eval_losses = backend.losses(images, targets)
    after = bn_state(backend)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not backend.training and not any(m.training for m in backend.modules())
    backend.train()
    for m in backend.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    frozen = backend.losses(images, targets)
    assert set(eval_losses) == set(frozen)
    for key in frozen:
        assert torch.allclose(eval_losses[key], frozen[key], rtol=1e-4, atol=1e-5), key
    eval_losses["classification" if "classification" in eval_losses else "loss_classifier"].backward()
    backend.eval()
    with torch.no_grad():
        check_predictions(backend.predict(images), images, 3)
    # predict in train mode works too (and restores the mode)
    backend.train()
    with torch.no_grad():
        check_predictions(backend.predict(images), images, 3)
    assert backend.training and backend.detector.training


def test_torchvision_empty_targets():
    backend = build_backend("torchvision", "fcos", num_classes=3)
    images, _ = rectangles(n=2)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = backend.losses(images, empty)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("model", ["fcos", "fasterrcnn"])
def test_label_offsets_round_trip(model):
    """Class 2 in, class 2 out (softmax heads shift labels by one inside)."""
    torch.manual_seed(0)
    # score_thresh=0: the top detection exists even while scores are low after a few steps
    backend = build_backend("torchvision", model, num_classes=4, fpn_channels=32, score_thresh=0.0)
    images, targets = rectangles(n=2, label=2)  # (batch 1 at 64 px: GroupNorm of FCOS' head fails on the 1x1 P6)
    optimizer = torch.optim.AdamW(backend.parameters(), lr=1e-3)
    backend.train()
    for _ in range(25 if model == "fcos" else 10):
        loss = sum(backend.losses(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    backend.eval()
    with torch.no_grad():
        predictions = backend.predict(images)
    for pred in predictions:
        assert len(pred["labels"]) > 0 and int(pred["labels"][0]) == 2


def test_fcos_te_has_named_transformer_ffn():
    backend = build_backend("torchvision", "fcos", num_classes=3, transformer_blocks=2)
    names = {n for n, m in backend.detector.named_modules() if isinstance(m, torch.nn.Linear)}
    for i in range(2):
        assert {f"backbone.blocks.{i}.mlp.fc1", f"backbone.blocks.{i}.mlp.fc2",
                f"backbone.blocks.{i}.attn.qkv", f"backbone.blocks.{i}.attn.proj"} <= names
    assert not any(isinstance(m, torch.nn.TransformerEncoderLayer) for m in backend.modules())
    from lightning_plugins.callbacks.gslora.lora import compile_targets

    patterns = compile_targets(None)  # GSLoRA's default targets match the FFN layers
    ffn = [n for n in names if any(p.fullmatch("backend.detector." + n) for p in patterns)]
    assert sorted(ffn) == sorted(f"backbone.blocks.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2))
    images, targets = rectangles()
    losses = backend.losses(images, targets)
    assert set(losses) == LOSS_KEYS["fcos"] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert backend.detector.backbone.blocks[1].mlp.fc2.weight.grad is not None
    with pytest.raises(ValueError, match="transformer_blocks"):
        build_backend("torchvision", "fasterrcnn", num_classes=3, transformer_blocks=1)


def test_resize_options_keep_boxes_in_input_pixels():
    backend = build_backend("torchvision", "fcos", num_classes=3, min_size=96, max_size=96).eval()
    images, _ = rectangles(n=1, size=64)
    assert backend.detector.transform.min_size == (96,)
    with torch.no_grad():
        check_predictions(backend.predict(images), images, 3)


def test_backbone_weights_path(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    backend = build_backend("torchvision", "fcos", num_classes=3, backbone_weights_path=str(path))
    assert torch.equal(backend.detector.backbone.body.conv1.weight, net.conv1.weight)
    with pytest.raises(ValueError, match="does not fit"):
        build_backend("torchvision", "fcos", num_classes=3, backbone="resnet50", backbone_weights_path=str(path))


def test_hf_box_conversion_round_trip():
    boxes = torch.tensor([[0.0, 0.0, 64.0, 32.0], [12.0, 10.0, 30.0, 31.0], [1.5, 2.25, 3.75, 7.0]])
    normalised = xyxy_to_cxcywh(boxes, 32, 64)
    assert torch.equal(normalised[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.equal(cxcywh_to_xyxy(normalised, 32, 64), boxes)  # power-of-two sizes: exact
    odd = torch.tensor([[3.0, 7.0, 50.0, 33.0]])
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(odd, 37, 61), 37, 61), odd, atol=1e-5)


@pytest.mark.parametrize("model", ["deformable_detr", "detr"])
def test_transformers_loss_halves_and_predictions(model):
    torch.manual_seed(0)
    backend = build_backend("transformers", model, num_classes=3, **TINY_DETR)
    images, targets = rectangles(n=4)
    images[3] = images[3][:, :48, :56]  # a smaller image: padded with a pixel mask
    targets[3]["boxes"] = targets[3]["boxes"].clamp(max=40)
    optimizer = torch.optim.AdamW(backend.parameters(), lr=1e-3)
    backend.train()
    history = []
    for _ in range(50):
        losses = backend.losses(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backend.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"} == set(losses)
    split = backend.split_losses(losses)
    assert torch.allclose(split["cls"], losses["loss_ce"] + losses["loss_ce_0"])
    assert torch.allclose(split["cls"] + split["box"], loss)
    first, last = sum(history[:25]) / 25, sum(history[25:]) / 25
    if model == "deformable_detr":
        assert last < first / 2, (first, last)  # measured: 10.5 -> 4.8
    else:  # DETR's softmax CE (no-object weight 0.1) falls slowly: measured 9.4 -> 7.5 (6.5 after 100 steps)
        assert last < 0.9 * first, (first, last)
    backend.eval()
    with torch.no_grad():
        predictions = backend.predict(images)
    check_predictions(predictions, images, 3)
    assert all(len(p["scores"]) <= 100 for p in predictions)


def test_transformers_weighted_terms_sum_to_library_loss():
    torch.manual_seed(0)
    backend = build_backend("transformers", "deformable_detr", num_classes=3, **TINY_DETR).eval()  # no dropout
    images, targets = rectangles(n=2)
    losses = backend.losses(images, targets)
    pixel_values, pixel_mask = backend.batch(images)
    h, w = pixel_values.shape[-2:]
    labels = [{"class_labels": t["labels"], "boxes": xyxy_to_cxcywh(t["boxes"], h, w)} for t in targets]
    torch.manual_seed(0)
    out = backend.detector(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
    assert torch.allclose(sum(losses.values()), out.loss, rtol=1e-4)
    assert backend.loss_weights == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert torch.allclose(losses["loss_bbox"], 5 * out.loss_dict["loss_bbox"])


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown detection backend 'torchvison'.*did you mean 'torchvision'"):
        build_backend("torchvison", "fcos", 3)
    message = r"unknown torchvision detection model 'fcoss'.*'fasterrcnn'.*did you mean 'fcos'"
    with pytest.raises(ValueError, match=message):
        build_backend("torchvision", "fcoss", 3)
    with pytest.raises(ValueError, match=r"unknown transformers detection model 'dter'.*did you mean 'detr'"):
        build_backend("transformers", "dter", 3)
    with pytest.raises(ValueError, match=r"option of detection backend 'torchvision' 'fpn_channel'.*did you mean "
                                         r"'fpn_channels'"):
        build_backend("torchvision", "fcos", 3, fpn_channel=64)
    with pytest.raises(ValueError, match=r"unknown torchvision detection backbone 'resnet19'"):
        build_backend("torchvision", "fcos", 3, backbone="resnet19")
    with pytest.raises(ValueError, match="num_classes"):
        build_backend("torchvision", "fcos", 0)


def test_registry_mmdet_is_lazy():
    import importlib.util

    if importlib.util.find_spec("lightning_plugins.modules.detection.backends.mmdet") is None:
        with pytest.raises(ImportError, match="mmdet"):
            build_backend("mmdet", "retinanet", 3)
    else:
        from lightning_plugins.modules.detection.backends import backend_class

        assert backend_class("mmdet").__name__ == "MMDetBackend"


# ------------------------------------------------------------------------------ per-object log-probs (forgetting)
@pytest.mark.parametrize("model, min_size, expected", [
    # anchor centres sit on multiples of the stride (8, 16, 32, 64); box [10, 10, 30, 30] strictly contains
    # 2 x 2 centres at stride 8 (16, 24) and 1 at stride 16 (16): 5 places
    ("fcos", None, 5),
    # resized x2 (min_size 128 for 64-pixel images): box [20, 20, 60, 60] contains 5 x 5 + 2 x 2 + 1 x 1 centres
    ("fcos", 128, 30),
    # RetinaNet: 3 scales x 3 ratios = 9 anchors per place, same places
    ("retinanet", None, 45),
])
def test_object_log_probs_are_the_heads_own_class_scores_inside_the_box(model, min_size, expected):
    torch.manual_seed(0)
    backend = build_backend("torchvision", model, num_classes=3, min_size=min_size).eval()
    regression = backend.detector.head.regression_head.bbox_reg
    torch.nn.init.zeros_(regression.weight)  # every predicted box is empty (FCOS: a point; RetinaNet: the anchor,
    torch.nn.init.zeros_(regression.bias)   # too small to reach IoU 0.5), so only the anchors inside the box count
    images, targets = rectangles(n=2)
    objects = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    captured = {}
    hook = backend.detector.head.register_forward_hook(lambda m, i, out: captured.update(out=out))
    try:
        losses, log_probs, owners = backend.losses_and_object_log_probs(images, targets, objects)
    finally:
        hook.remove()
    # the same forward gives exactly the plain losses
    plain = backend.losses(images, targets)
    assert set(losses) == set(plain) and all(torch.equal(losses[k], plain[k]) for k in plain)
    assert log_probs.shape == (expected,)
    assert torch.equal(owners, torch.zeros(expected, dtype=torch.long))  # all of image 0's one object
    logits = captured["out"]["cls_logits"][0, :, 1]
    if model == "fcos" and min_size is None:
        # pyramid 8x8, 4x4, 2x2, 1x1 anchors, row-major per level: (x, y) in {2, 3}^2 at P3 and (1, 1) at P4
        places = [2 * 8 + 2, 2 * 8 + 3, 3 * 8 + 2, 3 * 8 + 3, 64 + 1 * 4 + 1]
        assert torch.equal(log_probs, torch.nn.functional.logsigmoid(logits[places]))
    else:  # each value is log sigmoid of one of image 0's class-1 logits
        candidates = torch.nn.functional.logsigmoid(logits)
        assert all(bool((candidates - v).abs().min() < 1e-6) for v in log_probs)


def test_object_log_probs_also_take_anchors_whose_predicted_box_matches():
    from lightning_plugins.modules.detection.backends.torchvision import _object_log_probs

    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    anchors = torch.tensor([[16.0, 16.0, 24.0, 24.0],    # centre inside the box
                            [40.0, 40.0, 48.0, 48.0],    # outside, predicts the object's box exactly (IoU 1)
                            [0.0, 0.0, 8.0, 8.0],        # outside, predicts a box with IoU 256/544 = 0.47
                            [50.0, 50.0, 58.0, 58.0]])   # outside, predicts a far box
    predicted = torch.tensor([[0.0, 0.0, 1.0, 1.0], [10.0, 10.0, 30.0, 30.0], [14.0, 14.0, 34.0, 34.0],
                              [50.0, 50.0, 60.0, 60.0]])
    logits = torch.arange(8.0).reshape(4, 2) - 4
    got, owners = _object_log_probs(logits, anchors, predicted, box, torch.tensor([1]))
    assert torch.equal(got, torch.nn.functional.logsigmoid(torch.tensor([-3.0, -1.0])))
    assert torch.equal(owners, torch.tensor([0, 0]))


def test_object_log_probs_number_the_objects_over_the_batch():
    torch.manual_seed(0)
    backend = build_backend("torchvision", "fcos", num_classes=3).eval()
    images, targets = rectangles(n=2)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    first = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    second = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0]]), "labels": torch.tensor([0, 2])}
    _, log_probs, owners = backend.losses_and_object_log_probs(images, targets, [first, second])
    _, alone0, owners0 = backend.losses_and_object_log_probs(images, targets, [first, empty])
    _, alone1, owners1 = backend.losses_and_object_log_probs(images, targets, [empty, second])
    # image 1's objects come after image 0's: numbered 1 and 2 in the batch, 0 and 1 within the image
    assert torch.equal(owners, torch.cat([owners0, owners1 + 1]))
    assert set(owners.tolist()) == {0, 1, 2} and torch.equal(log_probs, torch.cat([alone0, alone1]))


def test_object_log_probs_refused_with_the_fix_by_backends_without_them():
    backend = build_backend("torchvision", "fasterrcnn", num_classes=3).eval()
    images, targets = rectangles(n=1)
    with pytest.raises(NotImplementedError, match="object_bound=None"):
        backend.losses_and_object_log_probs(images, targets, targets)
