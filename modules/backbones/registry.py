"""The backbone registry shared by every module: ``build_backbone(name, **kwargs) -> nn.Module``.

Every backbone maps images ``[B, C, H, W]`` to features ``[B, d]`` and has a ``num_features`` attribute (``d``).

Names (see :func:`backbone_names`):

* ``"vit"``: the project's :class:`VisionTransformer` (its own defaults).
* ``"vit_face"``: the Face Transformer of GS-LoRA (ViT, 112x112, patch 8, width 512, depth 6, 8 heads, MLP 4x).
* ``"vit_face_small"``: a CPU-sized hybrid ViT for faces (conv stem, any size, width 128, depth 4, 4 heads, MLP 2x).
* ``"iresnet18"``, ``"iresnet34"``, ``"iresnet50"``, ``"iresnet100"``: ArcFace's :class:`IResNet` (112x112,
  widths 64..512, embedding 512); ``"iresnet_small"``: 3 stages of one block (32, 64, 128 channels), 32x32,
  embedding 128 (0.57 M parameters); ``"iresnet"``: free ``layers``/``widths``.
* ``"inception_resnet_v1"``: facenet-pytorch's ``InceptionResnetV1`` (FaceNet; L2-normalised 512-d features,
  3-channel inputs of at least 75x75), built from scratch.
* ``"torchvision:<model>"``: any ``torchvision.models`` classifier (``torchvision:resnet18``,
  ``torchvision:mobilenet_v3_small``, ...) built with ``weights=None``; its final ``nn.Linear`` (the classifier)
  becomes ``nn.Identity``, so it returns the features that fed the classifier (the pooled features for ResNets).
  ``in_channels`` other than 3 replaces the first 3-channel convolution by one with ``in_channels`` inputs (same
  kernel, stride, padding; with ``weights_path`` its weights are adapted from the RGB kernel as timm does, else
  freshly initialised).
* ``"timm:<model>"``: ``timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_channels)``
  (``pip install timm``).

Any preset value can be overridden by a keyword argument, e.g. ``build_backbone("vit_face", depth=2)``. Every
builder also takes ``weights_path=``: a local state-dict file loaded with ``torch.load(weights_only=True)``.
Nothing here downloads: names of downloadable weights (torchvision ``weights=``, facenet ``"vggface2"``, timm
``pretrained=True``) are refused with a message saying to download the file yourself and pass ``weights_path``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightning_plugins.modules.backbones.iresnet import IResNet
from lightning_plugins.modules.backbones.vit import VisionTransformer

PREFIXES = ("torchvision:", "timm:")

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, str] = {}
FACENET_INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"
FACENET_DOWNLOADS = ("vggface2", "casia-webface")


def register_backbone(name: str, builder: Callable[..., nn.Module], family: str = "general") -> None:
    """Register ``builder`` (a callable returning an ``nn.Module`` with ``num_features``) under ``name``."""
    if not isinstance(name, str) or not name or name.startswith(PREFIXES):
        raise ValueError(f"backbone name must be a non-empty string not starting with {PREFIXES}, got {name!r}")
    BACKBONES[name] = builder
    _FAMILIES[name] = family


def backbone_names(include_prefixes: bool = False) -> list[str]:
    """The registered names (in registration order); with ``include_prefixes``, also ``"torchvision:<model>"``
    and ``"timm:<model>"``."""
    names = list(BACKBONES)
    return names + [f"{prefix}<model>" for prefix in PREFIXES] if include_prefixes else names


def backbone_parameters(name: str) -> list[str]:
    """The keyword arguments the builder of ``name`` declares (``weights_path`` included), e.g. to decide whether
    to pass ``image_size``. Builders that forward any keyword (``torchvision:``/``timm:``) list only their own."""
    _, builder, _ = _resolve(name)
    declared = _declared(builder)[0]
    return declared + ([] if "weights_path" in declared else ["weights_path"])


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone called ``name`` (see the module docstring), e.g. ``build_backbone("vit", depth=4)``,
    ``build_backbone("iresnet50")``, ``build_backbone("torchvision:resnet18", in_channels=1)``."""
    label, builder, prefixed = _resolve(name)
    declared, open_ended = _declared(builder)
    weights_path = None
    if "weights_path" not in declared:
        weights_path = kwargs.pop("weights_path", None)
    unknown = sorted(set(kwargs) - set(declared)) if not open_ended else []
    if unknown:
        accepted = sorted(set(declared) | {"weights_path"})
        raise TypeError(
            f"backbone {label!r} got unexpected argument(s) {unknown}; it accepts {accepted}"
        )
    model = builder(name.split(":", 1)[1], **kwargs) if prefixed else builder(**kwargs)
    if weights_path is not None:
        model.load_state_dict(_load_state_dict(weights_path, label))
    return model


