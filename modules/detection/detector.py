"""``ObjectDetector``: a LightningModule over any detection backend (torchvision, transformers, mmdet), with COCO
mAP (torchmetrics ``MeanAveragePrecision``, faster-coco-eval) and the forgetting protocol used by ``GSLoRA``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torchmetrics.detection import MeanAveragePrecision

from lightning_plugins.modules.backbones.vit import Block
from lightning_plugins.modules.detection.backends import build_backend
from lightning_plugins.modules.detection.backends.base import DetectionBackend, Prediction, Target
from lightning_plugins.modules.schedules import warmup_cosine
from lightning_plugins.modules.sharding import shard_with_fsdp2

Images = Union[torch.Tensor, list[torch.Tensor]]


class ObjectDetector(pl.LightningModule):
    """Object detection with AdamW, a warm-up (in steps) + cosine LR, gradient-norm clipping and COCO mAP.

    Batches are ``(images, targets)`` (or a dict with those keys): ``images`` a list of float ``[3, H, W]`` tensors
    in [0, 1] (or one ``[B, 3, H, W]`` tensor), ``targets`` a list of ``{"boxes": [N, 4] xyxy pixels, "labels":
    int64 [N] in 0..num_classes-1}`` (optionally ``"iscrowd"`` [N]: crowd boxes are left out of the training loss and
    passed to the metric as crowd regions). Predictions are ``{"boxes", "scores", "labels"}`` per image.

    Logged: ``train/<term>`` for every loss term and ``train/loss``; ``val/map``, ``val/map_50``, ``val/map_75``,
    ``val/mar_100`` and ``val/ap/<class name>`` (``test/...`` alike).

    Forgetting protocol (what ``GSLoRA`` and other forgetting callbacks call, without importing this module):

    * ``forgetting_losses(images, targets) -> {"cls": Tensor, "box": Tensor}``: classification and localisation
      parts of the training loss, in the module's current mode (a frozen, eval-mode model keeps its BatchNorm
      statistics: the backends compute losses without updating them);
    * ``detect(images) -> list[{"boxes", "scores", "labels"}]``;
    * ``num_classes`` (int), ``class_names`` (list of str);
    * ``gslora_target``: the regex of the FFN ``nn.Linear`` layers to adapt, or ``None`` for GSLoRA's defaults.

    Args:
        num_classes: object classes (no background class).
        backend: ``"torchvision"`` (default), ``"transformers"`` or ``"mmdet"``.
        model: the backend's model (``None``: its default, ``"fcos"`` / ``"deformable_detr"``). torchvision:
            ``fcos``, ``retinanet``, ``fasterrcnn``, ``ssdlite``; transformers: ``deformable_detr``, ``detr``.
        backend_kwargs: the backend's options, e.g. ``{"backbone": "resnet18", "fpn_channels": 128,
            "transformer_blocks": 2, "min_size": 128, "max_size": 128}`` for torchvision or ``{"d_model": 256,
            "num_queries": 100}`` for transformers. Unknown keys are an error naming them.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not on biases and norms).
        warmup_steps: optimizer steps of linear warm-up (capped at the run's length); then cosine decay over the
            rest of the run.
        min_lr_ratio: final LR of the cosine as a share of ``lr``.
        gradient_clip_norm: clip the gradient norm to this value (``None``: no clipping). Ignored when the Trainer
            sets ``gradient_clip_val`` (the Trainer's setting wins).
        class_names: a name per class (for ``val/ap/<name>``); ``None``: taken from the datamodule in ``setup``
            when it has them, else ``"0"``, ``"1"``...
        category_ids: the dataset's category id per class (the COCO map), kept in the checkpoint; ``None``: taken
            from the datamodule's ``category_map()`` in ``setup`` when it has one.
    """

    def __init__(
        self,
        num_classes: int = 10,
        backend: str = "torchvision",
        model: Optional[str] = None,
        backend_kwargs: Optional[dict[str, Any]] = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.0,
        gradient_clip_norm: Optional[float] = 10.0,
        class_names: Optional[list[str]] = None,
        category_ids: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if gradient_clip_norm is not None and gradient_clip_norm <= 0:
            raise ValueError(f"gradient_clip_norm must be > 0 or None, got {gradient_clip_norm!r}")
        if backend_kwargs is not None and not isinstance(backend_kwargs, Mapping):
            raise TypeError(f"backend_kwargs must be a dict or None, got {type(backend_kwargs).__name__}")
        _check_class_list("class_names", class_names, num_classes)
        _check_class_list("category_ids", category_ids, num_classes)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.backend: DetectionBackend = build_backend(backend, model, num_classes, **dict(backend_kwargs or {}))
        self.val_map = self._make_metric()
        self.test_map = self._make_metric()

    @staticmethod
    def _make_metric() -> MeanAveragePrecision:
        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="faster_coco_eval")

    # -- forgetting protocol / model ------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """A name per class: the given/datamodule names, else the class indices as strings."""
        names = self.hparams.get("class_names")
        return list(names) if names else [str(c) for c in range(self.num_classes)]

    @property
    def category_ids(self) -> Optional[list[int]]:
        """The dataset's category id per class (COCO map), when known."""
        ids = self.hparams.get("category_ids")
        return list(ids) if ids else None

    @property
    def gslora_target(self) -> Optional[str]:
        """Regex of the FFN layers for GSLoRA (from the backend; ``None`` = GSLoRA's default targets)."""
        return getattr(self.backend, "gslora_target", None)

    def losses(self, images: Images, targets: list[Target]) -> dict[str, torch.Tensor]:
        """The backend's weighted loss terms (their sum is the training loss)."""
        return self.backend.losses(_image_list(images), [_plain_target(t) for t in targets])

    def forgetting_losses(self, images: Images, targets: list[Target],
                          objects: Optional[list[Target]] = None) -> dict[str, torch.Tensor]:
        """``{"cls": ..., "box": ...}`` of the training loss on ``(images, targets)``, in the current mode. With
        ``objects`` (a target dict per image) also ``"object_log_probs"``: ``log p(label)`` of each of those objects
        at every location the detector could report it from, one flat tensor, and ``"object_index"``: the object
        (numbered over the batch, image by image) of each value (FCOS/RetinaNet backends)."""
        if objects is None:
            return self.backend.split_losses(self.losses(images, targets))
        losses, log_probs, owners = self.backend.losses_and_object_log_probs(
            _image_list(images), [_plain_target(t) for t in targets], [_plain_target(t) for t in objects])
        return {**self.backend.split_losses(losses), "object_log_probs": log_probs, "object_index": owners}

    def detect(self, images: Images) -> list[Prediction]:
        """Detections per image: ``{"boxes": xyxy pixels, "scores", "labels": 0..num_classes-1}``, best first."""
        return self.backend.predict(_image_list(images))

    def forward(self, images: Images) -> list[Prediction]:
        """Same as :meth:`detect`."""
        return self.detect(images)

    # -- data checks ----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check ``num_classes`` against the datamodule and take its class names / COCO category ids if unset."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        name = type(datamodule).__name__
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and not isinstance(data_classes, bool) and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but {name} has {data_classes} classes; set the "
                f"model's num_classes to {data_classes} (model.num_classes={data_classes} in a config)"
            )
        ids, names = _read_category_map(datamodule)
        if names is None:
            attr = getattr(datamodule, "class_names", None)
            names = [str(n) for n in attr] if isinstance(attr, (list, tuple)) else None
        if not self.hparams.get("category_ids") and ids is not None and len(ids) == self.num_classes:
            self.hparams["category_ids"] = ids
        if not self.hparams.get("class_names") and names is not None and len(names) == self.num_classes:
            self.hparams["class_names"] = names

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over the data-parallel devices, one unit per Transformer block (if
        the backend has them) and one for the rest (nothing under other strategies)."""
        shard_with_fsdp2(self, self.device_mesh, block_types=(Block,))

    # -- steps ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = _unpack(batch)
        terms = self.losses(images, [_without_crowd(t) for t in targets])
        loss = sum(terms.values())
        size = len(images)
        for term, value in terms.items():
            self.log(f"train/{term}", value.detach(), batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, list[Prediction]]:
        """Updates ``val/map``; returns ``{"predictions": ...}`` (a forgetting callback reuses them)."""
        return {"predictions": self._evaluate(batch, self.val_map)}

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, list[Prediction]]:
        return {"predictions": self._evaluate(batch, self.test_map)}

    def on_validation_epoch_end(self) -> None:
        self._log_map("val", self.val_map)

    def on_test_epoch_end(self) -> None:
        self._log_map("test", self.test_map)

    def predict_step(self, batch: Any, batch_idx: int) -> list[Prediction]:
        images = _unpack(batch)[0] if isinstance(batch, (tuple, list, Mapping)) else batch
        return [{k: v.detach() for k, v in p.items()} for p in self.detect(images)]

    def _evaluate(self, batch: Any, metric: MeanAveragePrecision) -> list[Prediction]:
        images, targets = _unpack(batch)
        predictions = self.detect(images)
        preds = [{"boxes": p["boxes"].detach().float(), "scores": p["scores"].detach().float(),
                  "labels": p["labels"].detach().long()} for p in predictions]
        metric.update(preds, [_metric_target(t, self.num_classes) for t in targets])
        return preds

    def _log_map(self, stage: str, metric: MeanAveragePrecision) -> None:
        result = metric.compute()
        metric.reset()
        values = {f"{stage}/{key}": result[key].float() for key in ("map", "map_50", "map_75", "mar_100")}
        classes = result.get("classes")
        per_class = result.get("map_per_class")
        if classes is not None and per_class is not None:
            names = self.class_names
            for label, value in zip(classes.reshape(-1).tolist(), per_class.reshape(-1)):
                if 0 <= int(label) < len(names) and float(value) >= 0:  # -1: class absent from the ground truth
                    values[f"{stage}/ap/{names[int(label)]}"] = value.float()
        main = values.pop(f"{stage}/map")
        self.log(f"{stage}/map", main, prog_bar=True)
        self.log_dict(values)

    # -- optimization ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or name.endswith(("pos_embed", "level_embed")) else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine(optimizer, total, min(hp.warmup_steps, total), hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[Union[int, float]] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """The Trainer's ``gradient_clip_val`` when set, else the gradient norm clipped to ``gradient_clip_norm``."""
        if gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif self.hparams.gradient_clip_norm is not None:
            self.clip_gradients(optimizer, float(self.hparams.gradient_clip_norm), "norm")


def _check_class_list(name: str, values: Optional[list], num_classes: int) -> None:
    if values is not None and len(values) != num_classes:
        raise ValueError(f"{name} has {len(values)} entries but num_classes={num_classes}; give one per class")


def _image_list(images: Images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim != 4:
            raise ValueError(f"images must be [3, H, W], [B, 3, H, W] or a list of [3, H, W], got {list(images.shape)}")
        return list(images.unbind(0))
    return list(images)


def _unpack(batch: Any) -> tuple[list[torch.Tensor], list[Target]]:
    if isinstance(batch, Mapping):
        images, targets = batch["images"], batch.get("targets")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, targets = batch[0], batch[1]
    elif isinstance(batch, (tuple, list)) and len(batch) == 1:
        images, targets = batch[0], None
    else:
        images, targets = batch, None
    images = _image_list(images)
    if targets is None:
        raise ValueError("this step needs (images, targets) batches")
    return images, list(targets)


def _plain_target(target: Target) -> Target:
    return {"boxes": target["boxes"], "labels": target["labels"]}


def _without_crowd(target: Target) -> Target:
    crowd = target.get("iscrowd")
    if crowd is None or not bool(torch.as_tensor(crowd).any()):
        return target
    keep = ~torch.as_tensor(crowd, device=target["boxes"].device).bool().reshape(-1)
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep]}


