"""Files of rejection sampling: the multi-response jsonl format ``{prompt, responses, scores, best, best_score[,
correct]}`` (Xwin-Set style) and prompt files.

:func:`validate_multi_response_row`, :func:`write_jsonl`, :func:`read_multi_response_jsonl`, :func:`load_prompts`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_plugins.modules.align._common import first_argmax as _first_argmax, is_finite_number as _is_number

__all__ = ["load_prompts", "read_multi_response_jsonl", "validate_multi_response_row", "write_jsonl"]


def validate_multi_response_row(row: object, where: str) -> dict:
    """Check one multi-response row; ``where`` (e.g. ``"file.jsonl:3"``) starts every error message.

    Missing ``best`` / ``best_score`` are filled from the scores (first occurrence among ties). Returns the row.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {row.get('prompt')!r}.")
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: 'responses' must be a non-empty list of strings, got {responses!r}.")
    if not isinstance(scores, list) or not all(_is_number(s) for s in scores):
        raise ValueError(f"{where}: 'scores' must be a list of finite numbers, got {scores!r}.")
    if len(scores) != len(responses):
        raise ValueError(f"{where}: {len(responses)} responses but {len(scores)} scores; give one score per "
                         "response.")
    correct = row.get("correct")
    if correct is not None and (not isinstance(correct, list) or len(correct) != len(responses)
                                or not all(isinstance(c, bool) for c in correct)):
        raise ValueError(f"{where}: 'correct' must be a list of {len(responses)} booleans (one per response), got "
                         f"{correct!r}.")
    if "best" in row and not isinstance(row["best"], str):
        raise ValueError(f"{where}: 'best' must be a string, got {row['best']!r}.")
    if "best_score" in row and not _is_number(row["best_score"]):
        raise ValueError(f"{where}: 'best_score' must be a finite number, got {row['best_score']!r}.")
    if "best" not in row or "best_score" not in row:
        best = _first_argmax(scores)
        row.setdefault("best", responses[best])
        row.setdefault("best_score", scores[best])
    return row


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8, strict JSON: NaN/inf raise ValueError naming the row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            try:
                handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            except (TypeError, ValueError) as err:
                raise ValueError(f"row {i} cannot be written to {path} as JSON: {err}") from err
    return path


def _nonblank_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of each non-blank line; FileNotFoundError ``"<what> not found: <path>"``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _json_line(path: Path, number: int, line: str, hint: str = "") -> Any:
    """One parsed jsonl line; invalid JSON raises ValueError ``"<path>:<number>: invalid JSON (...).<hint>"``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: invalid JSON ({err.msg}){hint}.") from err


def read_multi_response_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a multi-response jsonl (blank lines skipped); errors name ``file:line`` and the fix."""
    path = Path(path)
    rows = []
    for number, line in _nonblank_lines(path, "Multi-response file"):
        row = _json_line(path, number, line, "; each line must be one JSON object")
        rows.append(validate_multi_response_row(row, f"{path}:{number}"))
    if not rows:
        raise ValueError(f"{path}: no rows; expected lines like "
                         '{"prompt": ..., "responses": [...], "scores": [...]}.')
    return rows


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.jsonl`` whose rows have a string ``"prompt"`` (SFT, preference and multi-response files
    all do), or from any other text file with one prompt per non-empty line."""
    path = Path(path)
    prompts = []
    for number, line in _nonblank_lines(path, "Prompts file"):
        if path.suffix != ".jsonl":
            prompts.append(line.rstrip("\n"))
            continue
        row = _json_line(path, number, line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected an object with a string "prompt"; conversations '
                             '("messages") are not supported here, write their last user turn as "prompt".')
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts found.")
    return prompts
