"""One-line messages for configuration errors that jsonargparse reports (``lightning-plugins`` CLI and subcommands).

:func:`describe_parse_error` turns jsonargparse's error (a chain of exceptions) into
``<config key>: <what is wrong with the value>[; did you mean ...]``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.loggers import Logger

__all__ = ["describe_parse_error", "known_classes"]

# jsonargparse (4.x) reports a rejected value as a chain of exceptions (``raise ... from``), one per nesting level,
# each message opening with 'Parser key "<key>":' or "Problem with given class_path '<path>':", the innermost one
# holding the rejected value. Their messages are the only record of the key path, so they are read here; anything
# not recognised falls back to the first line of the parser's message.
_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"(?: element (?P<element>\d+))?:')
_CLASS_PATH = re.compile(r"Problem with given class_path '(?P<path>[^']+)':")
_NOT_A_PATH = re.compile(r"Expected a dot import path string: (?P<name>\S+)")
_WRONG_BASE = re.compile(r"Import path (?P<path>\S+) does not correspond to a subclass of (?P<base>\w+)")
_UNKNOWN_OPTION = re.compile(r"Option '(?P<option>[^']+)' is not accepted")
_REQUIRED = re.compile(r"the following arguments are required: (?P<names>.+)")
_NESTED_ARG = re.compile(r"NestedArg\(key='(?P<key>[^']+)', val=(?P<value>.*)\)")
_UNION = "Does not validate against any of the Union subtypes"
# the classes a class_path under each top-level key must derive from (their loaded subclasses are the names the
# CLI resolves); other keys suggest among all three
_KEY_BASES: dict[str, tuple[type, ...]] = {
    "model": (LightningModule,),
    "data": (LightningDataModule,),
    "trainer.callbacks": (Callback,),
    "trainer.logger": (Logger,),
    "optimizer": (torch.optim.Optimizer,),
    "lr_scheduler": (torch.optim.lr_scheduler.LRScheduler,),
}


def describe_parse_error(message: str, ex: Optional[BaseException] = None) -> str:
    """One line for a jsonargparse error: ``<config key>: <what is wrong with the value>[; did you mean ...]``.

    ``message``/``ex`` are what jsonargparse passes to ``ArgumentParser.error``.
    """
    chain: list[BaseException] = []
    while ex is not None and ex not in chain:
        chain.append(ex)
        ex = ex.__cause__
    keys: list[str] = []
    class_path: Optional[str] = None  # the class whose init_args the following keys belong to
    innermost_union: Optional[str] = None
    previous = None
    for error in chain:
        text = str(error).strip()
        if text == previous:  # jsonargparse re-raises the same message as another exception type
            continue
        previous = text
        key, path = _KEY.match(text), _CLASS_PATH.match(text)
        if key:
            keys.append(key["key"] + (f"[{int(key['element']) - 1}]" if key["element"] else ""))
            innermost_union = None
        elif path:
            class_path = path["path"]
            keys.append("init_args")
            innermost_union = None
        elif text.startswith(_UNION):
            innermost_union = text
    first_line = (message.strip().splitlines() or [""])[0]
    if not chain:
        return first_line
    root = chain[-1]
    text = str(root).strip()
    option, required = _UNKNOWN_OPTION.match(text), _REQUIRED.match(text)
    if option and class_path:
        return f"{'.'.join(keys + [option['option']])}: {_suggest_option(option['option'], class_path)}"
    if required and class_path:
        missing = [name.strip() for name in required["names"].split(",")]
        where = ", ".join(".".join(keys + [name]) for name in missing)
        return f"{'.'.join(keys)}: {class_path.rsplit('.', 1)[-1]} requires {', '.join(missing)}; set {where}"
    if keys and keys[-1] == "init_args":
        keys.pop()
    key = ".".join(keys) or "config"

    unknown = _NOT_A_PATH.match(text)
    if unknown or (isinstance(root, (ImportError, AttributeError)) and class_path and len(chain) > 1
                   and _CLASS_PATH.match(str(chain[-2]).strip())):
        name = unknown["name"] if unknown else class_path
        return f"{key}.class_path: no class {name!r}; {_suggest_class(name, key)}"
    wrong_base = _WRONG_BASE.match(text)
    if wrong_base:
        return f"{key}.class_path: {wrong_base['path']!r} is not a {wrong_base['base']}; name a subclass of it"
    union = _describe_union(innermost_union, key) if innermost_union is not None else None
    if union is not None:
        return f"{key}: {union}"
    return f"{key}: {text.splitlines()[0]}" if keys else first_line


def _describe_union(text: str, key: str) -> Optional[str]:
    """``'<value>' is none of <types>`` (+ the closest accepted string) from jsonargparse's union error at ``key``;
    None for ``Optional[X]`` (the error of ``X`` says more)."""
    lines = text.splitlines()
    subtypes = next((line[len("Subtypes: "):] for line in lines if line.startswith("Subtypes: ")), "")
    value = next((line[len("Given value: "):] for line in reversed(lines) if line.startswith("Given value: ")), "")
    names = [name for name in _split_top_level(subtypes.strip()[1:-1]) if name != "<class 'NoneType'>"]
    if len(names) < 2:
        return None
    nested = _NESTED_ARG.fullmatch(value)
    if nested:  # --key.init_args.name=value without a class_path for it
        return (f"no class to take init_args.{nested['key']}={nested['value']}; set {key}.class_path first "
                f"(accepted types: {subtypes})")
    close = difflib.get_close_matches(value, re.findall(r"'([^']+)'", subtypes), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{value!r} is none of the accepted types {subtypes}{hint}"


def _split_top_level(text: str) -> list[str]:
    """``"A[1, 2], B"`` -> ``["A[1, 2]", "B"]``: split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [part for part in parts + [text[start:].strip()] if part]


