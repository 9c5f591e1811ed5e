"""FP8 on Hugging Face models built from configs: GPT-2 (``Conv1D`` projections) and Llama (``nn.Linear``).

For each model, the same seed, data and 100 optimizer steps run four ways, side by side in one process:
``32-true`` and ``precision="fp8-msamp"`` (O2), each through the ``Trainer`` and through ``Fabric``. The table
gives the final loss (mean of the last 10 steps) and its difference to the 32-true run of the same loop, and
checks that the FP8 run's weights load into the unconverted model (``load_state_dict(strict=True)``) and give
the FP8-trained model's held-out loss there.

Data: next-token prediction on the Python standard library's own source, BPE-tokenized here (vocab 512).

    python benchmarks/fp8_hf_models.py              # 100 steps, seed 0, 1 thread (about 1-2 minutes on a CPU)
    python benchmarks/fp8_hf_models.py --steps 20   # quicker

Writes ``benchmarks/results/fp8_hf_models.{json,md}`` and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt import (  # noqa: E402
    TokenWindows,
    bpe_tokenize,
    environment,
    local_text,
    markdown_table,
    quiet_lightning,
    write_results,
)

import lightning_plugins  # noqa: E402,F401  (registers precision="fp8-msamp" for Trainer and Fabric)

VOCAB, SEQ, BATCH, LR = 512, 64, 8, 2e-3
PRECISIONS = ("32-true", "fp8-msamp")


def gpt2(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    ))


def llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


MODELS: dict[str, Callable[[int], torch.nn.Module]] = {"GPT-2 (Conv1D)": gpt2, "Llama (Linear)": llama}


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM as a LightningModule: AdamW, the training loss recorded per step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = lm_loss(self.model, batch)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.01)


def run_trainer(build: Callable[[int], torch.nn.Module], precision: str, data: Any, steps: int, seed: int) -> tuple:
    pl.seed_everything(seed, verbose=False)
    module = CausalLM(build(seed))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )
    trainer.fit(module, data)
    return module.losses, module.model  # after the FP8 fit the model holds plain layers again


def run_fabric(build: Callable[[int], torch.nn.Module], precision: str, data: Any, steps: int, seed: int) -> tuple:
    pl.seed_everything(seed, verbose=False)
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    model = build(seed)
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01))
    losses: list[float] = []
    batches = iter(data)
    for _ in range(steps):
        batch = next(batches)
        optimizer.zero_grad()
        loss = lm_loss(model, batch)
        fabric.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
    plugin = fabric._precision
    if hasattr(plugin, "restore_module"):
        plugin.restore_module()  # Fabric has no teardown hook: back to plain layers explicitly
    return losses, model.module if hasattr(model, "module") else model


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, held: TokenWindows) -> float:
    model.eval()
    batch = (held.x[:32], held.y[:32])
    return float(lm_loss(model, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_lightning()

    text, _ = local_text(400_000)
    ids, _ = bpe_tokenize(text, VOCAB)
    windows = TokenWindows(ids, SEQ)
    n_train = args.steps * BATCH
    train = torch.utils.data.Subset(windows, range(n_train))
    held = TokenWindows(ids[(n_train + 1) * SEQ :], SEQ)

    def loader() -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=False)

    rows, runs = [], {}
    for model_name, build in MODELS.items():
        for loop_name, run in (("Trainer", run_trainer), ("Fabric", run_fabric)):
            results = {}
            for precision in PRECISIONS:
                start = time.perf_counter()
                losses, trained = run(build, precision, loader(), args.steps, args.seed)
                seconds = time.perf_counter() - start
                final = sum(losses[-10:]) / len(losses[-10:])
                fresh = build(args.seed + 1)
                fresh.load_state_dict(trained.state_dict(), strict=True)  # raises if the layout changed
                results[precision] = {
                    "final_loss": final, "first_loss": losses[0], "seconds": seconds,
                    "held_out_loss": held_out_loss(trained, held), "reloaded_held_out_loss": held_out_loss(fresh, held),
                    "plain_layers_after": not any(type(m).__name__.startswith("FP8") for m in trained.modules()),
                }
            base, fp8 = results["32-true"], results["fp8-msamp"]
            rel = (fp8["final_loss"] - base["final_loss"]) / base["final_loss"]
            runs[f"{model_name} / {loop_name}"] = {**results, "relative_diff": rel}
            rows.append([
                model_name, loop_name, f"{base['first_loss']:.3f}", f"{base['final_loss']:.4f}",
                f"{fp8['final_loss']:.4f}", f"{100 * rel:+.2f} %", "yes" if abs(rel) <= 0.02 else "NO",
                "yes" if fp8["reloaded_held_out_loss"] == fp8["held_out_loss"] and fp8["plain_layers_after"] else "NO",
                f"{base['seconds']:.1f} / {fp8['seconds']:.1f}",
            ])
    headers = ["model", "loop", "first loss", "32-true final", "fp8-msamp O2 final", "diff", "within 2 %",
               "FP8 weights load into the plain model", "seconds (32 / fp8)"]
    table = markdown_table(headers, rows)
    note = (
        f"{args.steps} steps, batch {BATCH} x {SEQ} tokens, AdamW lr {LR}, seed {args.seed}, "
        f"{args.threads} thread(s); final loss = mean of the last 10 steps; FP8 emulated on the CPU."
    )
    print(table)
    print(note)
    markdown = "# FP8 on Hugging Face GPT-2 and Llama (from configs)\n\n" + note + "\n\n" + table
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(), "runs": runs}
    out = write_results("fp8_hf_models", payload, markdown, args.out)
    print(f"results: {out / 'fp8_hf_models.md'}")


if __name__ == "__main__":
    main()
