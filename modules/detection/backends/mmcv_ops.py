"""Pure-PyTorch stand-ins for the compiled mmcv ops that have one, so mmdet detectors run on ``mmcv-lite``.

``mmcv-lite`` ships mmcv's Python code without the compiled extension ``mmcv._ext``. Importing ``mmcv.ops`` (which
``mmdet.models`` does) loads every op module, and each of them asks ``mmcv.utils.ext_loader.load_ext('_ext',
[names])`` for its kernels: that imports ``mmcv._ext`` and only checks ``hasattr`` for each name. :func:`install`
puts a module object at ``sys.modules["mmcv._ext"]`` before that import happens, so that

* these ops run real pure-PyTorch implementations (on any device, any float dtype):

  - ``nms`` (``torchvision.ops.nms``; ``offset=1`` handled by growing ``x2, y2`` by one pixel),
  - ``roi_align_forward`` / ``roi_align_backward`` (``torchvision.ops.roi_align`` and its backward; ``avg`` pooling
    only, ``pool_mode='max'`` raises :class:`NotImplementedError`),
  - ``ms_deform_attn_forward`` / ``ms_deform_attn_backward`` (mmcv's own
    ``multi_scale_deformable_attn_pytorch``, the backward by ``torch.autograd.grad`` through it),
  - ``sigmoid_focal_loss_forward`` / ``sigmoid_focal_loss_backward`` (the focal-loss formula, written with
    ``logsigmoid`` for stability, the backward by autograd),
  - ``get_compiler_version`` / ``get_compiling_cuda_version`` (say that no compiled ops are present);

* every other name resolves to a stub that raises :class:`NotImplementedError` *when called* (not at import), naming
  the op, the mmdet features that need it, and how to get a full mmcv.

That is enough for the DETR family (DETR, Deformable DETR, Conditional/DAB-DETR, DINO), one-stage detectors
(RetinaNet, FCOS, ATSS, RTMDet, YOLOX) and two-stage ones using RoIAlign (Faster/Mask/Cascade R-CNN); deformable
convolution (``dconv``/``mdconv``/DCN configs, RepPoints...), CARAFE, soft-NMS, RoIPool etc. stop at their stub.

:func:`install` does nothing when a compiled ``mmcv._ext`` is importable, and is idempotent. Nothing here is
installed at import time of ``lightning_plugins``: only ``MMDetBackend`` calls :func:`install`.

The module object's ``__spec__`` has no loader, so ``pkgutil.find_loader('mmcv._ext')`` (mmengine's
``mmcv_full_available()``) still answers ``None``: the shim does not claim to be a full mmcv.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, Callable

import torch

__all__ = ["EXT_NAME", "SUPPORTED_OPS", "compiled_ext_available", "install", "is_installed", "uninstall"]

EXT_NAME = "mmcv._ext"
_MARKER = "__lightning_plugins_mmcv_shim__"

#: how to get the compiled ops (quoted in every stub's error)
INSTALL_HINT = (
    "install a full mmcv (compiled ops) instead of mmcv-lite: either OpenMMLab's prebuilt wheel for a supported "
    "torch/CUDA pair (pip install mmcv==2.1.0 -f https://download.openmmlab.com/mmcv/dist/<cu>/<torch>/index.html, "
    "see https://mmcv.readthedocs.io/en/latest/get_started/installation.html), or build it from source "
    "(pip install --no-binary mmcv \"mmcv==2.1.0\" with setuptools<81 and the -std=c++14/c++17 flags in its "
    "setup.py raised to -std=c++20 for recent torch; about 30 minutes on 2 cores)"
)

#: op-name prefix -> the mmdet features that need it (for the stubs' messages; first matching prefix wins)
_FEATURES: tuple[tuple[str, str], ...] = (
    ("modulated_deform_conv", "modulated deformable convolution (DCNv2: 'mdconv' / dcnv2 configs, ResNet "
                              "dcn=dict(type='DCNv2'), DyHead, TOOD's task-aligned head, RepPoints v2...)"),
    ("deform_conv", "deformable convolution (DCN: '*-dconv-*' / dcn configs, ResNet dcn=dict(type='DCN'), "
                    "RepPoints, Guided Anchoring, VFNet's star-dconv head...)"),
    ("deform_roi_pool", "deformable RoI pooling (DCN configs with deformable RoI heads)"),
    ("softmax_focal_loss", "softmax focal loss (FocalLoss with use_sigmoid=False on GPU)"),
    ("softnms", "soft-NMS (test_cfg nms=dict(type='soft_nms'))"),
    ("nms_match", "nms_match (ScoreHLRSampler / PISA)"),
    ("nms_rotated", "rotated NMS (mmrotate)"),
    ("nms_quadri", "quadrilateral NMS (mmrotate)"),
    ("roi_pool", "RoIPool (roi_layer=dict(type='RoIPool'))"),
    ("roi_align_rotated", "rotated RoIAlign (mmrotate)"),
    ("carafe", "the CARAFE upsampler (carafe configs)"),
    ("masked_", "masked convolution (Guided Anchoring)"),
    ("corner_pool", "corner pooling (CornerNet / CentripetalNet)"),
    ("top_pool", "corner pooling (CornerNet / CentripetalNet)"),
    ("bottom_pool", "corner pooling (CornerNet / CentripetalNet)"),
    ("left_pool", "corner pooling (CornerNet / CentripetalNet)"),
    ("right_pool", "corner pooling (CornerNet / CentripetalNet)"),
    ("border_align", "border align (BorderDet-style heads)"),
    ("psamask", "PSA masks (segmentation heads)"),
    ("sync_bn", "mmcv's SyncBatchNorm (use torch.nn.SyncBatchNorm / plain BN instead)"),
    ("bbox_overlaps", "mmcv.ops.bbox_overlaps (mmdet's own bbox_overlaps is pure PyTorch and unaffected)"),
    ("point", "point-cloud ops (mmdet3d)"),
)


def _features(op: str) -> str:
    for prefix, text in _FEATURES:
        if op.startswith(prefix):
            return text
    return "the mmcv.ops layers built on it (no pure-PyTorch stand-in exists in lightning_plugins)"


def _stub(op: str) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{EXT_NAME}.{op} is not available: mmcv-lite has no compiled ops and lightning_plugins' pure-PyTorch "
            f"shim has no stand-in for {op!r}, which {_features(op)} need(s). Pick a config without it, or "
            f"{INSTALL_HINT}."
        )

    unavailable.__name__ = unavailable.__qualname__ = op
    unavailable.__doc__ = f"Stub for the compiled mmcv op {op!r}: raises NotImplementedError."
    return unavailable


# ---------------------------------------------------------------------------------------------------------- ops
def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Indices kept by greedy NMS, by decreasing score (mmcv's ``ext_module.nms`` contract)."""
    if boxes.numel() == 0:
        return boxes.new_zeros(0, dtype=torch.long)
    if offset:  # mmcv's legacy "+1" box convention: width = x2 - x1 + 1
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:4] + offset], dim=1)
    from torchvision.ops import nms as tv_nms

    return tv_nms(boxes[:, :4].contiguous(), scores.to(boxes.dtype).contiguous(), float(iou_threshold))


