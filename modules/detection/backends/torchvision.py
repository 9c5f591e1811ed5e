"""torchvision detectors (FCOS, RetinaNet, Faster R-CNN, SSDlite) behind the :class:`DetectionBackend` contract.

Built offline (``weights=None``, random init, or a local backbone state dict), with plain ``nn.BatchNorm2d`` and a
narrow FPN (``fpn_channels``, P3-P6) sized for small images. ``transformer_blocks > 0`` (FCOS/RetinaNet) inserts
pre-norm Transformer blocks between the FPN and the head ("FCOS-TE"): they attend over the concatenated P3-P6
tokens and give the detector ``nn.Linear`` FFN layers named ``backbone.blocks.N.mlp.fc1/fc2`` for LoRA (GSLoRA)
and FP8 conversion.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Any, Iterator, Optional

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from lightning_plugins.modules.backbones.vit import Block
from lightning_plugins.modules.detection.backends.base import DetectionBackend, Prediction, Target

MODELS = ("fcos", "retinanet", "fasterrcnn", "ssdlite")
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
#: heads whose class 0 is background (labels are shifted by one inside)
SOFTMAX_MODELS = ("fasterrcnn", "ssdlite")
#: loss terms of the classification part (``split_losses``); every other term is localisation ("box")
CLS_TERMS = ("classification", "loss_classifier", "loss_objectness")

_RESNET_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}
_RESNET_CHANNELS = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512], "resnet50": [512, 1024, 2048]}


class TorchvisionBackend(DetectionBackend):
    """A torchvision detector as a :class:`DetectionBackend`.

    The wrapped model is ``self.detector`` (so its parameters are ``detector.backbone...``, ``detector.head...``).

    Args:
        num_classes: object classes (labels ``0..num_classes-1``). Softmax heads (``fasterrcnn``, ``ssdlite``) get
            ``num_classes + 1`` outputs with 0 = background; labels are shifted in and out here.
        model: ``"fcos"`` (default), ``"retinanet"``, ``"fasterrcnn"`` or ``"ssdlite"``.
        backbone: ``"resnet18"`` (default), ``"resnet34"``, ``"resnet50"`` or ``"mobilenet_v3_large"`` (the only one
            for ``ssdlite``, and its default there).
        fpn_channels: FPN width (FCOS/RetinaNet/Faster R-CNN). The pyramid is P3-P5 plus a max-pooled P6.
        min_size, max_size: the resize of torchvision's transform (shorter side to ``min_size``, longer side at most
            ``max_size``). ``None`` (default): images keep their own size (the data module sizes them);
            ``max_size`` defaults to ``min_size`` x 1333/800. SSDlite resizes to a fixed ``min_size`` square.
        score_thresh: detections below this score are dropped (0.05 for COCO-style evaluation).
        detections_per_img: detections kept per image.
        transformer_blocks: pre-norm Transformer blocks between FPN and head (FCOS/RetinaNet only).
        transformer_heads: attention heads of those blocks (must divide ``fpn_channels``).
        transformer_mlp_ratio: FFN width of those blocks over ``fpn_channels``.
        backbone_weights_path: a local state dict (``torch.load(weights_only=True)``) of the torchvision
            classification model named by ``backbone``; its classifier keys are ignored.
    """

    def __init__(
        self,
        num_classes: int,
        model: str = "fcos",
        backbone: Optional[str] = None,
        fpn_channels: int = 128,
        min_size: Optional[int] = None,
        max_size: Optional[int] = None,
        score_thresh: float = 0.05,
        detections_per_img: int = 100,
        transformer_blocks: int = 0,
        transformer_heads: int = 4,
        transformer_mlp_ratio: float = 4.0,
        backbone_weights_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        from lightning_plugins.modules.detection.backends import unknown_name_error

        model = "fcos" if model is None else model
        if model not in MODELS:
            raise unknown_name_error("torchvision detection model", model, MODELS)
        if backbone is None:
            backbone = "mobilenet_v3_large" if model == "ssdlite" else "resnet18"
        if backbone not in BACKBONES:
            raise unknown_name_error("torchvision detection backbone", backbone, BACKBONES)
        if model == "ssdlite" and backbone != "mobilenet_v3_large":
            raise ValueError(f"model='ssdlite' supports backbone='mobilenet_v3_large' only, got {backbone!r}")
        if transformer_blocks < 0:
            raise ValueError(f"transformer_blocks must be >= 0, got {transformer_blocks!r}")
        if transformer_blocks and model not in ("fcos", "retinanet"):
            raise ValueError(f"transformer_blocks applies to model='fcos' or 'retinanet' only, got model={model!r}")
        if transformer_blocks and fpn_channels % transformer_heads:
            raise ValueError(f"transformer_heads={transformer_heads} must divide fpn_channels={fpn_channels}")
        if min_size is not None and max_size is None:
            max_size = int(round(min_size * 1333 / 800))
        self.num_classes = num_classes
        self.model_name = model
        self.backbone_name = backbone
        self.offset = 1 if model in SOFTMAX_MODELS else 0
        self.transformer_blocks = transformer_blocks
        self.gslora_target = r"(?P<block>(?:.*\.)?blocks\.\d+)\.mlp\.fc[12]" if transformer_blocks else None
        head_classes = num_classes + self.offset

        if model == "ssdlite":
            self.detector = _ssdlite(head_classes, score_thresh, detections_per_img, backbone_weights_path)
        else:
            features = _backbone_with_fpn(backbone, fpn_channels, backbone_weights_path)
            if transformer_blocks:
                features = FPNTransformer(features, transformer_blocks, transformer_heads, transformer_mlp_ratio)
            levels = 4  # P3, P4, P5 and the max-pooled P6
            common: dict[str, Any] = dict(min_size=800, max_size=1333)
            if model == "fcos":
                self.detector = FCOS(
                    features, head_classes, score_thresh=score_thresh, detections_per_img=detections_per_img,
                    anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * levels), **common,
                )
            elif model == "retinanet":
                sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (16, 32, 64, 128))
                self.detector = RetinaNet(
                    features, head_classes, score_thresh=score_thresh, detections_per_img=detections_per_img,
                    anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels), **common,
                )
            else:
                self.detector = FasterRCNN(
                    features, head_classes,
                    rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * levels),
                    box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
                    box_score_thresh=score_thresh, box_detections_per_img=detections_per_img,
                    rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                    rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300, box_batch_size_per_image=256,
                    **common,
                )
        old = self.detector.transform
        fixed = (min_size, min_size) if model == "ssdlite" and min_size is not None else None
        transform_cls = GeneralizedRCNNTransform if min_size is not None else _KeepSizeTransform
        self.detector.transform = transform_cls(
            min_size or 800, max_size or 1333, old.image_mean, old.image_std,
            size_divisible=old.size_divisible, fixed_size=fixed,
        )

    # -- contract -------------------------------------------------------------------------------------------------
    def losses(self, images: list[torch.Tensor], targets: list[Target]) -> dict[str, torch.Tensor]:
        """torchvision's loss dict (unweighted terms whose sum is the training loss). In eval mode the detector
        runs its training branch with every BatchNorm/Dropout kept in eval mode, so no running statistic changes."""
        prepared = [self._to_library(t) for t in targets]
        with _loss_mode(self.detector):
            return dict(self.detector(list(images), prepared))

    def losses_and_object_log_probs(self, images: list[torch.Tensor], targets: list[Target], objects: list[Target]
                                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """FCOS/RetinaNet: the loss dict of :meth:`losses`, ``log sigmoid`` of each object's class logit at every
        anchor that could report it (all pyramid levels): its centre lies inside the object's box, or its predicted
        box overlaps the object's with IoU >= 0.5; and the object (numbered over the batch) of each value."""
        if self.model_name not in ("fcos", "retinanet"):
            return super().losses_and_object_log_probs(images, targets, objects)
        detector = self.detector
        prepared = [self._to_library(t) for t in targets]
        with _loss_mode(detector):
            batch, prepared = detector.transform(list(images), prepared)
            features = list(detector.backbone(batch.tensors).values())
            head_outputs = detector.head(features)
            anchors = detector.anchor_generator(batch, features)
            if self.model_name == "fcos":
                sizes = [f.shape[2] * f.shape[3] for f in features]
                losses = detector.compute_loss(prepared, head_outputs, anchors, sizes)
            else:
                losses = detector.compute_loss(prepared, head_outputs, anchors)
        decode = detector.box_coder.decode if self.model_name == "fcos" else detector.box_coder.decode_single
        log_probs, owners, first = [], [], 0
        for logits, regression, image_anchors, image, size, target in zip(
                head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, images, batch.image_sizes,
                objects):
            target = self._to_library(target)
            scale = torch.tensor([size[1] / image.shape[-1], size[0] / image.shape[-2]] * 2,
                                 device=target["boxes"].device)  # the transform's resize, if any
            with torch.no_grad():
                predicted = decode(regression.detach().float(), image_anchors)
            values, owner = _object_log_probs(logits, image_anchors, predicted, target["boxes"] * scale,
                                              target["labels"])
            log_probs.append(values)
            owners.append(owner + first)
            first += len(target["labels"])
        if not log_probs:
            empty = head_outputs["cls_logits"]
            return dict(losses), empty.new_zeros(0), torch.zeros(0, dtype=torch.long, device=empty.device)
        return dict(losses), torch.cat(log_probs), torch.cat(owners)

    def split_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``cls``: ``classification`` / ``loss_classifier`` + ``loss_objectness``; ``box``: the other terms
        (box regression, FCOS centre-ness, RPN box regression)."""
        return _split(losses, lambda name: name in CLS_TERMS)

    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        was_training = self.detector.training
        self.detector.eval()
        try:
            outputs = self.detector(list(images))
        finally:
            self.detector.train(was_training)
        return [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"] - self.offset} for o in outputs]

    def forward(self, images: list[torch.Tensor]) -> list[Prediction]:
        return self.predict(images)

    def _to_library(self, target: Target) -> Target:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
        return {"boxes": boxes, "labels": labels + self.offset}


class FPNTransformer(nn.Module):
    """A ``BackboneWithFPN`` followed by pre-norm Transformer blocks over all pyramid levels at once.

    The tokens of every level (``[B, C, h, w]`` -> ``h*w`` tokens) are concatenated, given a 2-D sine position
    (coordinates normalised to [0, 1], so the levels share one frame) plus a learned level embedding, mixed by
    ``blocks`` (:class:`~lightning_plugins.modules.backbones.vit.Block`: ``attn.qkv/proj``, ``mlp.fc1/fc2``, all
    plain ``nn.Linear``) and split back into the levels. Only the blocks' residual updates are added to the FPN
    maps (the position terms are not), so the head sees FPN features refined by global attention.
    """

    def __init__(self, features: BackboneWithFPN, depth: int, num_heads: int = 4, mlp_ratio: float = 4.0,
                 levels: int = 4) -> None:
        super().__init__()
        self.body = features.body
        self.fpn = features.fpn
        self.out_channels = features.out_channels
        dim = self.out_channels
        self.level_embed = nn.Parameter(torch.zeros(levels, dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.fpn(self.body(images))
        names, shapes, tokens, extras = list(maps), [], [], []
        for level, name in enumerate(names):
            batch, dim, height, width = maps[name].shape
            shapes.append((height, width))
            level_embed = self.level_embed[min(level, len(self.level_embed) - 1)].to(maps[name].dtype)
            extra = _sine_positions(height, width, dim, maps[name]) + level_embed
            tokens.append(maps[name].flatten(2).transpose(1, 2))
            extras.append(extra.expand(batch, -1, -1))
        x = torch.cat(tokens, 1)
        start = x
        x = x + torch.cat(extras, 1)
        entry = x
        for block in self.blocks:
            x = block(x)
        x = start + (x - entry)
        out, offset = OrderedDict(), 0
        for name, (height, width) in zip(names, shapes):
            count = height * width
            out[name] = x[:, offset:offset + count].transpose(1, 2).reshape(x.shape[0], -1, height, width)
            offset += count
        return out


def _sine_positions(height: int, width: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """DETR-style 2-D sine embedding ``[1, h*w, dim]`` (half the channels for y, half for x; coordinates in (0, 1])."""
    quarter = dim // 4
    freqs = 10000 ** (-torch.arange(quarter, device=like.device, dtype=torch.float32) / max(1, quarter))
    ys = (torch.arange(height, device=like.device, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, device=like.device, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    ay, ax = ys[:, None] * freqs, xs[:, None] * freqs  # [h, q], [w, q]
    pos_y = torch.cat([ay.sin(), ay.cos()], -1)[:, None, :].expand(height, width, 2 * quarter)
    pos_x = torch.cat([ax.sin(), ax.cos()], -1)[None, :, :].expand(height, width, 2 * quarter)
    pos = torch.cat([pos_y, pos_x], -1).reshape(1, height * width, 4 * quarter)
    if pos.shape[-1] < dim:
        pos = nn.functional.pad(pos, (0, dim - pos.shape[-1]))
    return pos.to(like.dtype)


class _KeepSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform without the resize: images keep their size (still normalised and batched)."""

    def resize(self, image: torch.Tensor, target: Optional[dict[str, torch.Tensor]] = None):  # type: ignore[override]
        return image, target


