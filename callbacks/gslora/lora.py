"""LoRA adapters for GS-LoRA: find the FFN Linear layers, wrap them, group them, merge them.

Why a hand-written wrapper and not peft
---------------------------------------
GS-LoRA keeps exactly one live adapter: each task trains a fresh LoRA group, merges it into the frozen weights
(``W += s * B @ A``) and re-initialises it for the next task. With that life cycle a small wrapper is simpler and
safer than peft:

* the parameter layout never changes across tasks (``<layer>.base_layer.weight``, ``<layer>.lora_A``,
  ``<layer>.lora_B``), so a checkpoint taken in any task restores into the structure that ``setup`` builds;
  peft would add one adapter name per task, or need its internal ``merged_adapters`` bookkeeping reset by hand;
* merging is an explicit in-place call (:meth:`LoRALinear.merge_`), never a side effect of ``.eval()`` (the
  merge-on-eval of loralib, used by the reference code, caused its EMA bug), and peft's ``merge_and_unload``
  returns a new module that the LightningModule would have to re-attach;
* no ``requires_grad`` surprises: peft's ``set_adapter``/``inject_adapter`` have flipped the trainability of
  other adapters (peft issues #1374, #3487, #3580);
* the group tensors are plain attributes, so the group-lasso term needs no name lookups.

The numerics are peft's (and loralib's) LoRA with ``lora_alpha=1, r=8, lora_dropout=0``: scaling ``alpha / r``
= 1/8, ``A`` kaiming-uniform with ``a = sqrt(5)``, ``B`` zero. The test suite checks forward, merge and init
against peft's ``LoraConfig`` layer. The wrapper keeps the base layer as a child module and calls it, so a base
layer swapped later by a precision plugin (e.g. FP8) still works.

FP8 layers
----------
Besides ``nn.Linear``, the targets may be :class:`lightning_plugins.fp8.FP8Linear` layers (a model converted by
``convert_to_fp8`` or trained with ``precision="fp8-msamp"`` before forgetting). The base layer is frozen, so its
FP8 weight-gradient side channel is never used; its weight may be FP16 (the O2 master weights): the adapters stay
fp32 and :meth:`LoRALinear.merge_` adds the update in fp32 and rounds the sum once to the weight's own dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from lightning_plugins.fp8 import FP8Linear

#: The layer types GS-LoRA can adapt: both have ``weight [out, in]``, ``in_features``, ``out_features``, ``bias``.
ADAPTABLE_TYPES: tuple[type, ...] = (nn.Linear, FP8Linear)

#: Default target patterns, full-matched against module names (as in peft). The named group ``block`` is the
#: Transformer block a layer belongs to; all LoRA tensors of a block form one GS-LoRA group.
DEFAULT_TARGETS: tuple[str, ...] = (
    # this project's ViT and timm ViTs (blocks.N.mlp.fc1/fc2); Hugging Face ViT in transformers >= 5
    # (vit.layers.N.mlp.fc1/fc2)
    r"(?P<block>(?:.*\.)?(?:blocks|layers)\.\d+)\.mlp\.fc[12]",
    # torchvision ViT: encoder.layers.encoder_layer_N.mlp.0 / mlp.3
    r"(?P<block>(?:.*\.)?encoder_layer_\d+)\.mlp\.[03]",
    # Hugging Face BERT / RoBERTa, and ViT before transformers 5: encoder.layer.N.intermediate.dense and
    # encoder.layer.N.output.dense (not attention.output.dense)
    r"(?P<block>(?:.*\.)?layer\.\d+)\.(?:intermediate|output)\.dense",
    # Hugging Face Llama / Mistral / Qwen: model.layers.N.mlp.gate_proj / up_proj / down_proj
    r"(?P<block>(?:.*\.)?layers\.\d+)\.mlp\.(?:gate|up|down)_proj",
    # the paper's Face Transformer: transformer.layers.N.1.fn.fn.net.0 / net.3
    r"(?P<block>(?:.*\.)?layers\.\d+)\.1\.fn\.fn\.net\.[03]",
)

GROUPINGS = ("block", "layer", "matrix")


class LoRALinear(nn.Module):
    """A Linear layer plus a low-rank update: ``y = base_layer(x) + scaling * x A^T B^T``.

    Args:
        base_layer: the wrapped layer; must expose ``weight [out, in]`` (``nn.Linear``, a subclass, or
            :class:`lightning_plugins.fp8.FP8Linear`).
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; ``scaling = alpha / rank`` (1/8 with the defaults, as in the paper).

    ``lora_A`` is ``[r, in]`` and ``lora_B`` is ``[out, r]``; they are kept in float32 when the base layer is in
    half precision. Nothing happens on ``.eval()``: call :meth:`merge_` to fold the update into the base weight.
    """

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 1.0) -> None:
        super().__init__()
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise TypeError(
                f"LoRALinear wraps layers with a 2-D weight [out, in] (nn.Linear); got {type(base_layer).__name__}"
            )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        out_features, in_features = weight.shape
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=dtype))
        self.reset_lora()

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (without the pending LoRA update)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (self.scaling * update).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The pending update ``scaling * B @ A`` with the base weight's shape ``[out, in]``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def reset_lora(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh adapter: ``A`` kaiming-uniform (``a = sqrt(5)``), ``B = 0``, so the update is zero.

        ``generator`` (a CPU generator) makes the draw independent of the global RNG.
        """
        fresh = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(fresh)
        self.lora_B.zero_()

    @torch.no_grad()
    def merge_(self, generator: Optional[torch.Generator] = None) -> None:
        """Fold the update into the base weight (``W += scaling * B @ A``) and start a fresh adapter.

        The sum is formed in at least fp32 and rounded once to the weight's dtype (an FP16 master weight of an
        FP8 layer gets ``fp16(W + dW)``, not ``W + fp16(dW)``); the weight tensor is updated in place, so the
        parameter object (and whatever holds it: an optimizer, an FP8 layer) stays the same.
        """
        weight = self.base_layer.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        delta = self.delta_weight().to(device=weight.device, dtype=compute)
        if weight.dtype == compute:
            weight.add_(delta)
        else:
            weight.copy_((weight.to(compute) + delta).to(weight.dtype))
        self.reset_lora(generator)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


