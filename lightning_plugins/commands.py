"""Project subcommands of ``lightning-plugins`` that are not a ``Trainer`` run (LightningCLI covers those).

    lightning-plugins arithmetic-data --output_dir outputs/align/data
    lightning-plugins rejection-sample --config examples/configs/align_rs.yaml
    lightning-plugins build-pairs --input_path rs.jsonl --output_path pairs.jsonl --strategy best_vs_worst
    lightning-plugins consolidate-checkpoint --checkpoint_dir ckpts/last.ckpt --output_file model.ckpt

Each is a typed, documented Python function exposed through jsonargparse, so ``--help`` lists its arguments and
``--config`` takes a YAML file of them (``--print_config`` writes one).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_plugins.cli_errors import describe_parse_error

from lightning_plugins.modules.align.arithmetic import ArithmeticTask
from lightning_plugins.modules.align.pairs import run_build_pairs
from lightning_plugins.modules.align.sampling import run_rejection_sampling
from lightning_plugins.precision.checkpoint import consolidate_sharded_checkpoint

DEBUG_ENV = "LIGHTNING_PLUGINS_DEBUG"  # set it to see tracebacks instead of one-line errors


def write_arithmetic_data(output_dir: str = "outputs/align/data", seed: int = 0, p_correct_sft: float = 0.4) -> dict:
    """Write the embedded arithmetic alignment task's jsonl files (SFT, reward-model pairs, prompts).

    Args:
        output_dir: folder to write ``sft_train``, ``sft_val``, ``rm_train``, ``rm_val`` and ``prompts`` (.jsonl).
        seed: seed of the noisy SFT answers and of the pairs.
        p_correct_sft: probability that an SFT row holds the right sum (the rest are uniformly wrong answers).
    """
    paths = ArithmeticTask(seed=seed, p_correct_sft=p_correct_sft).write(output_dir)
    return {name: str(path) for name, path in paths.items()}


def consolidate_checkpoint(checkpoint_dir: str, output_file: str) -> dict:
    """Gather a sharded (FSDP2) fp8-msamp checkpoint folder into one portable checkpoint file.

    Args:
        checkpoint_dir: the folder a ModelParallelStrategy run saved (distributed-checkpoint shards + meta.pt).
        output_file: the single file to write: fp32 weights and torch AdamW optimizer states.
    """
    checkpoint = consolidate_sharded_checkpoint(checkpoint_dir, output_file)
    weights = checkpoint["state_dict"]
    return {
        "output_file": output_file,
        "tensors": len(weights),
        "parameters": sum(t.numel() for t in weights.values()),
        "optimizer_states": len(checkpoint.get("optimizer_states", [])),
        "global_step": checkpoint.get("global_step"),
    }


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "arithmetic-data": write_arithmetic_data,
    "rejection-sample": run_rejection_sampling,
    "build-pairs": run_build_pairs,
    "consolidate-checkpoint": consolidate_checkpoint,
}
DESCRIPTION = (
    "Project subcommands (not Trainer runs): "
    + ", ".join(COMMANDS)
    + "; e.g. `lightning-plugins rejection-sample --help`."
)


class CommandError(Exception):
    """A project subcommand rejected its input (a missing file, a bad value): reported as one line."""


def run_command(name: str, args: Sequence[str]) -> dict[str, Any]:
    """Parse ``args`` for the project subcommand ``name``, run it, print its summary as JSON and return it."""
    function = COMMANDS[name]
    parser = ArgumentParser(prog=f"lightning-plugins {name}", description=(function.__doc__ or "").split("\n")[0],
                            exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML/JSON file with the arguments below.")
    parser.add_function_arguments(function)
    try:
        config = parser.parse_args(list(args))
    except Exception as err:  # jsonargparse's parse errors: one line, like LightningCLI's
        if os.environ.get(DEBUG_ENV):
            raise
        raise CommandError(describe_parse_error(str(err), err)) from err
    kwargs = {k: v for k, v in vars(config).items() if k != "config" and not k.startswith("__")}
    try:
        summary = function(**kwargs)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        if os.environ.get(DEBUG_ENV):
            raise
        raise CommandError(f"{type(err).__name__}: {err}") from err
    print(json.dumps(summary, indent=2, default=str))
    return summary


def maybe_run_command(args: Optional[Sequence[str]]) -> Optional[dict[str, Any]]:
    """Run a project subcommand when ``args`` (default ``sys.argv[1:]``) starts with one; else return None."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    return None