def _check_avg(pool_mode: int) -> None:
    if int(pool_mode) != 1:
        raise NotImplementedError(
            f"{EXT_NAME}.roi_align_forward with pool_mode='max' is not available: lightning_plugins' pure-PyTorch "
            f"RoIAlign (torchvision.ops.roi_align) only averages; use RoIAlign(pool_mode='avg') (mmdet's default) "
            f"or {INSTALL_HINT}."
        )


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                      sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """RoIAlign (``avg`` mode) into ``output``; ``rois`` are ``[K, 5]`` (batch index, x1, y1, x2, y2)."""
    _check_avg(pool_mode)
    from torchvision.ops import roi_align

    out = roi_align(input, rois.to(input.dtype), (int(aligned_height), int(aligned_width)), float(spatial_scale),
                    int(sampling_ratio), bool(aligned))
    output.copy_(out)


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, argmax_y: torch.Tensor,
                       argmax_x: torch.Tensor, grad_input: torch.Tensor, aligned_height: int, aligned_width: int,
                       spatial_scale: float, sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """Gradient of :func:`roi_align_forward` w.r.t. its input, into ``grad_input``."""
    _check_avg(pool_mode)
    importlib.import_module("torchvision")  # registers torch.ops.torchvision

    batch, channels, height, width = grad_input.shape
    grad = torch.ops.torchvision._roi_align_backward(
        grad_output.contiguous(), rois.to(grad_output.dtype), float(spatial_scale), int(aligned_height),
        int(aligned_width), batch, channels, height, width, int(sampling_ratio), bool(aligned))
    grad_input.copy_(grad)


def _ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_loc: torch.Tensor,
                    attn_weight: torch.Tensor) -> torch.Tensor:
    from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch

    return multi_scale_deformable_attn_pytorch(value, spatial_shapes, sampling_loc, attn_weight)


def ms_deform_attn_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                           sampling_loc: torch.Tensor, attn_weight: torch.Tensor,
                           im2col_step: int = 64) -> torch.Tensor:
    """Multi-scale deformable attention, ``[bs, num_queries, embed_dims]`` (``im2col_step`` is a CUDA detail)."""
    with torch.no_grad():
        return _ms_deform_attn(value, spatial_shapes, sampling_loc, attn_weight)