@dataclass(frozen=True)
class TargetLayer:
    """A layer chosen for LoRA: its module name and the GS-LoRA group (block) it belongs to."""

    name: str
    block: str


def compile_targets(target: Union[str, Sequence[str], None]) -> tuple[re.Pattern, ...]:
    """Compile the target pattern(s); ``None`` gives :data:`DEFAULT_TARGETS`."""
    patterns = DEFAULT_TARGETS if target is None else ((target,) if isinstance(target, str) else tuple(target))
    if not patterns:
        raise ValueError("target must be a regex or a non-empty list of regexes matching Linear layer names")
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"every target pattern must be a non-empty string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"target pattern {pattern!r} is not a valid regex: {err}") from err
    return tuple(compiled)


def find_target_layers(module: nn.Module, target: Union[str, Sequence[str], None] = None) -> list[TargetLayer]:
    """The Linear layers whose names fully match a target pattern, in module order, with their block.

    Linear layers are ``nn.Linear`` and :class:`lightning_plugins.fp8.FP8Linear` (:data:`ADAPTABLE_TYPES`). The
    block is the pattern's named group ``block`` if it has one, else its first group, else the layer's own name
    (then every layer is its own group). Already wrapped layers (:class:`LoRALinear`) are found too.

    Raises:
        ValueError: no layer matches (the message lists Linear layer names found), or a match is not a Linear.
    """
    patterns = compile_targets(target)
    found: list[TargetLayer] = []
    for name, sub in module.named_modules():
        if not name:
            continue
        for pattern in patterns:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            if not isinstance(sub, (*ADAPTABLE_TYPES, LoRALinear)):
                raise ValueError(
                    f"target pattern {pattern.pattern!r} matches {name!r}, a {type(sub).__name__}; GS-LoRA adapts "
                    f"nn.Linear layers only (and FP8Linear, their FP8 form). {_narrowing_advice(pattern, name, sub)}"
                )
            found.append(TargetLayer(name, _block_of(match, name)))
            break
    if not found:
        linear = [n for n, m in module.named_modules() if isinstance(m, ADAPTABLE_TYPES)]
        named = linear or [n for n, _ in module.named_modules() if n]
        kind = "Linear layers" if linear else "modules (no nn.Linear or FP8Linear at all)"
        examples = ", ".join(repr(n) for n in named[:8]) + (", ..." if len(named) > 8 else "")
        raise ValueError(
            f"no Linear layer of {type(module).__name__} fully matches the target pattern(s) "
            f"{[p.pattern for p in patterns]}. Its {kind} ({len(named)}): {examples or 'none'}. Pass "
            "target=<regex> matching the FFN layers of each Transformer block, with a named group 'block' for "
            r"the block, e.g. r'(?P<block>.*blocks\.\d+)\.mlp\.fc[12]'"
        )
    return found


