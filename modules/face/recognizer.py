"""``FaceRecognizer``: a backbone, an embedding and a margin head, trained for identification and evaluated by
closed-set identification and pair verification."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_plugins.modules.backbones import IBasicBlock, build_backbone
from lightning_plugins.modules.backbones.vit import Block
from lightning_plugins.modules.face.heads import MarginHead
from lightning_plugins.modules.face.metrics import VerificationMetrics
from lightning_plugins.modules.schedules import adamw_warmup_cosine
from lightning_plugins.modules.sharding import shard_with_fsdp2

log = logging.getLogger(__name__)

IDENTIFICATION = "identification"

# The layers forgetting callbacks (GSLoRA) should adapt, for backbones of the project ViT: every block's FFN, and for
# the hybrid ViT also the readout projection that turns the tokens into the embedding (with the FFNs alone a
# well-trained face model keeps 20-24 % of the identities it is asked to forget: benchmarks/face_forgetting.py).
VIT_FFN_TARGET = r"(?P<block>(?:.*\.)?blocks\.\d+)\.mlp\.fc[12]"
READOUT_TARGET = r"(?P<block>(?:.*\.)?readout)\.proj"


class FaceRecognizer(pl.LightningModule):
    """Face recognition: ``backbone -> embedding [B, d] -> margin head`` (CosFace by default), AdamW, warm-up + cosine.

    ``forward(images)`` returns **margin-free** identity logits ``logit_scale * cos`` ``[B, num_classes]``: what
    identification accuracy, predictions and forgetting objectives (``GSLoRA``) see. The margin is applied only
    inside the training loss, so no metric is ever computed on margin logits. ``embed(images)`` returns the
    un-normalised embedding ``[B, d]`` (the features prototypes are built from); :meth:`verification_embeddings`
    the L2-normalised, optionally flip-summed ones used for verification.

    Validation and test batches are either ``(images, labels)`` (closed-set identification: ``val/acc``) or
    pairs ``(images_a, images_b, issame, index)`` (verification: ``val/<set>/auc``, ``eer``, ``acc`` (the 10-fold
    best-threshold accuracy of insightface), ``tar@far=...``), one set per extra dataloader, named by the
    DataModule's ``val_loader_names``/``test_loader_names`` (:class:`FaceDataModule` provides them).

    Args:
        num_classes: training identities.
        backbone: a registered backbone name (``"iresnet_small"``: a small IResNet for 32x32 faces, the CPU default;
            ``"vit_face_small"``: a small hybrid ViT, the CPU preset ``GSLoRA`` can adapt; ``"vit_face"``: GS-LoRA's
            Face Transformer, 112x112, patch 8, 512 wide, 6 blocks; ``"iresnet18"``/``"iresnet50"``;
            ``"inception_resnet_v1"`` (facenet-pytorch); ``"torchvision:<name>"``, ``"timm:<name>"``) or any
            ``nn.Module`` mapping images to ``[B, d]``.
        backbone_kwargs: extra arguments of the named backbone (e.g. ``{"depth": 6}``).
        in_channels: image channels, passed to named backbones.
        head: ``"cosface"``, ``"arcface"``, ``"combined"`` or ``"softmax"``.
        scale: logit scale ``s`` of the margin head (the papers use 64; 30 trains small models much faster).
        margin: CosFace/ArcFace margin (``None``: 0.35 / 0.5).
        margins: ``(m1, m2, m3)`` for ``head="combined"``.
        logit_scale: scale of the margin-free logits returned by ``forward`` (``None``: ``scale``). Accuracy does
            not depend on it. Lower it (e.g. 8) before forgetting a well-trained model with ``GSLoRA``: at s=30 the
            softmax of a confident model is saturated and a bounded forgetting loss gets no gradient. It can be
            set later (``model.logit_scale = 8``); the value is saved in the checkpoint's hyperparameters.
        lr: peak AdamW learning rate (``None``: 3e-3 for ViT backbones, 1e-3 otherwise).
        weight_decay: AdamW weight decay (not applied to biases, norms and tokens).
        warmup_fraction: share of the steps spent warming the LR up.
        min_lr_ratio: final LR of the cosine decay as a share of ``lr``.
        flip_eval: verification embeds each image and its mirror image and sums the two (insightface's protocol).
        fars: false accept rates at which verification reports the true accept rate.
    """

    def __init__(
        self,
        num_classes: int = 80,
        backbone: Union[str, nn.Module] = "iresnet_small",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        in_channels: int = 3,
        head: str = "cosface",
        scale: float = 30.0,
        margin: Optional[float] = None,
        margins: Optional[tuple[float, float, float]] = None,
        logit_scale: Optional[float] = None,
        lr: Optional[float] = None,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
        flip_eval: bool = True,
        fars: Sequence[float] = (1e-3, 1e-4),
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if logit_scale is not None and not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        bad_fars = [far for far in fars if not 0 < far < 1]
        if bad_fars:
            raise ValueError(f"fars must lie in (0, 1), got {bad_fars}")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, str):
            is_vit = backbone.startswith("vit")
            backbone = build_backbone(backbone, in_channels=in_channels, **(backbone_kwargs or {}))
        elif isinstance(backbone, nn.Module):
            if backbone_kwargs:
                raise ValueError("backbone_kwargs apply to a backbone given by name; build the nn.Module with them")
            is_vit = False
        else:
            raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.embed_dim = _embedding_width(backbone)
        self.head = MarginHead(self.embed_dim, num_classes, head, scale, margin, margins)
        self.logit_scale = logit_scale
        self.lr = (3e-3 if is_vit else 1e-3) if lr is None else lr
        self.fars = tuple(float(far) for far in fars)
        self.flip_eval = flip_eval
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.verification = nn.ModuleDict()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over the data-parallel devices, one unit per Transformer or residual
        block and one for the rest (nothing under other strategies)."""
        shard_with_fsdp2(self, self.device_mesh, block_types=(Block, IBasicBlock))

    # -- model ----------------------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> Optional[float]:
        """Scale of the margin-free logits of ``forward`` (``None``: the head's ``scale``)."""
        return self._logit_scale

    @logit_scale.setter
    def logit_scale(self, value: Optional[float]) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"logit_scale must be > 0, got {value!r}")
        self._logit_scale = None if value is None else float(value)
        self.hparams["logit_scale"] = self._logit_scale  # so that a checkpoint restores it

    @property
    def gslora_target(self) -> Optional[list[str]]:
        """The ``nn.Linear`` layers a forgetting callback should adapt (GSLoRA reads it when its ``target`` is unset):
        the project ViT's FFNs, plus the hybrid ViT's readout projection; ``None`` (the callback's defaults) for
        other backbones."""
        if not any(name.endswith("mlp.fc1") for name, _ in self.backbone.named_modules()):
            return None
        has_readout = any(name == "readout.proj" for name, _ in self.backbone.named_modules())
        return [VIT_FFN_TARGET, READOUT_TARGET] if has_readout else [VIT_FFN_TARGET]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The un-normalised embedding ``[B, d]``."""
        features = self.backbone(images)
        if features.ndim != 2:
            raise ValueError(f"the backbone must return embeddings [B, d], got shape {list(features.shape)}")
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Margin-free identity logits ``[B, num_classes]`` (``logit_scale * cos`` for margin heads)."""
        return self.head(self.embed(images), self.logit_scale)

    def verification_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings ``[B, d]``; with ``flip_eval`` the sum of the image's and its mirror's."""
        features = self.embed(images)
        if self.flip_eval:
            features = features + self.embed(images.flip(-1))
        return nn.functional.normalize(features, dim=1)

    # -- steps ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but {type(datamodule).__name__} has {data_classes} "
                f"identities; set the model's num_classes to {data_classes}"
            )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        features = self.embed(images)
        loss = nn.functional.cross_entropy(self.head.training_logits(features, labels), labels)
        with torch.no_grad():
            self.train_acc(self.head(features.detach(), self.logit_scale), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", dataloader_idx)

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_verification("val")

    def on_test_epoch_end(self) -> None:
        self._log_verification("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Identity probabilities and predictions, and the normalised verification embeddings."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(images).softmax(dim=-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1), "embeddings": self.verification_embeddings(images)}

    def _evaluate(self, batch: Sequence[torch.Tensor], stage: str, dataloader_idx: int) -> None:
        if len(batch) == 2:
            images, labels = batch
            logits = self(images)
            accuracy = self.val_acc if stage == "val" else self.test_acc
            accuracy(logits, labels)
            self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, labels), add_dataloader_idx=False)
            self.log(f"{stage}/acc", accuracy, prog_bar=True, add_dataloader_idx=False)
            return
        if len(batch) != 4:
            raise ValueError(
                f"{stage} batches must be (images, labels) or verification pairs (images_a, images_b, issame, index); "
                f"got a batch of {len(batch)} items"
            )
        images_a, images_b, issame, index = batch
        scores = (self.verification_embeddings(images_a) * self.verification_embeddings(images_b)).sum(dim=1)
        self._verification_metric(stage, dataloader_idx).update(scores.clamp(-1.0, 1.0), issame.bool(), index)

    def _verification_metric(self, stage: str, dataloader_idx: int) -> VerificationMetrics:
        key = f"{stage}_{self._loader_name(stage, dataloader_idx)}"
        if key not in self.verification:
            self.verification[key] = VerificationMetrics(fars=self.fars).to(self.device)
        return self.verification[key]

    def _loader_name(self, stage: str, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, f"{stage}_loader_names", None)
        if isinstance(names, (list, tuple)) and dataloader_idx < len(names):
            return str(names[dataloader_idx])
        return f"pairs{dataloader_idx}"

    def _log_verification(self, stage: str) -> None:
        for key, metric in self.verification.items():
            if not key.startswith(f"{stage}_") or not metric.update_called:
                continue
            if self.trainer.sanity_checking:  # a few batches need not hold both same and different pairs
                metric.reset()
                continue
            name = key[len(stage) + 1:]
            results = metric.compute()
            self.log_dict({f"{stage}/{name}/{field}": value for field, value in results.items()},
                          add_dataloader_idx=False, prog_bar=False)
            metric.reset()

    # -- optimization ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return adamw_warmup_cosine(self, self.lr, hp.weight_decay, hp.warmup_fraction, hp.min_lr_ratio)


def _embedding_width(backbone: nn.Module) -> int:
    width = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
    if isinstance(width, int):
        return width
    raise ValueError(
        f"could not tell the embedding width of {type(backbone).__name__}: give it a `num_features` attribute "
        "(the width of the [B, d] embeddings it returns)"
    )