def ms_deform_attn_backward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                            sampling_loc: torch.Tensor, attn_weight: torch.Tensor, grad_output: torch.Tensor,
                            grad_value: torch.Tensor, grad_sampling_loc: torch.Tensor, grad_attn_weight: torch.Tensor,
                            im2col_step: int = 64) -> None:
    """Gradients of :func:`ms_deform_attn_forward` w.r.t. value, sampling locations and attention weights."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (value, sampling_loc, attn_weight)]
        out = _ms_deform_attn(inputs[0], spatial_shapes, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_output, allow_unused=True)
    for buffer, grad in zip((grad_value, grad_sampling_loc, grad_attn_weight), grads):
        if grad is None:
            buffer.zero_()
        else:
            buffer.copy_(grad)


def _sigmoid_focal(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float,
                   alpha: float) -> torch.Tensor:
    """Elementwise sigmoid focal loss; ``target`` holds class indices, ``num_classes`` (or any other value outside
    ``0..C-1``) meaning background (all classes negative), as in mmcv's kernels."""
    num_classes = input.size(1)
    positive = target.view(-1, 1) == torch.arange(num_classes, device=input.device).view(1, -1)
    p = input.sigmoid()
    term_p = (1 - p).pow(gamma) * torch.nn.functional.logsigmoid(input)  # (1-p)^g log p
    term_n = p.pow(gamma) * torch.nn.functional.logsigmoid(-input)  # p^g log(1-p)
    loss = torch.where(positive, -alpha * term_p, -(1 - alpha) * term_n)
    if weight is not None and weight.numel() > 0:
        if bool(((target < 0) | (target >= weight.numel())).any()):
            raise ValueError("sigmoid_focal_loss: a per-class weight needs every target in 0..num_classes-1")
        loss = loss * weight[target].view(-1, 1)
    return loss


def sigmoid_focal_loss_forward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                               output: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> None:
    """Unreduced sigmoid focal loss ``[N, C]`` into ``output`` (mmcv's argument order)."""
    with torch.no_grad():
        output.copy_(_sigmoid_focal(input, target, weight, gamma, alpha))


def sigmoid_focal_loss_backward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                                grad_input: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> None:
    """Elementwise derivative of the unreduced loss w.r.t. ``input``, into ``grad_input``."""
    with torch.enable_grad():
        x = input.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_sigmoid_focal(x, target, weight, gamma, alpha).sum(), x)
    grad_input.copy_(grad)


def get_compiler_version() -> str:
    return "none (mmcv-lite: lightning_plugins pure-PyTorch shim, no compiled ops)"


def get_compiling_cuda_version() -> str:
    return "not available (mmcv-lite: lightning_plugins pure-PyTorch shim, no compiled ops)"


#: the ops with a real implementation here (every other name is a stub)
SUPPORTED_OPS: dict[str, Callable[..., Any]] = {
    "nms": nms,
    "roi_align_forward": roi_align_forward,
    "roi_align_backward": roi_align_backward,
    "ms_deform_attn_forward": ms_deform_attn_forward,
    "ms_deform_attn_backward": ms_deform_attn_backward,
    "sigmoid_focal_loss_forward": sigmoid_focal_loss_forward,
    "sigmoid_focal_loss_backward": sigmoid_focal_loss_backward,
    "get_compiler_version": get_compiler_version,
    "get_compiling_cuda_version": get_compiling_cuda_version,
}


class _ShimExt(types.ModuleType):
    """``mmcv._ext`` stand-in: the supported ops as attributes, a raising stub for any other op name."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # keep the import machinery / pickling / hasattr(__file__) honest
            raise AttributeError(name)
        stub = _stub(name)
        setattr(self, name, stub)
        return stub


# ---------------------------------------------------------------------------------------------------- install
def is_installed() -> bool:
    """Whether ``sys.modules["mmcv._ext"]`` is this shim."""
    return bool(getattr(sys.modules.get(EXT_NAME), _MARKER, False))


def compiled_ext_available() -> bool:
    """Whether a real (compiled) ``mmcv._ext`` is imported or importable."""
    module = sys.modules.get(EXT_NAME)
    if module is not None:
        return not getattr(module, _MARKER, False)
    try:
        spec = importlib.util.find_spec(EXT_NAME)
    except (ImportError, ValueError):  # mmcv itself missing or broken
        return False
    return spec is not None and spec.loader is not None


def install() -> bool:
    """Make ``mmcv._ext`` resolve to the shim unless a compiled one exists. Idempotent.

    Call it before the first ``import mmcv.ops`` / ``mmdet.models``. Returns ``True`` when the shim is active (now
    or already), ``False`` when a compiled ``mmcv._ext`` is used instead (nothing is changed then).
    """
    if is_installed():
        return True
    if compiled_ext_available():
        return False
    module = _ShimExt(EXT_NAME, __doc__)
    module.__spec__ = importlib.machinery.ModuleSpec(EXT_NAME, None)  # no loader: not a "full" mmcv
    setattr(module, _MARKER, True)
    for name, fn in SUPPORTED_OPS.items():
        setattr(module, name, fn)
    sys.modules[EXT_NAME] = module
    parent = sys.modules.get("mmcv")
    if parent is not None:
        setattr(parent, "_ext", module)
    return True


def uninstall() -> None:
    """Remove the shim from ``sys.modules`` (modules that already bound it keep their reference). For tests."""
    if is_installed():
        del sys.modules[EXT_NAME]
        parent = sys.modules.get("mmcv")
        if parent is not None and getattr(getattr(parent, "_ext", None), _MARKER, False):
            delattr(parent, "_ext")
