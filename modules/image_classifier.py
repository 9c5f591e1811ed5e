"""``ImageClassifier``: a backbone (the project's ViT by default, any registry name, or any ``nn.Module``) plus a
linear head."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_plugins.modules.backbones import backbone_parameters, build_backbone
from lightning_plugins.modules.backbones.vit import Block
from lightning_plugins.modules.schedules import adamw_warmup_cosine
from lightning_plugins.modules.sharding import shard_with_fsdp2

# Learning rates used when ``lr`` is left unset: the hybrid (conv-stem) ViT learns best with a higher one in short
# runs; the patch-stem ViT and custom backbones keep the value that was the default before the conv stem existed.
DEFAULT_LR = {"conv": 3e-3, "patch": 1e-3, "custom": 1e-3}


class ImageClassifier(pl.LightningModule):
    """Image classification with AdamW, warm-up + cosine LR, overall and per-class accuracy.

    ``forward(images)`` returns logits ``[B, num_classes]``; ``embed(images)`` returns the features before the
    head ``[B, d]`` (the embedding used for class prototypes). Batches are ``(images, labels)``.

    With only ``num_classes`` given, the backbone is the hybrid ViT (``stem="conv"``): a small convolutional stem,
    ``depth`` Transformer blocks and a spatial readout, for any image size, trained with ``lr=3e-3``. It learns
    small data sets in a few epochs (e.g. 4 epochs on 3,500 MNIST digits). Giving ``patch_size`` (as the shipped
    configs do) selects the classic patch-stem ViT with the earlier defaults (``image_size=28``, ``lr=1e-3``),
    so explicitly configured models train exactly as before.

    Args:
        num_classes: number of classes of the linear head.
        backbone: ``"vit"`` (the project's ViT, shaped by the arguments below), any other name of the backbone
            registry (``"iresnet50"``, ``"iresnet_small"``, ``"vit_face"``, ``"inception_resnet_v1"``,
            ``"torchvision:resnet18"``, ``"timm:<model>"``, ...; see
            :func:`lightning_plugins.modules.backbones.backbone_names`), or any ``nn.Module`` mapping images to
            features ``[B, d]``; ``d`` is read from its ``num_features`` attribute when present, otherwise from
            one forward pass on a blank image. A registry name other than ``"vit"`` gets ``in_channels`` and (when
            set) ``image_size`` if its builder takes them, plus ``backbone_kwargs``; the ViT arguments below
            (``patch_size`` ... ``dropout``, ``stem``) apply to ``"vit"`` only, and the default ``lr`` is 1e-3.
        image_size: input side in pixels. ``None`` (default): any size with the conv stem, 28 with the patch
            stem (and the probe size for a custom backbone). When set, inputs of another size are an error.
        in_channels: input channels (1 = greyscale; set 3 for colour images); also the probe for a custom backbone.
        patch_size: ViT patch side; must divide ``image_size``. Setting it selects the patch stem (``stem="auto"``);
            ``None`` (default) with the patch stem means 4.
        embed_dim: ViT width.
        depth: ViT blocks.
        num_heads: ViT attention heads; must divide ``embed_dim``.
        mlp_ratio: ViT FFN width over ``embed_dim``.
        dropout: ViT dropout.
        lr: peak learning rate of AdamW. ``None`` (default): 3e-3 for the conv stem, 1e-3 for the patch stem
            and for custom backbones.
        weight_decay: AdamW weight decay (not applied to biases, norms, position and class tokens).
        warmup_fraction: share of the training steps spent warming the LR up linearly.
        min_lr_ratio: final LR of the cosine decay as a share of ``lr``.
        label_smoothing: cross-entropy label smoothing.
        stem: ViT stem: ``"conv"`` (hybrid ViT, any image size), ``"patch"`` (classic ViT on ``patch_size``
            patches) or ``"auto"`` (default): ``"patch"`` when ``patch_size`` is given, else ``"conv"``.
            Ignored for a custom backbone.
        backbone_kwargs: extra keyword arguments for the registry builder of ``backbone`` (a plain dict, saved
            with the hyperparameters), e.g. ``{"max_grid": 5}`` for ``"vit"``, ``{"embed_dim": 256}`` for
            ``"iresnet50"`` or ``{"weights_path": "/path/to/state_dict.pt"}``. Arguments that ``ImageClassifier``
            sets itself (``in_channels``, ``image_size``; with ``"vit"`` also the ViT arguments) are an error here.
            Not allowed with an ``nn.Module`` backbone.
    """

    def __init__(
        self,
        num_classes: int = 10,
        backbone: Union[str, nn.Module] = "vit",
        image_size: Optional[int] = None,
        in_channels: int = 1,
        patch_size: Optional[int] = None,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        lr: Optional[float] = None,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        stem: str = "auto",
        backbone_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if stem not in ("auto", "conv", "patch"):
            raise ValueError(f"stem must be one of ['auto', 'conv', 'patch'], got {stem!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
            raise TypeError(f"backbone_kwargs must be a dict or None, got {type(backbone_kwargs).__name__}")
        if backbone_kwargs and not isinstance(backbone, str):
            raise ValueError("backbone_kwargs applies to a registry name only; configure an nn.Module yourself")
        extra = dict(backbone_kwargs or {})
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, str) and backbone != "vit":
            backbone = self._build_registry_backbone(backbone, image_size, in_channels, patch_size, extra)
            stem = "custom"
        elif isinstance(backbone, str):
            if stem == "auto":
                stem = "patch" if patch_size is not None else "conv"
            if stem == "patch":
                image_size = 28 if image_size is None else image_size
                patch_size = 4 if patch_size is None else patch_size
            elif patch_size is not None:
                raise ValueError(
                    f"patch_size={patch_size!r} applies to stem='patch' only; drop patch_size or set stem='patch'"
                )
            backbone = build_backbone(
                backbone, image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                stem=stem, **_without_own_arguments(extra, VIT_ARGUMENTS),
            )
        elif isinstance(backbone, nn.Module):
            stem = "custom"
        else:
            raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
        self.stem = stem
        self.lr = DEFAULT_LR[stem] if lr is None else lr
        self.image_size = image_size
        self.in_channels = in_channels
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Linear(_feature_dim(backbone, in_channels, image_size or 28), num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_class_acc = MulticlassAccuracy(num_classes, average="none")
        self.test_class_acc = MulticlassAccuracy(num_classes, average="none")

    @staticmethod
    def _build_registry_backbone(
        name: str, image_size: Optional[int], in_channels: int, patch_size: Optional[int], extra: dict[str, Any]
    ) -> nn.Module:
        accepted = backbone_parameters(name)  # first: an unknown name is the error to report
        if patch_size is not None:
            raise ValueError(f"patch_size={patch_size!r} applies to backbone='vit' only (got backbone={name!r})")
        kwargs = _without_own_arguments(extra, ("in_channels", "image_size"))
        if "in_channels" in accepted:
            kwargs["in_channels"] = in_channels
        if image_size is not None and "image_size" in accepted:
            kwargs["image_size"] = image_size
        return build_backbone(name, **kwargs)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over the data-parallel devices, one unit per Transformer block and
        one for the rest (nothing under other strategies)."""
        shard_with_fsdp2(self, self.device_mesh, block_types=(Block,))

    # -- model ----------------------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features before the head, ``[B, d]``: the embedding used for prototypes and retrieval."""
        features = self.backbone(images)
        if features.ndim != 2:
            raise ValueError(
                f"the backbone must return features of shape [B, d], got {list(features.shape)}; "
                "pool or flatten its output"
            )
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.embed(images))

    # -- steps ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the model against the DataModule's ``num_classes`` and ``image_shape`` before any step runs."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but {type(datamodule).__name__} has "
                f"{data_classes} classes; set the model's num_classes to {data_classes}"
            )
        if self.stem in ("conv", "patch"):
            self._check_data_shape(datamodule)

    def _check_data_shape(self, datamodule: Any) -> None:
        try:
            shape = getattr(datamodule, "image_shape", None)
        except Exception:  # a DataModule that cannot tell its shape before setup: the backbone checks each batch
            return
        if not (isinstance(shape, (tuple, list)) and len(shape) == 3):
            return
        channels, height, width = (int(v) for v in shape)
        name = type(datamodule).__name__
        if channels != self.in_channels:
            raise ValueError(
                f"the model has in_channels={self.in_channels} but {name} has {channels}-channel images; "
                f"set the model's in_channels to {channels}"
            )
        if self.image_size is not None and (height, width) != (self.image_size, self.image_size):
            if self.stem == "conv":
                hint = "leave image_size unset (the conv stem takes any size)" + (
                    f" or set it to {height}" if height == width else "")
            elif height == width:
                hint = (f"set the model's image_size to {height} with a patch_size that divides it, or leave "
                        "image_size and patch_size unset (the conv stem takes any size)")
            else:
                hint = "the patch stem needs square images; leave image_size and patch_size unset (conv stem)"
            raise ValueError(
                f"the model has image_size={self.image_size} but {name} has {height}x{width} images; {hint}"
            )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_class_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_class_acc)

    def on_validation_epoch_end(self) -> None:
        self._log_class_accuracy("val", self.val_class_acc)

    def on_test_epoch_end(self) -> None:
        self._log_class_accuracy("test", self.test_class_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(images).softmax(dim=-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1)}

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy, class_accuracy: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}/loss", self.criterion(logits, labels), prog_bar=True)
        accuracy(logits, labels)
        class_accuracy.update(logits, labels)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def _log_class_accuracy(self, stage: str, class_accuracy: MulticlassAccuracy) -> None:
        per_class = class_accuracy.compute()
        self.log_dict({f"{stage}/acc_class_{c}": value for c, value in enumerate(per_class)})
        class_accuracy.reset()

    # -- optimization ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_warmup_cosine(self, self.lr, hp.weight_decay, hp.warmup_fraction, hp.min_lr_ratio)


VIT_ARGUMENTS = ("image_size", "patch_size", "in_channels", "embed_dim", "depth", "num_heads", "mlp_ratio", "dropout",
                 "stem")


def _without_own_arguments(extra: dict[str, Any], own: tuple[str, ...]) -> dict[str, Any]:
    clashes = sorted(set(extra) & set(own))
    if clashes:
        raise ValueError(
            f"backbone_kwargs must not set {clashes}: they are ImageClassifier arguments; set them there instead"
        )
    return dict(extra)


def _feature_dim(backbone: nn.Module, in_channels: int, image_size: int) -> int:
    width = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
    if isinstance(width, int):
        return width
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            probe = backbone(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as err:
        raise ValueError(
            f"could not find the feature width of {type(backbone).__name__}: give it a `num_features` attribute "
            f"or set in_channels/image_size to its input shape (probe {in_channels}x{image_size}x{image_size} "
            f"failed: {err})"
        ) from err
    finally:
        backbone.train(was_training)
    if probe.ndim != 2:
        raise ValueError(
            f"{type(backbone).__name__} returned shape {list(probe.shape)} for one image; a backbone must return "
            "features [B, d] (add pooling/flatten)"
        )
    return int(probe.shape[1])
