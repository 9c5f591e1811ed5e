"""mmdet (MMDetection 3.x) detectors behind the :class:`DetectionBackend` contract.

``MMDetBackend(num_classes, model=..., model_overrides=...)`` builds an mmdet detector **offline and from scratch**
from a config shipped in the mmdet wheel (``mmdet/.mim/configs/**``) or from a config file:

* ``model``: a shipped config's file stem (``"deformable-detr_r50_16xb2-50e_coco"``), a relative name
  (``"deformable_detr/deformable-detr_r50_16xb2-50e_coco"``; only the stem is matched, the folder breaks ties), an
  ``"mmdet::folder/name.py"`` name, or a path to a config file. An unknown name raises with close matches.
  Default: :attr:`MMDetBackend.DEFAULT_MODEL`, Deformable DETR R-50 (full size; pass ``model_overrides`` such as
  :data:`TINY_DETR_OVERRIDES` for CPU-sized experiments).
* ``model_overrides``: deep-merged into ``cfg.model`` (dicts merge key by key, anything else replaces; a dict with
  ``_delete_=True`` replaces the whole entry, as in mmengine configs). Applied before the edits below.
* ``num_classes`` is written to every ``num_classes`` key of the model config (heads, cascade stages, mask heads),
  except under ``rpn_head`` (class-agnostic by design) and ``semantic_head``.
* Pretrained weights are never loaded: every ``init_cfg`` of type ``Pretrained`` is dropped (everywhere in the
  model config), old-style ``pretrained=`` keys are cleared, and a ``ValueError`` is raised if any ``checkpoint`` /
  ``pretrained`` / URL value is left. (Load weights through Lightning checkpoints / ``load_state_dict``: the
  backend is an ``nn.Module``; mmengine's checkpoint loader is not used -- it breaks under torch>=2.6
  ``weights_only``.)
* From scratch, ResNet-like backbones get trainable BN (``norm_cfg=BN(requires_grad=True)``, ``norm_eval=False``,
  ``frozen_stages=-1``), and a neck whose ``in_channels`` the overrides do not set is re-derived from the backbone's
  ``depth`` / ``base_channels`` / ``out_indices`` (so ``{"backbone": {"depth": 18}}`` is enough for ResNet-18).
* ``test_cfg``: ``score_thr`` (where present, also ``rcnn``/cascade stages; never ``rpn``) is set to
  ``score_threshold`` and ``max_per_img`` (same places) to ``max_per_img``.
* Instance-segmentation configs lose their RoI mask branch (``mask_head`` / ``mask_roi_extractor``) unless
  ``with_masks=True`` (then targets carry ``"masks"``).
* ``data_preprocessor.batch_augments`` (e.g. YOLOX's multi-scale ``BatchSyncRandomResize``) are removed unless
  ``batch_augments=True``.

Colour order: mmdet configs expect images as loaded by OpenCV (BGR) and convert with ``bgr_to_rgb`` when their
mean/std are RGB. Our images are RGB, so the backend feeds them as BGR ``0..255`` floats and leaves the config's
preprocessor as it is: that is right for RGB-normalised and for caffe-style BGR-normalised configs alike.

Loss split (:meth:`MMDetBackend.split_losses`): each loss key is reduced to its term -- the text after the last
``loss_`` of the last dotted component, so ``d0.loss_cls``, ``enc_loss_cls``, ``dn_loss_cls``, ``s1.loss_cls`` and
``loss_rpn_cls`` give ``cls`` / ``rpn_cls`` -- and the term decides the part:

* ``"cls"``: :data:`CLS_TERMS` (``cls``, ``rpn_cls``, ``obj`` (objectness), ``center_heatmap``...);
* ``"box"``: :data:`BOX_TERMS` (``bbox``, ``iou``, ``giou``, ``rpn_bbox``, ``centerness``, ``l1``, ``dfl``...);
* neither: :data:`MASK_TERMS` (``mask``, ``dice``...) -- known, part of the total, but not of ``cls + box``;
* any other term raises ``KeyError`` (extend the tuples rather than let a term vanish silently).

mmcv-lite has no compiled ops: the backend installs :mod:`.mmcv_ops` (pure-PyTorch nms / RoIAlign / multi-scale
deformable attention / sigmoid focal loss; a ``NotImplementedError`` naming the op and the fix for the rest) before
importing ``mmdet.models``, unless a compiled mmcv is present.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import os
import re
from functools import lru_cache
from typing import Any, Iterator, Optional

import torch

from .base import DetectionBackend, Prediction, Target

__all__ = [
    "BOX_TERMS",
    "CLS_TERMS",
    "DETR_FFN_TARGET",
    "MASK_TERMS",
    "MMDetBackend",
    "TINY_DETR_OVERRIDES",
    "find_config",
    "list_configs",
]

#: the Linear layers of every DETR-family (mmcv ``FFN``) feed-forward block: ``layers.0.0`` and ``layers.1``
DETR_FFN_TARGET = r"(?P<block>(?:.*\.)?(?:encoder|decoder)\.layers\.\d+)\.ffn\.layers\.(?:0\.0|1)"

#: loss terms (see the module docstring) that are classification / localisation / known-but-neither
CLS_TERMS = ("cls", "rpn_cls", "obj", "objectness", "center_heatmap", "heatmap", "conf")
BOX_TERMS = (
    "bbox", "iou", "giou", "rpn_bbox", "centerness", "l1", "dfl", "wh", "offset", "bbox_init", "bbox_refine",
    "pts_init", "pts_refine", "ld", "embedding",
)
MASK_TERMS = ("mask", "dice", "mask_iou", "semantic_seg", "seg")

#: CPU-sized DETR-family overrides: ResNet-18 (half width), 1 encoder + 1 decoder layer, FFN 128, 30 queries. Works
#: with DETR, Deformable DETR, Conditional/DAB-DETR and DINO configs (DINO: also lower ``dn_cfg`` num_dn_queries).
TINY_DETR_OVERRIDES: dict[str, Any] = {
    "backbone": {"depth": 18, "base_channels": 32},
    "encoder": {"num_layers": 1, "layer_cfg": {"ffn_cfg": {"feedforward_channels": 128}}},
    "decoder": {"num_layers": 1, "layer_cfg": {"ffn_cfg": {"feedforward_channels": 128}}},
    "num_queries": 30,
}

_RESNET_LIKE = ("ResNet", "ResNetV1c", "ResNetV1d", "ResNeXt", "Res2Net", "ResNeSt", "DetectoRS_ResNet")
_PRETRAINED_KEYS = ("checkpoint", "pretrained", "pretrained_model", "load_from", "ckpt")


# ------------------------------------------------------------------------------------------------------ configs
def _config_root() -> str:
    import mmdet

    return os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")


@lru_cache(maxsize=1)
def _config_index() -> dict[str, tuple[str, ...]]:
    index: dict[str, list[str]] = {}
    root = _config_root()
    for folder, _, files in os.walk(root):
        if "_base_" in os.path.relpath(folder, root).split(os.sep):
            continue
        for name in files:
            if name.endswith(".py") and not name.startswith("__"):
                index.setdefault(name[:-3], []).append(os.path.join(folder, name))
    return {stem: tuple(sorted(paths)) for stem, paths in index.items()}


def list_configs() -> list[str]:
    """File stems of the configs shipped in the mmdet wheel."""
    return sorted(_config_index())


def _norm(text: str) -> str:
    return text.replace("-", "_").lower()


def find_config(model: str) -> str:
    """Path of the config ``model`` names: an existing file, or a shipped config (see the module docstring)."""
    if os.path.isfile(model):
        return os.path.abspath(model)
    name = model.split("::", 1)[1] if "::" in model else model
    name = name[:-3] if name.endswith(".py") else name
    folder, _, stem = name.replace("\\", "/").rpartition("/")
    index = _config_index()
    paths = index.get(stem)
    if not paths:
        close = difflib.get_close_matches(stem, list(index), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise FileNotFoundError(
            f"mmdet config {model!r} not found: not a file, and no {stem}.py under {_config_root()}.{hint}"
        )
    if len(paths) > 1 and folder:
        wanted = _norm(folder)
        matching = [p for p in paths if _norm(os.path.dirname(p)).endswith(wanted)]
        paths = tuple(matching) or paths
    return paths[0]


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and value.get("_delete_", False):
            out[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != "_delete_"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _walk(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every dict inside ``node`` (depth first), with its key path."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, path + (key,))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _walk(value, path + (i,))


def _is_pretrained(init: Any) -> bool:
    return isinstance(init, dict) and str(init.get("type", "")).lower() == "pretrained"


def _strip_pretrained(model_cfg: dict) -> None:
    """Drop ``Pretrained`` init_cfgs and ``pretrained=`` keys everywhere; raise if a checkpoint reference is left."""
    for _, node in list(_walk(model_cfg)):
        init = node.get("init_cfg")
        if _is_pretrained(init):
            node["init_cfg"] = None
        elif isinstance(init, (list, tuple)):
            node["init_cfg"] = [c for c in init if not _is_pretrained(c)] or None
        if "pretrained" in node and isinstance(node["pretrained"], str):
            node["pretrained"] = None
    left = []
    for path, node in _walk(model_cfg):
        for key, value in node.items():
            if isinstance(value, str) and (key in _PRETRAINED_KEYS or "://" in value):
                left.append(".".join(map(str, path + (key,))) + f"={value!r}")
    if left:
        raise ValueError(
            "MMDetBackend builds detectors offline and from scratch, but the model config still references "
            f"pretrained weights: {', '.join(left)}. Remove them (e.g. via model_overrides) and load weights through "
            "a Lightning checkpoint / load_state_dict instead (mmengine's checkpoint loader is not used)."
        )


def _stage_channels(backbone: dict) -> Optional[list[int]]:
    if backbone.get("type") not in _RESNET_LIKE or "depth" not in backbone:
        return None
    expansion = 1 if int(backbone["depth"]) in (18, 34) else 4
    base = int(backbone.get("base_channels", 64))
    stages = int(backbone.get("num_stages", 4))
    out = backbone.get("out_indices", tuple(range(stages)))
    return [base * 2**i * expansion for i in out]


def _prepare_model_cfg(model_cfg: dict, num_classes: int, overrides: Optional[dict], score_threshold: float,
                       max_per_img: int, batch_augments: bool, with_masks: bool = False) -> dict:
    overrides = copy.deepcopy(overrides or {})
    cfg = _deep_merge(model_cfg, overrides)

    for path, node in _walk(cfg):
        if "num_classes" in node and not any(p in ("rpn_head", "semantic_head") for p in path):
            node["num_classes"] = int(num_classes)

    _strip_pretrained(cfg)

    backbone = cfg.get("backbone")
    if isinstance(backbone, dict):
        if backbone.get("type") in _RESNET_LIKE:
            backbone["norm_cfg"] = dict(type="BN", requires_grad=True)
            backbone["norm_eval"] = False
            backbone["frozen_stages"] = -1
        else:
            if "norm_eval" in backbone:
                backbone["norm_eval"] = False
            if "frozen_stages" in backbone:
                backbone["frozen_stages"] = -1
        channels = _stage_channels(backbone)
        neck = cfg.get("neck")
        neck = neck[0] if isinstance(neck, (list, tuple)) and neck else neck
        neck_overridden = isinstance(overrides.get("neck"), dict) and "in_channels" in overrides["neck"]
        if channels is not None and isinstance(neck, dict) and "in_channels" in neck and not neck_overridden:
            if isinstance(neck["in_channels"], (list, tuple)) and len(neck["in_channels"]) == len(channels):
                neck["in_channels"] = channels

    if "num_queries" in cfg:  # DETR heads take top-k over queries (x classes for sigmoid heads): k must fit
        head = cfg.get("bbox_head") if isinstance(cfg.get("bbox_head"), dict) else {}
        sigmoid = bool((head.get("loss_cls") or {}).get("use_sigmoid", False))
        max_per_img = min(int(max_per_img), int(cfg["num_queries"]) * (int(num_classes) if sigmoid else 1))
    test_cfg = cfg.get("test_cfg")
    if isinstance(test_cfg, dict):
        for path, node in _walk(test_cfg):
            if "rpn" in path:
                continue
            if "score_thr" in node:
                node["score_thr"] = float(score_threshold)
            if "max_per_img" in node:
                node["max_per_img"] = int(max_per_img)

    if not with_masks:  # instance-segmentation configs become their box-only detector
        for _, node in _walk(cfg):
            if node.get("mask_head") is not None and "mask_roi_extractor" in node:
                node["mask_head"] = None
                node["mask_roi_extractor"] = None

    preprocessor = cfg.get("data_preprocessor")
    if isinstance(preprocessor, dict) and not batch_augments:
        preprocessor["batch_augments"] = None
    return cfg


# ------------------------------------------------------------------------------------------------------ backend
_EVAL_KEEPERS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.modules.dropout._DropoutNd,
    torch.nn.MultiheadAttention,
)


def _keeps_eval(module: torch.nn.Module) -> bool:
    """Modules whose train/eval switch changes statistics or randomness (kept in eval for eval-mode losses)."""
    return isinstance(module, _EVAL_KEEPERS) or "drop" in type(module).__name__.lower()


class MMDetBackend(DetectionBackend):
    """An mmdet detector (any shipped or custom config), built offline from scratch. See the module docstring.

    Args:
        num_classes: number of object classes (labels ``0..num_classes-1``).
        model: config name or path (default :attr:`DEFAULT_MODEL`).
        model_overrides: deep-merged into ``cfg.model`` first (e.g. :data:`TINY_DETR_OVERRIDES`).
        score_threshold: ``test_cfg`` ``score_thr`` where the config has one (DETR heads have none).
        max_per_img: ``test_cfg`` ``max_per_img`` where the config has one: the per-image detection limit.
        batch_augments: keep the config's training ``batch_augments`` (off by default: they resize batches).
        with_masks: keep the mask branch of instance-segmentation configs (Mask/Cascade Mask R-CNN); targets must
            then carry ``"masks"`` (bool ``[N, H, W]``). Off by default: the RoI mask head is removed, leaving the
            box detector (the contract has no masks).
    """

    DEFAULT_MODEL = "deformable-detr_r50_16xb2-50e_coco"

    def __init__(self, num_classes: int, model: str = DEFAULT_MODEL, model_overrides: Optional[dict] = None,
                 score_threshold: float = 0.05, max_per_img: int = 100, batch_augments: bool = False,
                 with_masks: bool = False) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        from . import mmcv_ops

        mmcv_ops.install()  # before the first `import mmcv.ops` (mmdet.models does it)
        try:
            from mmengine.config import Config, ConfigDict
            from mmengine.logging import MMLogger
            from mmdet.registry import MODELS
            from mmdet.utils import register_all_modules
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MMDetBackend needs mmdet 3.x with mmengine and mmcv (mmcv-lite is enough): "
                "pip install mmdet mmengine mmcv-lite"
            ) from error

        self.num_classes = int(num_classes)
        self.config_path = find_config(model)
        cfg = Config.fromfile(self.config_path)
        model_cfg = _prepare_model_cfg(cfg.model.to_dict(), self.num_classes, model_overrides, score_threshold,
                                       max_per_img, batch_augments, with_masks)
        self.model_cfg = model_cfg
        self.max_per_img = int(max_per_img)

        register_all_modules(init_default_scope=True)
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # init_weights logs every tensor at INFO
        try:
            detector = MODELS.build(ConfigDict(copy.deepcopy(model_cfg)))
            detector.init_weights()
        finally:
            logger.setLevel(level)
        self.detector = detector

        names = [name for name, _ in self.detector.named_modules()]
        self.gslora_target = (
            DETR_FFN_TARGET
            if any(re.fullmatch(DETR_FFN_TARGET, name) for name in names)
            else None
        )

    # ---------------------------------------------------------------------------------------------- batching
    def _device(self) -> torch.device:
        for tensor in self.detector.parameters():
            return tensor.device
        return torch.device("cpu")

    def _batch(self, images: list[torch.Tensor], targets: Optional[list[Target]]) -> dict:
        from mmengine.structures import InstanceData
        from mmdet.structures import DetDataSample

        device = self._device()
        inputs, samples = [], []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.size(0) != 3:
                raise ValueError(f"images must be float [3, H, W] tensors, got shape {tuple(image.shape)}")
            h, w = int(image.size(1)), int(image.size(2))
            inputs.append(image.to(device).flip(0) * 255.0)  # RGB [0, 1] -> BGR [0, 255], as mmdet loads images
            sample = DetDataSample(metainfo=dict(img_id=i, img_shape=(h, w), ori_shape=(h, w),
                                                 scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
            if targets is not None:
                boxes = targets[i]["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
                labels = targets[i]["labels"].to(device=device, dtype=torch.long).reshape(-1)
                sample.gt_instances = InstanceData(bboxes=boxes, labels=labels)
                if "masks" in targets[i]:
                    from mmdet.structures.mask import BitmapMasks

                    masks = targets[i]["masks"].detach().cpu().to(torch.uint8).numpy().reshape(-1, h, w)
                    sample.gt_instances.masks = BitmapMasks(masks, h, w)
            samples.append(sample)
        preprocessor = self.detector.data_preprocessor
        preprocessor._device = device  # nn.Module.to() does not reach mmengine's own device attribute
        return preprocessor(dict(inputs=inputs, data_samples=samples), self.training)

    @contextlib.contextmanager
    def _loss_graph(self) -> Iterator[None]:
        """In eval mode, run mmdet's *training* code path (heads and detectors branch on ``self.training``: DETR
        encoder outputs, DINO denoising queries, FCOS stride scaling...) with normalisation statistics frozen and
        dropout off: every module is flagged training except BN/InstanceNorm, dropout-like and
        ``nn.MultiheadAttention`` (functional dropout) modules. Restored afterwards. No-op in training mode."""
        if self.training:
            yield
            return
        flipped = [m for m in self.detector.modules() if not _keeps_eval(m)]
        for module in flipped:
            module.training = True
        try:
            yield
        finally:
            for module in flipped:
                module.training = False

    # ---------------------------------------------------------------------------------------------- contract
    def losses(self, images: list[torch.Tensor], targets: list[Target]) -> dict[str, torch.Tensor]:
        """mmdet's ``mode="loss"`` terms whose key contains ``loss`` (lists summed, as ``parse_losses`` does);
        other entries (e.g. ``acc``) are dropped, so the values sum to the training loss. In eval mode the training
        code path runs with frozen BN statistics and without dropout (see :meth:`_loss_graph`)."""
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        batch = self._batch(images, targets)
        with self._loss_graph():
            raw = self.detector(**batch, mode="loss")
        out: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            if "loss" not in key:
                continue
            if isinstance(value, torch.Tensor):
                out[key] = value.mean()
            else:
                out[key] = sum(v.mean() for v in value)
        return out

    @staticmethod
    def loss_term(key: str) -> str:
        """The term of a loss key: ``d0.loss_cls`` -> ``cls``, ``enc_loss_bbox`` -> ``bbox``."""
        name = key.rsplit(".", 1)[-1]
        return name.rsplit("loss_", 1)[-1] if "loss_" in name else name

    def split_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cls: list[torch.Tensor] = []
        box: list[torch.Tensor] = []
        for key, value in losses.items():
            term = MMDetBackend.loss_term(key)
            if term in CLS_TERMS:
                cls.append(value)
            elif term in BOX_TERMS:
                box.append(value)
            elif term not in MASK_TERMS:
                raise KeyError(
                    f"MMDetBackend.split_losses: unknown loss term {term!r} (key {key!r}); known classification "
                    f"terms {CLS_TERMS}, localisation terms {BOX_TERMS}, excluded mask terms {MASK_TERMS}"
                )
        zero = next(iter(losses.values())).new_zeros(()) if losses else torch.zeros(())
        return {"cls": sum(cls, zero), "box": sum(box, zero)}

    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        results = self.detector(**self._batch(images, None), mode="predict")
        out: list[Prediction] = []
        for image, result in zip(images, results):
            pred = result.pred_instances
            h, w = int(image.size(1)), int(image.size(2))
            boxes = pred.bboxes.float()
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
            scores = pred.scores.float()
            order = scores.argsort(descending=True)[: self.max_per_img]
            out.append({"boxes": boxes[order], "scores": scores[order], "labels": pred.labels.long()[order]})
        return out

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, config={os.path.basename(self.config_path)!r}"
