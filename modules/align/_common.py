"""Pieces shared by the alignment modules: model/tokenizer resolution, LoRA, dropout, optimizer, argument checks.

Internal to ``lightning_plugins.modules.align``; the public names live in ``sft``, ``reward_model`` and ``dpo``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "apply_lora",
    "attached_trainer",
    "export_pretrained",
    "base_model",
    "check_float",
    "check_int",
    "configure_adamw",
    "disable_dropout",
    "enable_gradient_checkpointing",
    "first_argmax",
    "hparams_to_ignore",
    "is_finite_number",
    "resolve_causal_lm",
    "resolve_encoder",
    "resolve_tokenizer",
]


def is_finite_number(value: object) -> bool:
    """A real number (bool excluded) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int >= ``low`` (bool excluded); TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {low}, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}.")
    return value


def check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``); TypeError when not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}.")
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"`{name}` must lie in {interval}, got {value}.")
    return float(value)


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one among ties."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def resolve_tokenizer(tokenizer: Any):
    """A tokenizer object as is, or a spec string loaded with ``loading.load_tokenizer``."""
    if isinstance(tokenizer, str):
        from lightning_plugins.modules.align.loading import load_tokenizer

        return load_tokenizer(tokenizer)
    if tokenizer is None or not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise TypeError(
            f"tokenizer must be a spec string ('char', a local folder, a .gguf file or an alias) or a Hugging Face "
            f"tokenizer, got {type(tokenizer).__name__}."
        )
    return tokenizer


def _check_model_spec(model: Any, owner: str) -> None:
    if not isinstance(model, (str, dict, nn.Module)):
        raise TypeError(
            f"{owner}: `model` must be a spec (a config dict, a local folder, a .gguf file or an alias) or an "
            f"nn.Module, got {type(model).__name__}."
        )


def resolve_causal_lm(model: Any, tokenizer: Any, owner: str) -> nn.Module:
    """An ``nn.Module`` as is, or a causal LM loaded from a spec with ``load_causal_lm(spec, tokenizer)``."""
    _check_model_spec(model, owner)
    if isinstance(model, nn.Module):
        return model
    from lightning_plugins.modules.align.loading import load_causal_lm

    return load_causal_lm(model, tokenizer=tokenizer)


def resolve_encoder(model: Any, tokenizer: Any, owner: str) -> nn.Module:
    """An ``nn.Module`` as is, or an encoder body loaded from a spec with ``load_encoder(spec, tokenizer)``."""
    _check_model_spec(model, owner)
    if isinstance(model, nn.Module):
        return model
    from lightning_plugins.modules.align.loading import load_encoder

    return load_encoder(model, tokenizer=tokenizer)


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face model with a head (``LlamaForCausalLM.model``); the model itself
    when it already is a body."""
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) else model


def apply_lora(model: nn.Module, lora: dict[str, Any] | None, task_type: str | None = None) -> nn.Module:
    """Wrap ``model`` with fresh peft LoRA adapters built from ``LoraConfig(**lora)``; ``None`` returns it unchanged.

    Only the adapters are trainable afterwards (peft freezes the rest).
    """
    if lora is None:
        return model
    if not isinstance(lora, dict):
        raise TypeError(
            f"`lora` must be a dict of peft LoraConfig arguments, e.g. {{'r': 8, 'lora_alpha': 16, "
            f"'target_modules': ['q_proj', 'v_proj']}}, or None; got {type(lora).__name__}."
        )
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a declared dependency of the alignment extra
        raise ImportError("`lora=` needs the `peft` package: pip install peft") from err
    kwargs = dict(lora)
    if task_type is not None:
        kwargs.setdefault("task_type", task_type)
    try:
        config = LoraConfig(**kwargs)
    except TypeError as err:
        raise ValueError(f"`lora` has an argument that peft's LoraConfig does not accept: {err}.") from None
    return get_peft_model(model, config)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: ``nn.Dropout`` modules (LoRA dropout included) and the float
    ``attention_dropout`` attributes Hugging Face attention layers read in their functional attention call."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a Hugging Face model (works with frozen inputs and LoRA)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(
            f"gradient_checkpointing=True needs a Hugging Face model with `gradient_checkpointing_enable`, got "
            f"{type(model).__name__}; set gradient_checkpointing=False."
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False


def hparams_to_ignore(**values: Any) -> list[str]:
    """Names of constructor arguments that are objects (models, tokenizers), kept out of ``save_hyperparameters``."""
    return [name for name, value in values.items() if not isinstance(value, (str, dict, list, tuple, int, float,
                                                                             bool, type(None)))]


def attached_trainer(module: nn.Module):
    """The module's Trainer, or None when it runs without one (a step called by hand in a test)."""
    return getattr(module, "_trainer", None)


def check_optimizer_args(lr: float, weight_decay: float, warmup_steps: int, betas: tuple[float, float]) -> None:
    """Validate the optimizer arguments shared by the modules at construction time."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
    if len(tuple(betas)) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}.")


def configure_adamw(module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    warmup_steps: int) -> Any:
    """AdamW over the trainable parameters only (no weight decay on biases and norm weights, as Hugging Face's
    Trainer does), plus a linear warm-up ``LambdaLR`` stepping per optimizer step when ``warmup_steps > 0``
    (the LR is then constant)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameters; check `lora` and the frozen layers.")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if warmup_steps <= 0:
        return optimizer
    scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def export_pretrained(model: nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """Write ``model`` (LoRA adapters merged into a copy) and ``tokenizer`` as a Hugging Face folder.

    The folder is what every stage's ``model:`` accepts, so a stage's output is the next stage's input. Weights are
    written in fp32 whatever the training precision kept (e.g. FP16 masters under ``fp8-msamp`` O2).
    """
    path = Path(path)
    export = model
    if hasattr(model, "merge_and_unload"):  # a peft model: merge a copy, keep training state untouched
        export = copy.deepcopy(model).merge_and_unload()
    save = getattr(export, "save_pretrained", None)
    if save is None:
        raise TypeError(f"export_dir needs a Hugging Face model with `save_pretrained`, got {type(export).__name__}.")
    state = {name: tensor.detach().to("cpu", torch.float32) if tensor.is_floating_point() else tensor.detach().cpu()
             for name, tensor in export.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    save(path, state_dict=state)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
    return path
