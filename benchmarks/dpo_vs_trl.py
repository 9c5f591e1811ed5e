"""DPO training step: ``DPOModule`` (Lightning) vs TRL 1.16's ``DPOTrainer``, same model, data, order and settings.

    .venv/bin/python benchmarks/dpo_vs_trl.py                 # tiny Llama 4x256, 8 pairs x 256 tokens, 20 steps
    .venv/bin/python benchmarks/dpo_vs_trl.py --steps 5 --warmup 1 --layers 2 --hidden 64   # quick look

Setup (shared): a word-level tokenizer of the ``--vocab`` most frequent words of local text (the Python standard
library's sources), preference pairs cut from that text (prompt, chosen and rejected are word windows), a
``LlamaForCausalLM`` initialised once under a fixed seed and saved to a folder that both sides load. fp32, eager
attention, dropout off, no gradient checkpointing, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) at a constant
learning rate, gradient clipping at norm 1.0, no shuffling (both sides see the pairs in file order).

Each configuration runs in its own subprocess (peak RSS is per process): TRL with the reference model live and with
``precompute_ref_log_probs=True``, and ours with ``reference="copy"`` and ``reference="precomputed"``. Reported:
median step time over the timed steps (after ``--warmup`` steps), completion+prompt tokens/s, peak RSS and its rise
over the RSS after the model was loaded, reference precompute time, the per-step loss and the reward metrics; the
first 5 steps' losses of ours are compared to TRL's (goal: |diff| <= 1e-5).

Goals (issue 5): throughput >= 1.2x TRL's, peak memory no higher; precomputed reference clearly below TRL live.
Writes ``benchmarks/results/dpo_vs_trl.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpt import environment, local_text, markdown_table, write_results  # noqa: E402

CONFIGS = ("trl live", "trl precomputed", "ours copy", "ours precomputed")


# ------------------------------------------------------------------------------------------------ shared inputs
def build_inputs(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Tokenizer folder, model folder and preference jsonl shared by every configuration."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text, _ = local_text(1_000_000)
    words = text.split()
    specials = ["<pad>", "<eos>", "<unk>"]
    common = [w for w, _ in Counter(words).most_common(args.vocab - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + common)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(folder / "tokenizer")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.length, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "model")

    # prompt ~ half the budget, completions ~ a quarter each (EOS included), every pair fits max_length
    rng = random.Random(0)
    rows = []
    n_pairs = args.pairs * (args.warmup + args.steps)
    for _ in range(n_pairs):
        def window(low: int, high: int) -> str:
            size = rng.randint(low, high)
            start = rng.randrange(0, len(words) - size)
            return " ".join(words[start : start + size])

        prompt_len = args.length // 2
        completion = args.length - prompt_len - 2
        rows.append({
            "prompt": window(prompt_len // 2, prompt_len),
            "chosen": " " + window(completion // 2, completion),
            "rejected": " " + window(completion // 2, completion),
        })
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"tokenizer": str(folder / "tokenizer"), "model": str(folder / "model"), "data": str(data)}


# ------------------------------------------------------------------------------------------------ workers
def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trl(spec: dict[str, Any], precompute: bool) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], attn_implementation="eager", dtype=torch.float32)
    ref = None if precompute else AutoModelForCausalLM.from_pretrained(
        spec["model"], attn_implementation="eager", dtype=torch.float32
    )
    baseline = _rss_mib()
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    steps = spec["warmup"] + spec["steps"]
    config = DPOConfig(
        output_dir=spec["workdir"], beta=0.1, loss_type=["sigmoid"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0, per_device_train_batch_size=spec["pairs"],
        gradient_accumulation_steps=1, max_steps=steps, max_length=spec["length"], bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, disable_dropout=True, logging_steps=1, report_to="none",
        save_strategy="no", train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=spec["pairs"], disable_tqdm=True,
    )
    recorded: list[dict[str, float]] = []

    class Recording(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                row = {"loss": float(loss.detach())}
                row.update({k: float(v[-1]) for k, v in self._metrics["train"].items() if v})
                row["tokens"] = int(inputs["attention_mask"].sum())
                recorded.append(row)
            return loss

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.start)

    start = time.perf_counter()
    trainer = Recording(model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=[Timer()])
    trainer.train()
    total = time.perf_counter() - start
    return _summary(spec, recorded, times, baseline, total - sum(times))


def run_ours(spec: dict[str, Any], reference: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lightning_plugins.modules.align.data import PreferenceDataModule
    from lightning_plugins.modules.align.dpo import DPOModule

    torch.manual_seed(0)
    module = DPOModule(model=spec["model"], tokenizer=spec["tokenizer"], reference=reference, beta=0.1,
                       loss_type="sigmoid", lr=spec["lr"], weight_decay=0.0,
                       cache_dir=str(Path(spec["workdir"]) / "ref_cache"))
    data = PreferenceDataModule(tokenizer=spec["tokenizer"], train_path=spec["data"], template="plain",
                                max_length=spec["length"], batch_size=spec["pairs"], shuffle=False)
    baseline = _rss_mib()
    recorded: list[dict[str, float]] = []
    times: list[float] = []

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)
            row = {"loss": float(outputs["loss"])}
            row.update({k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("train/") and v.numel() == 1})
            row["tokens"] = int(batch["attention_mask"].sum())
            recorded.append(row)

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=spec["warmup"] + spec["steps"],
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Recorder()],
        default_root_dir=spec["workdir"],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    total = time.perf_counter() - start
    return _summary(spec, recorded, times, baseline, total - sum(times))


def _summary(spec, recorded, times, baseline, outside_steps) -> dict[str, Any]:
    timed = times[spec["warmup"]:]
    tokens = [r["tokens"] for r in recorded[spec["warmup"]:]]
    median = statistics.median(timed)
    return {
        "step_seconds_median": median,
        "tokens_per_second": statistics.mean(tokens) / median,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_after_load_mib": baseline,
        "seconds_outside_steps": outside_steps,
        "steps": recorded,
    }


# ------------------------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--length", type=int, default=256, help="max tokens of prompt + completion")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        import torch

        torch.set_num_threads(spec["threads"])
        torch.use_deterministic_algorithms(True)
        kind, mode = args.worker.split()
        result = run_trl(spec, mode == "precomputed") if kind == "trl" else run_ours(spec, mode)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl_") as tmp:
        folder = Path(tmp)
        inputs = build_inputs(args, folder)
        for name in args.configs:
            workdir = folder / name.replace(" ", "_")
            workdir.mkdir()
            spec = {**inputs, "workdir": str(workdir), "result": str(workdir / "result.json"), "steps": args.steps,
                    "warmup": args.warmup, "pairs": args.pairs, "length": args.length, "lr": args.lr,
                    "threads": args.threads}
            (workdir / "spec.json").write_text(json.dumps(spec))
            print(f"[dpo_vs_trl] running {name} ...", flush=True)
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run([sys.executable, __file__, "--worker", name, "--spec", str(workdir / "spec.json")],
                           check=True, env=env)
            results[name] = json.loads((workdir / "result.json").read_text())
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    base = results.get("trl live")
    rows = []
    for name, r in results.items():
        speed = base["step_seconds_median"] / r["step_seconds_median"] if base else float("nan")
        memory = r["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan")
        rows.append([name, f"{r['step_seconds_median'] * 1000:.0f}", f"{r['tokens_per_second']:.0f}",
                     f"{speed:.2f}x", f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] - r['rss_after_load_mib']:.0f}",
                     f"{memory:.2f}x", f"{r['seconds_outside_steps']:.1f}"])
    table = markdown_table(
        ["config", "step ms (median)", "tokens/s", "speed vs trl live", "peak RSS MiB", "rise over load MiB",
         "peak vs trl live", "s outside steps"], rows,
    )
    parity = {}
    for ours, theirs in (("ours copy", "trl live"), ("ours precomputed", "trl precomputed")):
        if ours in results and theirs in results:
            a, b = results[ours]["steps"][:5], results[theirs]["steps"][:5]
            parity[f"{ours} vs {theirs}"] = {
                key: max(abs(x[key] - y[key]) for x, y in zip(a, b))
                for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")
                if all(key in x for x in a) and all(key in y for y in b)
            }
    parity_lines = [f"- {pair}: " + ", ".join(f"max |diff| {k} {v:.2e}" for k, v in diffs.items())
                    for pair, diffs in parity.items()]
    markdown = (
        f"# DPO step: ours vs TRL {_trl_version()}\n\nLlama {args.layers}x{args.hidden}, vocab {args.vocab}, "
        f"{args.pairs} pairs x <= {args.length} tokens, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.threads} thread(s), fp32, CPU.\n\n{table}\n\nFirst 5 steps:\n" + "\n".join(parity_lines) + "\n"
    )
    print(markdown)
    payload = {"environment": environment(), "args": vars(args) | {"out": str(args.out)}, "results": results,
               "parity_first_5_steps": parity}
    out = write_results("dpo_vs_trl", payload, markdown, args.out)
    print(f"written: {out}/dpo_vs_trl.json, .md")


def _trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


if __name__ == "__main__":
    main()