def _narrowing_advice(pattern: re.Pattern, name: str, sub: nn.Module) -> str:
    """What to do when a target pattern matches a module GS-LoRA cannot wrap: name the Linear layers inside it."""
    inner = [n for n, m in sub.named_modules() if n and isinstance(m, ADAPTABLE_TYPES)]
    if inner:
        examples = ", ".join(repr(f"{name}.{n}") for n in inner[:4]) + (", ..." if len(inner) > 4 else "")
        suffix = "|".join(re.escape(n) for n in dict.fromkeys(inner))
        head = f"(?:{pattern.pattern})" if "|" in pattern.pattern else pattern.pattern
        return (f"Narrow the pattern to the Linear layers inside it ({len(inner)}: {examples}), e.g. "
                f"target=r'{head}\\.(?:{suffix})'")
    return ("It holds no Linear layer; narrow the pattern (target=<regex>) so that it matches only the FFN "
            "Linear layers of each Transformer block")


def _block_of(match: re.Match, name: str) -> str:
    if "block" in match.re.groupindex and match.group("block") is not None:
        return match.group("block")
    if match.re.groups and match.group(1) is not None:
        return match.group(1)
    return name


def inject_lora(
    module: nn.Module,
    target: Union[str, Sequence[str], None] = None,
    rank: int = 8,
    alpha: float = 1.0,
) -> dict[str, LoRALinear]:
    """Wrap every target Linear layer of ``module`` in place with :class:`LoRALinear`; idempotent.

    Layers already wrapped are kept (their rank must match). Returns ``{layer name: adapter}`` in module order.
    """
    adapters: dict[str, LoRALinear] = {}
    for layer in find_target_layers(module, target):
        current = module.get_submodule(layer.name)
        if isinstance(current, LoRALinear):
            if current.rank != rank or not math.isclose(current.alpha, alpha):
                raise ValueError(
                    f"{layer.name!r} already has a LoRA adapter of rank {current.rank}, alpha {current.alpha}; "
                    f"asked for rank {rank}, alpha {alpha}. Use the same rank/alpha or call remove_lora() first"
                )
            adapters[layer.name] = current
            continue
        adapter = LoRALinear(current, rank=rank, alpha=alpha)
        parent_name, _, child = layer.name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, adapter)
        adapters[layer.name] = adapter
    return adapters


def find_lora(module: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` layers of ``module`` by name."""
    return {name: sub for name, sub in module.named_modules() if isinstance(sub, LoRALinear)}


def remove_lora(module: nn.Module, merge: bool = True) -> int:
    """Replace every :class:`LoRALinear` by its base layer (merging the pending update first when ``merge``).

    Afterwards the module has its original structure and state-dict keys. Returns the number of layers unwrapped.
    """
    count = 0
    for name, adapter in list(find_lora(module).items()):
        if merge:
            adapter.merge_()
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, adapter.base_layer)
        count += 1
    return count


def group_lora_parameters(
    adapters: dict[str, LoRALinear], layers: Iterable[TargetLayer], grouping: str = "block"
) -> dict[str, list[nn.Parameter]]:
    """The GS-LoRA groups: ``{group name: [LoRA tensors]}`` in module order.

    ``grouping``: ``"block"`` (the paper's default: all A/B of one Transformer block), ``"layer"`` (the A/B pair
    of each adapted layer) or ``"matrix"`` (each A and each B alone).
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    groups: dict[str, list[nn.Parameter]] = {}
    for layer in layers:
        adapter = adapters[layer.name]
        if grouping == "block":
            groups.setdefault(layer.block, []).extend([adapter.lora_A, adapter.lora_B])
        elif grouping == "layer":
            groups[layer.name] = [adapter.lora_A, adapter.lora_B]
        else:
            groups[f"{layer.name}.lora_A"] = [adapter.lora_A]
            groups[f"{layer.name}.lora_B"] = [adapter.lora_B]
    return groups


def group_layers(
    adapters: dict[str, LoRALinear], layers: Iterable[TargetLayer], grouping: str = "block"
) -> dict[str, list[LoRALinear]]:
    """The adapted layers of each group (for the weight-update norms), keyed like :func:`group_lora_parameters`."""
    out: dict[str, list[LoRALinear]] = {}
    for layer in layers:
        adapter = adapters[layer.name]
        if grouping == "block":
            out.setdefault(layer.block, []).append(adapter)
        elif grouping == "layer":
            out[layer.name] = [adapter]
        else:
            out[f"{layer.name}.lora_A"] = [adapter]
            out[f"{layer.name}.lora_B"] = [adapter]
    return out