def _metric_target(target: Target, num_classes: int) -> Target:
    """The metric's target: boxes and labels, plus crowd regions as ``iscrowd=1`` boxes. Crowd regions come as
    ``iscrowd`` flags on the boxes, or as ``crowd_boxes`` [M, 4] with ``crowd_labels`` [M]; ``crowd_boxes``
    without labels are entered once per class (they then ignore overlapping detections of any class)."""
    boxes = target["boxes"].detach().float().reshape(-1, 4)
    labels = target["labels"].detach().long().reshape(-1)
    crowd = target.get("iscrowd")
    crowd = (torch.zeros_like(labels) if crowd is None
             else torch.as_tensor(crowd, device=boxes.device).long().reshape(-1))
    extra = target.get("crowd_boxes")
    if extra is not None and len(extra):
        extra = torch.as_tensor(extra, device=boxes.device).float().reshape(-1, 4)
        extra_labels = target.get("crowd_labels")
        if extra_labels is not None:
            extra_labels = torch.as_tensor(extra_labels, device=boxes.device).long().reshape(-1)
        else:
            extra_labels = torch.arange(num_classes, device=boxes.device).repeat_interleave(len(extra))
            extra = extra.repeat(num_classes, 1)
        boxes = torch.cat([boxes, extra])
        labels = torch.cat([labels, extra_labels])
        crowd = torch.cat([crowd, torch.ones_like(extra_labels)])
    return {"boxes": boxes, "labels": labels, "iscrowd": crowd}


