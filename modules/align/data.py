"""jsonl readers, pre-tokenized SFT/preference datasets and their LightningDataModules.

Row formats (one JSON object per line; blank lines are skipped):

- SFT: ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``;
- preference: ``{"prompt": str, "chosen": str, "rejected": str, "margin"?: float}``;
- prompts: ``{"prompt": str, ...}``; multi-response: ``{"prompt", "responses", "scores", "best", "best_score"}``.

Rows are rendered with a chat template (``prompt``/``completion`` become a user and an assistant message) and
tokenized span by span (see :mod:`.templates`), so the prompt ids are an exact prefix and EOS is an id.

Truncation policy (``max_length`` counts prompt + completion tokens, BOS and EOS included): a row whose prompt alone
leaves no room for a completion token is dropped (``"prompt_too_long"``); otherwise the sequence is cut at the end
(``keep_start``), which may cut the completion and its EOS. Preference pairs apply the same rule to the chosen and the
rejected sequence independently, and a pair is dropped when either side keeps no completion token. Drops are counted
per reason in ``dataset.dropped`` and logged once per file; a file whose rows are all dropped is an error.

``shuffle=False`` keeps file order on one device. Under DDP, Lightning's injected ``DistributedSampler`` shuffles the
training data whatever the DataModule says (pass ``Trainer(use_distributed_sampler=False)`` and shard yourself to keep
an order); the SFT token normalization is exact either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from lightning_plugins.modules.align._common import is_finite_number as _is_number
from lightning_plugins.modules.align.collate import PreferenceCollator, SFTCollator, WindowedBatchSampler
from lightning_plugins.modules.align.loading import load_tokenizer
from lightning_plugins.modules.align.templates import ROLES, ChatTemplate, get_template

__all__ = ["PreferenceDataModule", "PreferenceDataset", "SFTDataModule", "SFTDataset", "read_jsonl", "row_messages"]

log = logging.getLogger(__name__)

_FORMATS = {
    "sft": 'one of {"prompt": str, "completion": str} or {"messages": [{"role": ..., "content": ...}, ...]}',
    "preference": '{"prompt": str, "chosen": str, "rejected": str, "margin"?: float}',
    "prompts": '{"prompt": str}',
    "multi": '{"prompt": str, "responses": [str, ...], "scores": [float, ...], "best"?: str, "best_score"?: float}',
}
_DROP_REASONS = {
    "prompt_too_long": "the prompt alone leaves no room for a completion token",
    "empty_completion": "no completion token left after truncation",
}


def _fail(where: str, kind: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}. Expected a {kind} row: {_FORMATS[kind]}.")


def _check_str(row: dict, key: str, where: str, kind: str, nonempty: bool = False) -> None:
    if key not in row:
        _fail(where, kind, f"missing key {key!r}; add it")
    if not isinstance(row[key], str):
        _fail(where, kind, f"key {key!r} must be a string, got {type(row[key]).__name__}; quote the value")
    if nonempty and not row[key].strip():
        _fail(where, kind, f"key {key!r} is empty; remove the row or give it a non-empty {key}")


def _validate(row: Any, where: str, kind: str) -> None:
    if not isinstance(row, dict):
        _fail(where, kind, f"the line is a JSON {type(row).__name__}, not an object")
    if kind == "sft" and "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            _fail(where, kind, "key 'messages' must be a non-empty list of {'role', 'content'} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                _fail(where, kind, f"messages[{i}] must be an object with 'role' in {ROLES} and a string 'content'")
            if m["role"] == "system" and i:
                _fail(where, kind, f"messages[{i}] is a system message; only the first message may be one")
        answers = [m for m in msgs if m["role"] == "assistant"]
        if not answers or any(not m["content"].strip() for m in answers):
            _fail(where, kind, "'messages' needs at least one assistant message and no empty assistant content")
        return
    _check_str(row, "prompt", where, kind)
    if kind == "sft":
        _check_str(row, "completion", where, kind, nonempty=True)
    elif kind == "preference":
        _check_str(row, "chosen", where, kind, nonempty=True)
        _check_str(row, "rejected", where, kind, nonempty=True)
        if "margin" in row and not _is_number(row["margin"]):
            _fail(where, kind, f"key 'margin' must be a finite number, got {row['margin']!r}")
    elif kind == "multi":
        for key in ("responses", "scores"):
            if not isinstance(row.get(key), list) or not row[key]:
                _fail(where, kind, f"key {key!r} must be a non-empty list")
        if not all(isinstance(r, str) for r in row["responses"]):
            _fail(where, kind, "every item of 'responses' must be a string")
        if not all(_is_number(s) for s in row["scores"]) or len(row["scores"]) != len(row["responses"]):
            _fail(where, kind, "'scores' must be finite numbers, one per response")


def read_jsonl(path: str | Path, kind: str = "sft") -> list[dict]:
    """Read and validate a jsonl file of ``kind`` ("sft", "preference", "prompts", "multi").

    Raises FileNotFoundError for a missing file and ValueError naming ``file:line``, the key and the fix for a bad
    row, or for a file without rows.
    """
    if kind not in _FORMATS:
        raise ValueError(f"Unknown jsonl kind {kind!r}; use one of {sorted(_FORMATS)}.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"jsonl file {path} does not exist.")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line must be one "
                                 f"JSON object like {_FORMATS[kind]}.") from None
            _validate(row, where, kind)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows; write one JSON object per line: {_FORMATS[kind]}.")
    return rows


def row_messages(row: dict, completion_key: str = "completion") -> list[dict]:
    """A row as chat messages: its ``messages``, or ``[user prompt, assistant row[completion_key]]``."""
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[completion_key]}]


def _truncate(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int]] | str:
    """Apply the truncation policy; returns the kept (ids, mask) or a drop reason."""
    if 1 not in mask or mask.index(1) >= max_length:
        return "prompt_too_long"
    ids, mask = ids[:max_length], mask[:max_length]
    mask = [0] + mask[1:]  # the first token has no prediction: never a target
    return (ids, mask) if any(mask) else "empty_completion"


class _TokenizedDataset(Dataset):
    def _report(self, total: int, max_length: int) -> None:
        for reason, n in self.dropped.items():
            log.warning("%s: dropped %d of %d rows (%s: %s); raise max_length (now %d) to keep them.",
                        self.source, n, total, reason, _DROP_REASONS[reason], max_length)
        if not self.examples:
            raise ValueError(f"{self.source}: all {total} rows were dropped ({self.dropped}); raise max_length "
                             f"(now {max_length}) so that prompts leave room for completions.")

    def __len__(self) -> int:
        return len(self.examples)


class SFTDataset(_TokenizedDataset):
    """Pre-tokenized SFT rows ``{"input_ids", "loss_mask"}``; truncation policy in the module docstring.

    ``num_target_tokens[i]`` is the number of counted targets of row ``i`` (loss-mask ones after position 0).
    ``__getitem__`` also accepts a :class:`~.collate.WindowedIndex` and then adds its ``window_tokens``.
    """

    def __init__(self, rows: list[dict], tokenizer, template: str | ChatTemplate = "vicuna_v1.1",
                 max_length: int = 512, source: str = "<rows>") -> None:
        self.template, self.source, self.max_length = get_template(template), source, max_length
        self.examples: list[dict] = []
        self.dropped: dict[str, int] = {}
        for row in rows:
            kept = _truncate(*self.template.encode(tokenizer, row_messages(row)), max_length)
            if isinstance(kept, str):
                self.dropped[kept] = self.dropped.get(kept, 0) + 1
            else:
                self.examples.append({"input_ids": kept[0], "loss_mask": kept[1]})
        self.num_target_tokens = [sum(e["loss_mask"]) for e in self.examples]
        self._report(len(rows), max_length)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, template: str | ChatTemplate = "vicuna_v1.1",
                   max_length: int = 512) -> SFTDataset:
        return cls(read_jsonl(path, "sft"), tokenizer, template, max_length, source=str(path))

    def __getitem__(self, idx) -> dict:
        if isinstance(idx, tuple):
            return {**self.examples[idx[0]], "window_tokens": idx[1]}
        return self.examples[idx]


class PreferenceDataset(_TokenizedDataset):
    """Pre-tokenized preference pairs ``{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "margin",
    "pair_index"}``; the same truncation rule applies to both sides (see the module docstring)."""

    def __init__(self, rows: list[dict], tokenizer, template: str | ChatTemplate = "vicuna_v1.1",
                 max_length: int = 512, source: str = "<rows>") -> None:
        self.template, self.source, self.max_length = get_template(template), source, max_length
        self.examples: list[dict] = []
        self.dropped: dict[str, int] = {}
        for row in rows:
            sides = [_truncate(*self.template.encode(tokenizer, row_messages(row, key)), max_length)
                     for key in ("chosen", "rejected")]
            reason = next((s for s in sides if isinstance(s, str)), None)
            if reason:
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
                continue
            (c_ids, c_mask), (r_ids, r_mask) = sides
            self.examples.append({
                "chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask,
                "margin": float(row.get("margin", 0.0)), "pair_index": len(self.examples),
            })
        self.ref_logps: tuple[list[float], list[float]] | None = None
        self._tokenizer_digest = _tokenizer_digest(tokenizer)
        self._report(len(rows), max_length)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, template: str | ChatTemplate = "vicuna_v1.1",
                   max_length: int = 512) -> PreferenceDataset:
        return cls(read_jsonl(path, "preference"), tokenizer, template, max_length, source=str(path))

    def __getitem__(self, idx: int) -> dict:
        item = self.examples[idx]
        if self.ref_logps is None:
            return item
        return {**item, "ref_chosen_logps": self.ref_logps[0][idx], "ref_rejected_logps": self.ref_logps[1][idx]}

    def attach_reference_logps(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Store per-pair reference log-probs (``(N,)`` each, indexed by ``pair_index``)."""
        for name, t in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(t, torch.Tensor) or t.shape != (len(self),):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{self.source}: reference {name} log-probs must be a tensor of shape ({len(self)},), "
                                 f"one per pair, got {shape}.")
            if not torch.isfinite(t).all():
                raise ValueError(f"{self.source}: reference {name} log-probs contain non-finite values.")
        self.ref_logps = (chosen.detach().double().cpu().tolist(), rejected.detach().double().cpu().tolist())

    def fingerprint(self) -> str:
        """sha256 over the tokenized pairs, ``max_length`` and the tokenizer's vocabulary and special tokens."""
        h = hashlib.sha256(f"pref-v1|{self.max_length}|{self._tokenizer_digest}".encode())
        for e in self.examples:
            for key in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
                h.update(key.encode() + torch.tensor(e[key], dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return hashlib.sha256(json.dumps([vocab, specials]).encode()).hexdigest()


class _AlignDataModule(LightningDataModule):
    _dataset_cls: type

    def __init__(self, tokenizer: str, train_path: str, val_path: str | None, template: str, max_length: int,
                 batch_size: int, num_workers: int, shuffle: bool, seed: int) -> None:
        super().__init__()
        for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        for name, path in (("train_path", train_path), ("val_path", val_path)):
            if path is not None and not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"{name}={path!r} does not exist; pass a jsonl file.")
        get_template(template)  # fail fast on a bad template name
        self.tokenizer_spec, self.template = tokenizer, template
        self.paths = {"train": train_path, "val": val_path}
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.shuffle, self.seed = shuffle, seed
        self._tokenizer = None
        self._datasets: dict[str, Dataset] = {}

    @property
    def tokenizer(self):
        """The tokenizer (loaded once with :func:`~.loading.load_tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec)
            if self._tokenizer.pad_token_id is None:
                raise ValueError(f"Tokenizer {self.tokenizer_spec!r} has no pad token; set one.")
        return self._tokenizer

    def splits(self) -> list[str]:
        """The splits that have a file (``"train"``, and ``"val"`` when ``val_path`` is set)."""
        return [s for s, p in self.paths.items() if p is not None]

    def dataset(self, split: str):
        """The tokenized dataset of ``split`` (built on first use)."""
        if split not in self.splits():
            raise ValueError(f"Unknown or empty split {split!r}; this DataModule has {self.splits()}.")
        if split not in self._datasets:
            self._datasets[split] = self._dataset_cls.from_jsonl(
                self.paths[split], self.tokenizer, self.template, self.max_length)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        for split in self.splits():
            if split == "val" or stage in (None, "fit"):
                self.dataset(split)

    def _loader(self, split: str, collate, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, generator=generator, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        """Validation batches (no shuffle); an empty list when there is no ``val_path``."""
        return self._loader("val", self._collator(), False) if self.paths["val"] else []

    def _collator(self):
        raise NotImplementedError


class SFTDataModule(_AlignDataModule):
    """SFT jsonl files -> batches of contract 3 (``window_tokens`` per gradient-accumulation window in training,
    read from ``trainer.accumulate_grad_batches``). Truncation policy: see the module docstring."""

    _dataset_cls = SFTDataset

    def __init__(self, tokenizer: str = "char", *, train_path: str, val_path: str | None = None,
                 template: str = "vicuna_v1.1", max_length: int = 512, batch_size: int = 8, num_workers: int = 0,
                 shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(tokenizer, train_path, val_path, template, max_length, batch_size, num_workers, shuffle, seed)
        self.save_hyperparameters()

    def _collator(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        trainer = getattr(self, "trainer", None)
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        sampler = (RandomSampler(ds, generator=torch.Generator().manual_seed(self.seed)) if self.shuffle
                   else SequentialSampler(ds))
        batches = WindowedBatchSampler(sampler, self.batch_size, False, accumulate, ds.num_target_tokens)
        return DataLoader(ds, batch_sampler=batches, collate_fn=self._collator(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


class PreferenceDataModule(_AlignDataModule):
    """Preference jsonl files -> batches of contract 4, plus the reference-log-prob protocol of DPO's precompute
    mode (contract 5). Truncation and drop policy: see the module docstring."""

    _dataset_cls = PreferenceDataset

    def __init__(self, tokenizer: str = "char", *, train_path: str, val_path: str | None = None,
                 template: str = "vicuna_v1.1", max_length: int = 512, batch_size: int = 8, num_workers: int = 0,
                 shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(tokenizer, train_path, val_path, template, max_length, batch_size, num_workers, shuffle, seed)
        self.save_hyperparameters()

    def _collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self._collator(), self.shuffle)

    def reference_dataloader(self, split: str) -> DataLoader:
        """All pairs of ``split`` in order (no shuffle, no drop), batched as in training."""
        return self._loader(split, self._collator(), False)

    def fingerprint(self, split: str) -> str:
        """sha256 of the tokenized pairs of ``split``, ``max_length`` and the tokenizer (a reference-cache key)."""
        return self.dataset(split).fingerprint()

    def attach_reference_logps(self, split: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Make ``split``'s batches carry ``ref_chosen_logps``/``ref_rejected_logps`` (``(N,)`` by ``pair_index``).

        Loaders with persistent workers created before this call keep their old copy; create loaders after it.
        """
        self.dataset(split).attach_reference_logps(chosen, rejected)
