"""A verifiable synthetic alignment task: ``"a+b="`` -> ``str(a + b)`` (alignment.md §5.3).

:class:`ArithmeticTask` writes deterministic jsonl files for every stage: noisy SFT data (the correct answer with
probability ``p_correct_sft``, else a uniform wrong answer), preference pairs for the reward model on a held-out prompt
split, and the prompt list for rejection sampling. :class:`ArithmeticVerifier` measures a policy exactly: the expected
accuracy at temperature 1 (``p_correct``) and greedy accuracy. Both use the ``"plain"`` template (prompt then answer,
then EOS), usually with the ``"char"`` tokenizer.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from lightning_plugins.modules.align.collate import pad_right
from lightning_plugins.modules.align.templates import ChatTemplate, get_template
from lightning_plugins.modules.losses import sequence_logps

__all__ = ["ArithmeticTask", "ArithmeticVerifier", "gold_answer"]

_PROMPT = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")
_INTEGER = re.compile(r"[+-]?\d+")


def gold_answer(prompt: str) -> str:
    """``str(a + b)`` for a prompt ``"a+b="``; ValueError for anything else."""
    match = _PROMPT.fullmatch(prompt)
    if not match:
        raise ValueError(f"Not an arithmetic prompt: {prompt!r}; expected 'a+b=' with non-negative integers.")
    return str(int(match.group(1)) + int(match.group(2)))


class ArithmeticTask:
    """Prompts ``"a+b="`` for ``a, b in 0..max_operand`` (100 by default) and the jsonl files of every stage.

    Args:
        seed: makes every file deterministic.
        p_correct_sft: probability that an SFT row carries the correct answer (else a uniform wrong one).
        sft_rows_per_prompt / sft_val_rows_per_prompt: noisy SFT rows per prompt in ``sft_train`` / ``sft_val``
            (same prompts, independent noise).
        rm_pairs_per_prompt: (correct, wrong) pairs per prompt for the reward model, with distinct wrong answers.
        rm_split: how ``rm_val`` is held out. ``"pairs"`` (default): every prompt is in ``rm_train`` and ``rm_val``
            holds ``rm_val_pairs_per_prompt`` pairs per prompt whose wrong answers never appear in ``rm_train`` (the
            reward model must rank responses it has not seen; it scores all prompts in rejection sampling).
            ``"prompts"``: a fraction ``rm_val_fraction`` of the prompts is held out entirely (the harder test of
            learning addition itself, which a tiny reward model trained on 80 sums does not pass).
        rm_val_pairs_per_prompt: held-out pairs per prompt with ``rm_split="pairs"``.
        rm_val_fraction: fraction of prompts held out for ``rm_val`` with ``rm_split="prompts"``.
        max_operand: largest operand; wrong answers are drawn from ``0..2 * max_operand``.
    """

    def __init__(self, seed: int = 0, p_correct_sft: float = 0.4, sft_rows_per_prompt: int = 10,
                 sft_val_rows_per_prompt: int = 2, rm_pairs_per_prompt: int = 4, rm_split: str = "pairs",
                 rm_val_pairs_per_prompt: int = 2, rm_val_fraction: float = 0.2, max_operand: int = 9) -> None:
        if rm_split not in ("pairs", "prompts"):
            raise ValueError(f"rm_split must be 'pairs' or 'prompts', got {rm_split!r}.")
        if not 0.0 <= p_correct_sft <= 1.0:
            raise ValueError(f"p_correct_sft must be in [0, 1], got {p_correct_sft}.")
        if not 0.0 < rm_val_fraction < 1.0:
            raise ValueError(f"rm_val_fraction must be in (0, 1), got {rm_val_fraction}.")
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}.")
        for name, value in (("sft_rows_per_prompt", sft_rows_per_prompt), ("rm_pairs_per_prompt", rm_pairs_per_prompt),
                            ("sft_val_rows_per_prompt", sft_val_rows_per_prompt),
                            ("rm_val_pairs_per_prompt", rm_val_pairs_per_prompt)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        self.seed, self.p_correct_sft, self.max_operand = seed, p_correct_sft, max_operand
        self.sft_rows_per_prompt, self.sft_val_rows_per_prompt = sft_rows_per_prompt, sft_val_rows_per_prompt
        if rm_split == "pairs" and rm_pairs_per_prompt + rm_val_pairs_per_prompt > 2 * max_operand:
            raise ValueError(
                f"rm_pairs_per_prompt + rm_val_pairs_per_prompt = {rm_pairs_per_prompt + rm_val_pairs_per_prompt} "
                f"exceeds the {2 * max_operand} wrong answers of a prompt; lower one of them."
            )
        self.rm_split, self.rm_val_pairs_per_prompt = rm_split, rm_val_pairs_per_prompt
        self.rm_pairs_per_prompt = min(rm_pairs_per_prompt, 2 * max_operand)
        if rm_split == "pairs":
            self.rm_train_prompts = self.rm_val_prompts = self.prompts()
        else:
            shuffled = self.prompts()
            random.Random(f"{seed}|rm-split").shuffle(shuffled)
            n_val = max(1, round(rm_val_fraction * len(shuffled)))
            self.rm_val_prompts, self.rm_train_prompts = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])

    def prompts(self) -> list[str]:
        """All prompts, ``"0+0="`` ... ``"9+9="``."""
        n = self.max_operand + 1
        return [f"{a}+{b}=" for a in range(n) for b in range(n)]

    gold = staticmethod(gold_answer)

    def wrong_answers(self, prompt: str) -> list[str]:
        """Every wrong answer of ``prompt`` in ``0..2 * max_operand``."""
        gold = int(gold_answer(prompt))
        return [str(v) for v in range(2 * self.max_operand + 1) if v != gold]

    def _sft_rows(self, per_prompt: int, stream: str) -> list[dict]:
        rng = random.Random(f"{self.seed}|{stream}")
        rows = []
        for prompt in self.prompts():
            for _ in range(per_prompt):
                correct = rng.random() < self.p_correct_sft
                answer = gold_answer(prompt) if correct else rng.choice(self.wrong_answers(prompt))
                rows.append({"prompt": prompt, "completion": answer})
        return rows

    def _rm_rows(self, prompts: list[str], stream: str) -> list[dict]:
        if self.rm_split == "prompts":
            rng = random.Random(f"{self.seed}|{stream}")
            return [{"prompt": p, "chosen": gold_answer(p), "rejected": wrong}
                    for p in prompts for wrong in rng.sample(self.wrong_answers(p), self.rm_pairs_per_prompt)]
        # one shuffle of the wrong answers per prompt, shared by both splits: train takes the first ones, val the next
        rng = random.Random(f"{self.seed}|rm-pairs")
        rows: dict[str, list[dict]] = {"rm-train": [], "rm-val": []}
        for p in prompts:
            wrong = rng.sample(self.wrong_answers(p), self.rm_pairs_per_prompt + self.rm_val_pairs_per_prompt)
            for split, answers in (("rm-train", wrong[:self.rm_pairs_per_prompt]),
                                   ("rm-val", wrong[self.rm_pairs_per_prompt:])):
                rows[split] += [{"prompt": p, "chosen": gold_answer(p), "rejected": a} for a in answers]
        return rows[stream]

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``sft_train``, ``sft_val``, ``rm_train``, ``rm_val`` and ``prompts`` (``.jsonl``) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "sft_train": self._sft_rows(self.sft_rows_per_prompt, "sft-train"),
            "sft_val": self._sft_rows(self.sft_val_rows_per_prompt, "sft-val"),
            "rm_train": self._rm_rows(self.rm_train_prompts, "rm-train"),
            "rm_val": self._rm_rows(self.rm_val_prompts, "rm-val"),
            "prompts": [{"prompt": p} for p in self.prompts()],
        }
        paths = {}
        for name, rows in files.items():
            paths[name] = folder / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
        return paths


class ArithmeticVerifier:
    """Ground-truth metrics of a policy on arithmetic prompts (contract 8).

    Args:
        template: chat template the policy was trained with (default ``"plain"``).
        batch_size: prompts per forward pass.
        max_new_tokens: greedy decoding budget (an answer has at most 2 digits + EOS).
    """

    def __init__(self, template: str | ChatTemplate = "plain", batch_size: int = 256, max_new_tokens: int = 4) -> None:
        self.template = get_template(template)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    @staticmethod
    def is_correct(prompt: str, response: str) -> bool:
        """True when ``response`` (whitespace stripped) is exactly the integer ``a + b``."""
        text = response.strip()
        return bool(_INTEGER.fullmatch(text)) and int(text) == int(gold_answer(prompt))

    @staticmethod
    def _default(prompts):
        return ArithmeticTask().prompts() if prompts is None else list(prompts)

    @torch.no_grad()
    def sequence_logps(self, model, tokenizer, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """``(N,)`` fp32 ``log pi(response + EOS | prompt)`` under the template's encoding."""
        device = _device(model)
        out = []
        with _eval(model):
            for start in range(0, len(prompts), self.batch_size):
                stop = start + self.batch_size
                rows = [self.template.encode(tokenizer, [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": r}])
                        for p, r in zip(prompts[start:stop], responses[start:stop])]
                ids = pad_right([r[0] for r in rows], tokenizer.pad_token_id).to(device)
                mask = pad_right([r[1] for r in rows], 0).to(device)
                attn = pad_right([[1] * len(r[0]) for r in rows], 0).to(device)
                logits = model(input_ids=ids, attention_mask=attn).logits
                out.append(sequence_logps(logits.float(), ids, mask).logps.cpu())
        return torch.cat(out)

    def p_correct(self, model, tokenizer, prompts: list[str] | None = None) -> float:
        """Exact expected accuracy at temperature 1: ``mean_x exp(log pi(gold + EOS | x))`` (all prompts by default)."""
        prompts = self._default(prompts)
        return float(self.sequence_logps(model, tokenizer, prompts, [gold_answer(p) for p in prompts]).exp().mean())

    @torch.no_grad()
    def generate_greedy(self, model, tokenizer, prompts: list[str] | None = None) -> list[str]:
        """Greedy responses (decoded up to the first EOS, at most ``max_new_tokens`` tokens)."""
        prompts = self._default(prompts)
        device, eos = _device(model), tokenizer.eos_token_id
        encoded = [self.template.prompt_ids(tokenizer, p) for p in prompts]
        responses: list[str] = [""] * len(prompts)
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        with _eval(model):
            for group in by_length.values():  # equal-length prompts need no padding
                for start in range(0, len(group), self.batch_size):
                    idx = group[start:start + self.batch_size]
                    x = torch.tensor([encoded[i] for i in idx], device=device)
                    done = torch.zeros(len(idx), dtype=torch.bool, device=device)
                    new = []
                    for _ in range(self.max_new_tokens):
                        nxt = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].argmax(-1)
                        new.append(nxt)
                        done |= nxt == eos
                        x = torch.cat([x, nxt[:, None]], 1)
                        if done.all():
                            break
                    for i, row in zip(idx, torch.stack(new, 1).tolist()):
                        tokens = row[: row.index(eos)] if eos in row else row
                        responses[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        return responses

    def greedy_accuracy(self, model, tokenizer, prompts: list[str] | None = None) -> float:
        """Fraction of prompts whose greedy response is correct."""
        prompts = self._default(prompts)
        responses = self.generate_greedy(model, tokenizer, prompts)
        return sum(self.is_correct(p, r) for p, r in zip(prompts, responses)) / len(prompts)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class _eval:
    """Context manager: eval mode inside, the previous training flag restored after."""

    def __init__(self, model) -> None:
        self.model, self.was_training = model, getattr(model, "training", False)

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc):
        if hasattr(self.model, "train"):
            self.model.train(self.was_training)