def known_classes(key: str) -> dict[str, str]:
    """Short name -> import path of the loaded classes that a ``class_path`` under ``key`` may name."""
    key = re.sub(r"\[\d+\]", "", key).split(".init_args")[0]  # trainer.callbacks[1] -> trainer.callbacks
    bases = _KEY_BASES.get(key) or _KEY_BASES.get(key.split(".")[0])
    found: dict[str, str] = {}
    stack = list(bases or (LightningModule, LightningDataModule, Callback))
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        path = _import_path(cls)
        if path and not inspect.isabstract(cls) and not any(part.startswith("_") for part in path.split(".")):
            found.setdefault(cls.__name__, path)
    return found


def _import_path(cls: type) -> Optional[str]:
    """The shortest ``package.Class`` path that imports ``cls`` (``lightning_plugins.modules.ImageClassifier``)."""
    if "<locals>" in cls.__qualname__:
        return None
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f"{'.'.join(parts[:end])}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _suggest_class(name: str, key: str) -> str:
    classes = known_classes(key)
    if "." in name:  # an import path: the closest import path, or the path to the closest class name
        close = difflib.get_close_matches(name, sorted(classes.values()), n=1)
        short = difflib.get_close_matches(name.rsplit(".", 1)[-1], sorted(classes), n=1)
        match = close[0] if close else (classes[short[0]] if short else None)
    else:
        close = difflib.get_close_matches(name, sorted(classes), n=1)
        match = close[0] if close else None
    if match is not None:
        return f"did you mean {match!r}?"
    return "no loaded class has a similar name; give a full import path (package.module.Class)"


def _suggest_option(option: str, class_path: str) -> str:
    name = class_path.rsplit(".", 1)[-1]
    try:
        module, _, attribute = class_path.rpartition(".")
        parameters = [
            p.name for p in inspect.signature(getattr(importlib.import_module(module), attribute)).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (ImportError, AttributeError, TypeError, ValueError):
        return f"{name} has no argument {option!r}"
    close = difflib.get_close_matches(option, parameters, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(parameters)}"
    return f"{name} has no argument {option!r}; {hint}"