# -- resolution ---------------------------------------------------------------------------------------------------
def _resolve(name: Any) -> tuple[str, Callable[..., nn.Module], bool]:
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a string, got {type(name).__name__}")
    if name.startswith("torchvision:"):
        return name, _build_torchvision, True
    if name.startswith("timm:"):
        return name, _build_timm, True
    if name in BACKBONES:
        return name, BACKBONES[name], False
    groups: dict[str, list[str]] = {}
    for registered, family in _FAMILIES.items():
        groups.setdefault(family, []).append(registered)
    listed = ", ".join(f"{names} ({family})" for family, names in groups.items())
    close = difflib.get_close_matches(name, list(BACKBONES), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown backbone {name!r}; choose one of {listed}, 'torchvision:<model>' or 'timm:<model>', or pass an "
        f"nn.Module instance (in YAML: a class_path/init_args mapping){hint}"
    )


def _declared(builder: Callable[..., nn.Module]) -> tuple[list[str], bool]:
    """(keyword parameters the builder declares, whether it also takes ``**kwargs``)."""
    parameters = inspect.signature(builder).parameters.values()
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if builder in (_build_torchvision, _build_timm):
        names = names[1:]  # the model name, taken from the prefix
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _load_state_dict(path: Any, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone {label!r}: weights_path={path!r} is not a local file; download the state dict yourself "
            "and pass its path (nothing is downloaded here)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"backbone {label!r}: {path} does not hold a state dict (got {type(state).__name__})")
    return state


# -- face backbones -----------------------------------------------------------------------------------------------
def _inception_min_size() -> int:
    def side_out(side: int) -> int:
        side = (side - 3) // 2 + 1 - 2  # conv2d_1a (3x3 s2), conv2d_2a (3x3)
        side = (side - 3) // 2 + 1 - 2  # maxpool_3a (3 s2), conv2d_4a (3x3)
        for _ in range(3):  # conv2d_4b, mixed_6a, mixed_7a (3x3 s2 each)
            side = (side - 3) // 2 + 1
        return side

    return next(side for side in range(3, 1024) if side_out(side) >= 1)


INCEPTION_MIN_SIZE = _inception_min_size()  # 75


def _check_inception_input(module: nn.Module, args: tuple) -> None:
    images = args[0]
    size = module.image_size
    if (
        images.ndim != 4
        or images.shape[1] != 3
        or min(images.shape[2:]) < INCEPTION_MIN_SIZE
        or (size is not None and tuple(images.shape[2:]) != (size, size))
    ):
        side = "H, W" if size is None else f"{size}, {size}"
        raise ValueError(
            f"InceptionResnetV1 expects images of shape [B, 3, {side}] with sides >= {INCEPTION_MIN_SIZE}, "
            f"got {list(images.shape)}"
        )


def build_inception_resnet_v1(
    in_channels: int = 3,
    image_size: Optional[int] = None,
    dropout_prob: float = 0.6,
    weights_path: Optional[str] = None,
    pretrained: Optional[str] = None,
) -> nn.Module:
    """facenet-pytorch's ``InceptionResnetV1(classify=False)``: L2-normalised 512-d embeddings, ``num_features=512``.

    Built from scratch; ``weights_path`` loads a local state dict (e.g. facenet's ``20180402-114759-vggface2.pt``;
    its ``logits.*`` classifier entries are dropped). ``pretrained="vggface2"``/``"casia-webface"`` would download at
    construction and is refused. Only 3-channel inputs; ``image_size`` (optional) must be >= 75.
    """
    for value in (pretrained, weights_path):
        if isinstance(value, str) and value in FACENET_DOWNLOADS and not os.path.isfile(value):
            raise ValueError(
                f"inception_resnet_v1: {value!r} would make facenet-pytorch download weights, which this project "
                "never does; download the state-dict file yourself and pass weights_path='/path/to/file.pt'"
            )
    if pretrained is not None:
        raise ValueError(f"inception_resnet_v1: pretrained={pretrained!r} is not supported; pass weights_path")
    if in_channels != 3:
        raise ValueError(f"inception_resnet_v1 takes 3-channel (RGB) images only; got in_channels={in_channels!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < INCEPTION_MIN_SIZE):
        raise ValueError(
            f"inception_resnet_v1 needs image_size >= {INCEPTION_MIN_SIZE} (e.g. 160, as FaceNet); got {image_size!r}"
        )
    try:
        from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1
    except ImportError as err:
        raise ImportError(
            f"backbone 'inception_resnet_v1' needs facenet-pytorch: {FACENET_INSTALL} (no-deps: it pins old "
            "torch versions)"
        ) from err
    model = InceptionResnetV1(pretrained=None, classify=False, dropout_prob=dropout_prob)
    model.num_features = 512
    model.image_size = image_size
    model.in_channels = 3
    model.register_forward_pre_hook(_check_inception_input)
    if weights_path is not None:
        state = _load_state_dict(weights_path, "inception_resnet_v1")
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")})
    return model


# -- torchvision and timm -----------------------------------------------------------------------------------------
def _replace(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _adapt_first_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    for qualified, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            break
    else:
        raise ValueError(f"found no 3-channel first convolution to adapt to in_channels={in_channels}")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        if pretrained:  # as timm's adapt_input_conv: sum RGB for one channel, else tile RGB and rescale
            weight = conv.weight
            if in_channels == 1:
                new.weight.copy_(weight.sum(dim=1, keepdim=True))
            else:
                tiled = weight.repeat(1, math.ceil(in_channels / 3), 1, 1)[:, :in_channels]
                new.weight.copy_(tiled * (3 / in_channels))
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None and pretrained:
            new.bias.copy_(conv.bias)
        elif conv.bias is not None:
            new.bias.zero_()
    _replace(model, qualified, new)


def _build_torchvision(
    model_name: str,
    in_channels: int = 3,
    weights: Any = None,
    weights_path: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    try:
        import torchvision
    except ImportError as err:  # pragma: no cover - torchvision is a dependency
        raise ImportError("'torchvision:' backbones need torchvision: pip install torchvision") from err
    if weights is not None and weights_path is None:
        raise ValueError(
            f"torchvision:{model_name}: weights={weights!r} would download weights, which this project never does; "
            "download the state-dict file yourself and pass weights_path='/path/to/file.pth' (weights=None)"
        )
    available = torchvision.models.list_models(module=torchvision.models)
    if model_name not in available:
        close = difflib.get_close_matches(model_name, available, n=5, cutoff=0.5)
        raise ValueError(
            f"unknown torchvision model {model_name!r}"
            + (f"; did you mean {close}?" if close else "; see torchvision.models.list_models()")
        )
    if model_name in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    try:
        model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    except TypeError as err:
        raise TypeError(f"torchvision:{model_name} rejected the arguments {sorted(kwargs)}: {err}") from err
    if weights_path is not None:
        model.load_state_dict(_load_state_dict(weights_path, f"torchvision:{model_name}"))
    heads = [qualified for qualified, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise ValueError(f"torchvision:{model_name} has no nn.Linear classifier to remove; wrap it yourself")
    head = model.get_submodule(heads[-1])
    _replace(model, heads[-1], nn.Identity())
    model.num_features = head.in_features
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, pretrained=weights_path is not None)
    return model


def _build_timm(model_name: str, in_channels: int = 3, weights_path: Optional[str] = None, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"backbone 'timm:{model_name}' needs timm: pip install timm") from err
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"timm:{model_name}: pretrained=True would download weights, which this project never does; download "
            "the state-dict file yourself and pass weights_path='/path/to/file'"
        )
    for reserved in ("num_classes", "in_chans"):
        if reserved in kwargs:
            raise TypeError(
                f"timm:{model_name}: {reserved} is set by the registry (num_classes=0, in_chans=in_channels)"
            )
    model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs)
    if weights_path is not None:
        own = model.state_dict()
        state = _load_state_dict(weights_path, f"timm:{model_name}")
        model.load_state_dict({k: v for k, v in state.items() if k in own})  # drops the classifier entries
    return model


# -- the registered names -----------------------------------------------------------------------------------------
VIT_FACE = dict(image_size=112, patch_size=8, in_channels=3, embed_dim=512, depth=6, num_heads=8, mlp_ratio=4.0,
                stem="patch")
VIT_FACE_SMALL = dict(image_size=None, patch_size=None, in_channels=3, embed_dim=128, depth=4, num_heads=4,
                      mlp_ratio=2.0, stem="conv")
IRESNET_PRESETS = {
    "iresnet18": dict(layers=(2, 2, 2, 2)),
    "iresnet34": dict(layers=(3, 4, 6, 3)),
    "iresnet50": dict(layers=(3, 4, 14, 3)),
    "iresnet100": dict(layers=(3, 13, 30, 3)),
    "iresnet_small": dict(layers=(1, 1, 1), widths=(32, 64, 128), image_size=32, embed_dim=128),
}

register_backbone("vit", VisionTransformer)
register_backbone("vit_face", functools.partial(VisionTransformer, **VIT_FACE), "face")
register_backbone("vit_face_small", functools.partial(VisionTransformer, **VIT_FACE_SMALL), "face")
for _name, _preset in IRESNET_PRESETS.items():
    register_backbone(_name, functools.partial(IResNet, **_preset), "face")
register_backbone("iresnet", IResNet, "face")
register_backbone("inception_resnet_v1", build_inception_resnet_v1, "face")

__all__ = [
    "BACKBONES", "INCEPTION_MIN_SIZE", "PREFIXES", "backbone_names", "backbone_parameters", "build_backbone",
    "build_inception_resnet_v1", "register_backbone",
]
