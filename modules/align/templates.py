"""Chat templates that render messages as (text, trained-on) spans and tokenize them span by span.

A conversation renders as: BOS id (if the template and tokenizer have one), the system span (when a system message
or a default system prompt exists), then per turn ``user_template`` or ``assistant_prefix`` + ``assistant_template``
+ the EOS *id* + ``assistant_suffix``. Only ``assistant_template`` spans (and the EOS id after them) are trained on.
Each span is tokenized separately (``add_special_tokens=False``) and the ids are concatenated, so the prompt ids are
always an exact prefix of prompt+completion ids and no literal ``"</s>"`` is ever tokenized.

Built-in names: ``"vicuna_v1.1"`` (Xwin-LM's format, the default), ``"chatml"`` and ``"plain"`` (no decoration; used
by the arithmetic task). A YAML/JSON file holding the :class:`ChatTemplate` fields defines a custom one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TEMPLATES", "ChatTemplate", "get_template"]

ROLES = ("system", "user", "assistant")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ChatTemplate:
    """Text pieces of a chat format; ``{system}`` / ``{content}`` are replaced literally (no ``str.format``)."""

    user_template: str
    """Text of a user turn, with ``{content}``."""
    assistant_template: str
    """Trained text of an assistant turn, with ``{content}``; the EOS id follows it (when ``add_eos``)."""
    name: str = "custom"
    system_template: str = "{system}"
    """Text of the system message, with ``{system}``; omitted when there is no system message and no default."""
    default_system: str = ""
    """System prompt used when the conversation has no system message."""
    assistant_prefix: str = ""
    """Untrained text before each assistant turn; also the generation prompt."""
    assistant_suffix: str = ""
    """Untrained text after the EOS id of each assistant turn."""
    add_bos: bool = False
    """Start with the tokenizer's BOS id (if it has one; [CLS] for BERT-style tokenizers)."""
    add_eos: bool = True
    """Append the tokenizer's EOS id ([SEP] for BERT-style tokenizers) after each assistant turn (trained on)."""

    def __post_init__(self) -> None:
        for field, key in (("user_template", "{content}"), ("assistant_template", "{content}"),
                           ("system_template", "{system}")):
            value = getattr(self, field)
            if not isinstance(value, str) or key not in value:
                raise ValueError(f"Chat template {self.name!r}: field `{field}` must be a string containing {key}, "
                                 f"got {value!r}.")
        for field in ("name", "default_system", "assistant_prefix", "assistant_suffix"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"Chat template {self.name!r}: field `{field}` must be a string.")

    def spans(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """``(text, trained_on)`` spans of the conversation, without BOS/EOS (those are ids, added by ``encode``).

        Every trained span is one assistant turn and is followed by the EOS id in :meth:`encode`.
        """
        _check_messages(messages)
        out: list[tuple[str, bool]] = []
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if system:
            out.append((self.system_template.replace("{system}", system), False))
        for msg in messages:
            if msg["role"] == "user":
                out.append((self.user_template.replace("{content}", msg["content"]), False))
            else:
                out.append((self.assistant_prefix, False))
                out.append((self.assistant_template.replace("{content}", msg["content"]), True))
                out.append((self.assistant_suffix, False))
        if add_generation_prompt:
            out.append((self.assistant_prefix, False))
        return [(text, trained) for text, trained in out if text or trained]

    def encode(
        self, tokenizer, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids and 0/1 loss mask (1 on assistant spans and their EOS id) of ``messages``."""
        ids: list[int] = []
        mask: list[int] = []
        bos = _special_id(tokenizer, "bos", "cls")
        if self.add_bos and bos is not None:
            ids.append(bos)
            mask.append(0)
        eos = _special_id(tokenizer, "eos", "sep")
        for text, trained in self.spans(messages, add_generation_prompt):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids.extend(piece)
            mask.extend([int(trained)] * len(piece))
            if trained and self.add_eos:
                if eos is None:
                    raise ValueError(f"Chat template {self.name!r} appends EOS but the tokenizer has no eos_token; "
                                     "set tokenizer.eos_token or use a template with add_eos: false.")
                ids.append(eos)
                mask.append(1)
        return ids, mask

    def prompt_ids(self, tokenizer, prompt: str | list[dict]) -> list[int]:
        """Ids of a generation prompt: a user string (or a message list) followed by the assistant prefix."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.encode(tokenizer, messages, add_generation_prompt=True)[0]

    def render(self, messages: list[dict], add_generation_prompt: bool = False, eos_text: str = "</s>",
               bos_text: str = "") -> str:
        """The conversation as one string (for display), with ``eos_text`` where the EOS id goes."""
        text = bos_text if self.add_bos else ""
        for piece, trained in self.spans(messages, add_generation_prompt):
            text += piece + (eos_text if trained and self.add_eos else "")
        return text


def _special_id(tokenizer, name: str, fallback: str) -> int | None:
    """``<name>_token_id``, else ``<fallback>_token_id`` (BERT-style tokenizers: [CLS] as BOS, [SEP] as EOS)."""
    token_id = getattr(tokenizer, f"{name}_token_id", None)
    return token_id if token_id is not None else getattr(tokenizer, f"{fallback}_token_id", None)


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise TypeError(f"`messages` must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}.")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise ValueError(f"messages[{i}] = {msg!r} must be a dict with `role` in {ROLES} and a string `content`.")
        if msg["role"] == "system" and i:
            raise ValueError(f"messages[{i}] is a system message; only the first message may be one.")


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1.1": ChatTemplate(
        name="vicuna_v1.1",
        system_template="{system} ",
        default_system=VICUNA_SYSTEM,
        user_template="USER: {content} ",
        assistant_prefix="ASSISTANT:",
        assistant_template=" {content}",
        add_bos=True,
    ),
    "chatml": ChatTemplate(
        name="chatml",
        system_template="<|im_start|>system\n{system}<|im_end|>\n",
        user_template="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_template="{content}",
        assistant_suffix="\n",
    ),
    "plain": ChatTemplate(name="plain", system_template="{system}\n", user_template="{content}",
                          assistant_template="{content}"),
}

_REQUIRED = ("user_template", "assistant_template")


def get_template(name_or_path: str | ChatTemplate = "vicuna_v1.1") -> ChatTemplate:
    """A built-in template by name, a template passed through, or one loaded from a YAML/JSON file of its fields."""
    if isinstance(name_or_path, ChatTemplate):
        return name_or_path
    if not isinstance(name_or_path, str):
        raise TypeError(f"Chat template must be a name or a file path, got {type(name_or_path).__name__}.")
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ValueError(f"Unknown chat template {name_or_path!r}; use one of {sorted(TEMPLATES)} or a path to a "
                         ".yaml/.json file with the ChatTemplate fields.")
    if not path.is_file():
        raise FileNotFoundError(f"Chat template file {path} does not exist.")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        fields = json.loads(text)
    else:
        import yaml

        fields = yaml.safe_load(text)
    if not isinstance(fields, dict):
        raise ValueError(f"Chat template file {path} must hold a mapping of fields, got {type(fields).__name__}.")
    known = {f.name for f in dataclasses.fields(ChatTemplate)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"Chat template file {path}: unknown field(s) {unknown}; allowed: {sorted(known)}.")
    for field in _REQUIRED:
        if field not in fields:
            raise ValueError(f"Chat template file {path} is missing the field `{field}` (required: {list(_REQUIRED)}).")
    fields.setdefault("name", path.stem)
    return ChatTemplate(**fields)