@contextlib.contextmanager
def _loss_mode(detector: nn.Module) -> Iterator[None]:
    """Run ``detector``'s training branch (which returns losses). A detector in eval mode is switched to train mode
    with every normalisation and dropout layer left in eval mode, then restored exactly."""
    if detector.training:
        yield
        return
    modes = [(m, m.training) for m in detector.modules()]
    detector.train()
    for module in detector.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                               nn.Dropout3d, nn.AlphaDropout)):
            module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _object_log_probs(logits: torch.Tensor, anchors: torch.Tensor, predicted: torch.Tensor, boxes: torch.Tensor,
                      labels: torch.Tensor, iou_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``log sigmoid(logit of the object's class)`` at every anchor that could report the object: its centre lies
    inside the object's box, or its predicted box overlaps the object's with IoU >= ``iou_threshold`` (a
    detection there would count as the object's at AP@0.5), and the object (0..N-1) of each value. ``logits``
    ``[A, C]``, ``anchors``/``predicted`` ``[A, 4]`` xyxy, ``boxes`` ``[N, 4]``, ``labels`` ``[N]``; object-major
    order."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    inside = ((centres[None, :, 0] > boxes[:, None, 0]) & (centres[None, :, 0] < boxes[:, None, 2])
              & (centres[None, :, 1] > boxes[:, None, 1]) & (centres[None, :, 1] < boxes[:, None, 3]))
    overlapping = torchvision.ops.box_iou(boxes, predicted) >= iou_threshold
    objects, places = (inside | overlapping).nonzero(as_tuple=True)
    return torch.nn.functional.logsigmoid(logits[places, labels[objects]].float()), objects


def _split(losses: dict[str, torch.Tensor], is_cls) -> dict[str, torch.Tensor]:
    cls = [v for k, v in losses.items() if is_cls(k)]
    box = [v for k, v in losses.items() if not is_cls(k)]
    zero = next(iter(losses.values())).new_zeros(()) if losses else torch.zeros(())
    return {"cls": sum(cls, zero), "box": sum(box, zero)}


def _load_backbone_weights(net: nn.Module, path: Optional[str], ignore: tuple[str, ...]) -> None:
    if path is None:
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"backbone_weights_path={path!r} does not fit {type(net).__name__}: {err}") from err
    missing = [k for k in missing if not k.startswith(ignore)]
    if missing or unexpected:
        raise ValueError(
            f"backbone_weights_path={path!r} does not fit {type(net).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _backbone_with_fpn(name: str, channels: int, weights_path: Optional[str]) -> BackboneWithFPN:
    if name.startswith("resnet"):
        net = getattr(torchvision.models, name)(weights=None)
        _load_backbone_weights(net, weights_path, ("fc.",))
        return BackboneWithFPN(net, dict(_RESNET_LAYERS), _RESNET_CHANNELS[name], channels,
                               extra_blocks=LastLevelMaxPool())
    net = torchvision.models.mobilenet_v3_large(weights=None)
    _load_backbone_weights(net, weights_path, ("classifier.",))
    features = net.features
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    # the last block of each of the stride 8, 16 and 32 stages
    ends = [strided[-2] - 1, strided[-1] - 1, len(features) - 1]
    return BackboneWithFPN(features, {str(i): str(k) for k, i in enumerate(ends)},
                           [features[i].out_channels for i in ends], channels, extra_blocks=LastLevelMaxPool())


def _ssdlite(num_classes: int, score_thresh: float, detections_per_img: int, weights_path: Optional[str]) -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    if weights_path is not None:
        raise ValueError("backbone_weights_path is not supported for model='ssdlite' (its MobileNet is reshaped)")
    model = ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes, score_thresh=score_thresh,
        detections_per_img=detections_per_img,
    )
    return model
