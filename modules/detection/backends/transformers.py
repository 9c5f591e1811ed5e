"""Hugging Face transformers detectors (Deformable DETR, DETR) behind the :class:`DetectionBackend` contract.

Random init from a config (a ResNet-18-shaped ``ResNetConfig`` backbone, no hub download, no hub kernels:
``USE_HUB_KERNELS=0`` is set before transformers is imported, and Deformable DETR uses its pure-torch attention).
Images are normalised with the ImageNet mean/std here and padded into one batch with a ``pixel_mask``.
"""

from __future__ import annotations

import os

os.environ.setdefault("USE_HUB_KERNELS", "0")  # never fetch kernels (must precede the transformers import)

from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402

from lightning_plugins.modules.detection.backends.base import DetectionBackend, Prediction, Target  # noqa: E402

MODELS = ("deformable_detr", "detr")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TransformersBackend(DetectionBackend):
    """A transformers ``DeformableDetrForObjectDetection`` / ``DetrForObjectDetection`` as a detection backend.

    The wrapped model is ``self.detector``. Its FFN layers are ``detector.model.{encoder,decoder}.layers.N.mlp.fc1/
    fc2`` (matched by GSLoRA's default targets). :meth:`losses` returns the *weighted* terms of the library's loss
    (``loss_ce`` x1, ``loss_bbox`` x ``bbox_loss_coefficient``, ``loss_giou`` x ``giou_loss_coefficient``, and the
    same for each auxiliary decoder layer ``_i``); their sum is the library's ``loss``. ``cardinality_error`` is a
    logged statistic, not a loss, and is left out.

    Args:
        num_classes: object classes (labels ``0..num_classes-1``).
        model: ``"deformable_detr"`` (default; sigmoid focal classification) or ``"detr"`` (softmax with a
            no-object class).
        d_model: Transformer width.
        encoder_layers, decoder_layers: Transformer depth (Deformable DETR needs ``decoder_layers >= 2`` in
            this transformers version).
        ffn_dim: FFN width of encoder and decoder layers.
        num_queries: object queries (the most detections per image).
        num_heads: attention heads (must divide ``d_model``).
        auxiliary_loss: add the loss of every decoder layer.
        backbone_depths, backbone_widths: the ResNet backbone (basic blocks; default ResNet-18).
        detections_per_img: detections kept per image (top-k over queries x classes for Deformable DETR).
        score_thresh: detections below this score are dropped.
        config_overrides: further fields of the transformers config (e.g. ``{"giou_loss_coefficient": 2}``).
    """

    def __init__(
        self,
        num_classes: int,
        model: str = "deformable_detr",
        d_model: int = 256,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        ffn_dim: int = 1024,
        num_queries: int = 100,
        num_heads: int = 8,
        auxiliary_loss: bool = True,
        backbone_depths: Optional[list[int]] = None,
        backbone_widths: Optional[list[int]] = None,
        detections_per_img: int = 100,
        score_thresh: float = 0.0,
        config_overrides: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        from lightning_plugins.modules.detection.backends import unknown_name_error

        model = "deformable_detr" if model is None else model
        if model not in MODELS:
            raise unknown_name_error("transformers detection model", model, MODELS)
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        if model == "deformable_detr" and decoder_layers < 2:
            raise ValueError(f"model='deformable_detr' needs decoder_layers >= 2, got {decoder_layers}")
        from transformers import ResNetConfig

        depths = list(backbone_depths or [2, 2, 2, 2])
        widths = list(backbone_widths or [64, 128, 256, 512])
        backbone_config = ResNetConfig(
            layer_type="basic", depths=depths, hidden_sizes=widths, embedding_size=widths[0],
            out_features=["stage2", "stage3", "stage4"] if model == "deformable_detr" else ["stage4"],
        )
        fields: dict[str, Any] = dict(
            backbone_config=backbone_config, num_labels=num_classes, num_queries=num_queries, d_model=d_model,
            encoder_layers=encoder_layers, decoder_layers=decoder_layers, encoder_ffn_dim=ffn_dim,
            decoder_ffn_dim=ffn_dim, encoder_attention_heads=num_heads, decoder_attention_heads=num_heads,
            auxiliary_loss=auxiliary_loss, use_pretrained_backbone=False, use_timm_backbone=False,
        )
        if model == "deformable_detr":
            from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

            fields["disable_custom_kernels"] = True
            fields.update(config_overrides or {})
            self.detector = DeformableDetrForObjectDetection(DeformableDetrConfig(**fields))
        else:
            from transformers import DetrConfig, DetrForObjectDetection

            fields.update(config_overrides or {})
            self.detector = DetrForObjectDetection(DetrConfig(**fields))
        self.num_classes = num_classes
        self.model_name = model
        self.detections_per_img = detections_per_img
        self.score_thresh = score_thresh
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    # -- contract -------------------------------------------------------------------------------------------------
    @property
    def loss_weights(self) -> dict[str, float]:
        """Weights of the library's loss terms (``_i`` auxiliary terms take the weight of their base term)."""
        config = self.detector.config
        return {"loss_ce": 1.0, "loss_bbox": float(config.bbox_loss_coefficient),
                "loss_giou": float(config.giou_loss_coefficient)}

    def losses(self, images: list[torch.Tensor], targets: list[Target]) -> dict[str, torch.Tensor]:
        pixel_values, pixel_mask = self.batch(images)
        # boxes are relative to the padded canvas (as transformers' image processors pad them), like pred_boxes
        height, width = pixel_values.shape[-2:]
        labels = []
        for image, target in zip(images, targets):
            labels.append({
                "class_labels": torch.as_tensor(target["labels"], dtype=torch.int64, device=image.device).reshape(-1),
                "boxes": xyxy_to_cxcywh(torch.as_tensor(target["boxes"], dtype=torch.float32,
                                                        device=image.device).reshape(-1, 4), height, width),
            })
        output = self.detector(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        weights = self.loss_weights
        weighted = {}
        for name, value in output.loss_dict.items():
            base = _base_term(name)
            if base in weights:
                weighted[name] = value * weights[base]
        return weighted

    def split_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``cls``: the weighted ``loss_ce`` terms (with auxiliary layers); ``box``: the weighted ``loss_bbox`` and
        ``loss_giou`` terms."""
        zero = next(iter(losses.values())).new_zeros(())
        cls = sum((v for k, v in losses.items() if _base_term(k) == "loss_ce"), zero)
        box = sum((v for k, v in losses.items() if _base_term(k) in ("loss_bbox", "loss_giou")), zero)
        return {"cls": cls, "box": box}

    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        pixel_values, pixel_mask = self.batch(images)
        was_training = self.detector.training
        self.detector.eval()  # no dropout in predictions, whatever the mode
        try:
            output = self.detector(pixel_values=pixel_values, pixel_mask=pixel_mask)
        finally:
            self.detector.train(was_training)
        logits, boxes = output.logits, output.pred_boxes
        predictions = []
        for index, image in enumerate(images):
            height, width = image.shape[-2:]
            if self.model_name == "deformable_detr":
                probs = logits[index].sigmoid()  # [Q, C]
                k = min(self.detections_per_img, probs.numel())
                scores, flat = probs.flatten().topk(k)
                query, labels = flat // probs.shape[1], flat % probs.shape[1]
            else:
                probs = logits[index].softmax(-1)[:, :-1]  # drop the no-object class
                scores, labels = probs.max(-1)
                order = scores.argsort(descending=True)[: self.detections_per_img]
                scores, labels, query = scores[order], labels[order], order
            # pred_boxes are relative to the padded batch canvas; clip to the image itself
            canvas_h, canvas_w = pixel_values.shape[-2:]
            xyxy = cxcywh_to_xyxy(boxes[index, query], canvas_h, canvas_w)
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
            keep = scores > self.score_thresh
            predictions.append({"boxes": xyxy[keep], "scores": scores[keep], "labels": labels[keep].to(torch.int64)})
        return predictions

    def forward(self, images: list[torch.Tensor]) -> list[Prediction]:
        return self.predict(images)

    def batch(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise and zero-pad ``images`` to one ``[B, 3, H, W]`` batch plus its ``pixel_mask`` (1 = image)."""
        height = max(int(i.shape[-2]) for i in images)
        width = max(int(i.shape[-1]) for i in images)
        first = images[0]
        pixel_values = first.new_zeros((len(images), 3, height, width))
        pixel_mask = torch.zeros((len(images), height, width), dtype=torch.long, device=first.device)
        for index, image in enumerate(images):
            h, w = image.shape[-2:]
            pixel_values[index, :, :h, :w] = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
            pixel_mask[index, :h, :w] = 1
        return pixel_values, pixel_mask


def _base_term(name: str) -> str:
    head, _, tail = name.rpartition("_")
    return head if tail.isdigit() else name


def xyxy_to_cxcywh(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel ``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)`` normalised by the image size (transformers' format)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], -1)


def cxcywh_to_xyxy(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised ``(cx, cy, w, h)`` -> pixel ``(x1, y1, x2, y2)`` (inverse of :func:`xyxy_to_cxcywh`)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1)


__all__ = ["MODELS", "TransformersBackend", "cxcywh_to_xyxy", "xyxy_to_cxcywh"]