def _read_category_map(datamodule: Any) -> tuple[Optional[list[int]], Optional[list[str]]]:
    """``(category ids, names)`` per contiguous label from ``datamodule.category_map()``, whichever it gives.

    Accepted shapes: ``{"category_ids": [...], "class_names": [...]}`` (index = label), ``{label: category_id}``,
    ``{label: name}``, ``{label: (category_id, name)}``,
    ``{label: {"id": ..., "name": ...}}``, or ``{category_id: label}`` when the values are the labels 0..C-1.
    """
    getter = getattr(datamodule, "category_map", None)
    if not callable(getter):
        return None, None
    try:
        mapping = getter()
    except Exception:  # a datamodule that knows its categories only after setup/prepare_data
        return None, None
    if not isinstance(mapping, Mapping) or not mapping:
        return None, None
    if "category_ids" in mapping or "class_names" in mapping:
        ids, names = mapping.get("category_ids"), mapping.get("class_names")
        return ([int(i) for i in ids] if ids is not None else None,
                [str(n) for n in names] if names is not None else None)
    keys, values = list(mapping.keys()), list(mapping.values())
    if all(isinstance(v, int) for v in values) and sorted(values) == list(range(len(values))) and \
            sorted(keys) != list(range(len(keys))):
        return [int(k) for k, _ in sorted(mapping.items(), key=lambda kv: kv[1])], None  # {category_id: label}
    try:
        ordered = [mapping[k] for k in sorted(keys)]
    except TypeError:
        return None, None
    ids: Optional[list[int]] = []
    names: Optional[list[str]] = []
    for value in ordered:
        cid, name = None, None
        if isinstance(value, Mapping):
            cid, name = value.get("id", value.get("category_id")), value.get("name")
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            cid, name = value
        elif isinstance(value, str):
            name = value
        elif isinstance(value, int):
            cid = value
        if ids is not None:
            ids = ids + [int(cid)] if isinstance(cid, int) else None
        if names is not None:
            names = names + [str(name)] if name is not None else None
    return ids, names
