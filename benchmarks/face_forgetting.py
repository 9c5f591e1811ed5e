"""Continual forgetting of face identities: GS-LoRA, GS-LoRA++, 4-shot GS-LoRA and two baselines on one pretrained
``FaceRecognizer`` (``vit_face_small``, CosFace) and one task sequence of identities.

The face counterpart of ``benchmarks/forgetting.py`` (MNIST), whose helpers it reuses. Data: ``FaceDataModule()``'s
embedded instance identities (80 trained identities, 40 training / 10 validation / 10 test views each; 20 held-out
identities whose views form the verification pairs of unseen faces).

Methods (all see the same data of each task: the identities to forget plus replay of the retained ones):

* ``gslora``: the ``GSLoRA`` callback (LoRA rank 8, group lasso, bounded forgetting loss);
* ``gslora++``: the same with identity prototypes (GS-LoRA++);
* ``gslora-4shot``: GS-LoRA with 4 views per identity (batch 4);
* ``finetune``: full fine-tuning (every weight but the head) with the same retention + bounded forgetting loss;
* ``retrain``: a fresh model trained from scratch on the task's replay data of the retained identities.

Before forgetting, the margin-free logits of ``forward`` are rescaled (``model.logit_scale``, default 8 instead of the
head's s=30): at s=30 the softmax of the confident CosFace model is saturated and the bounded forgetting loss gets no
gradient (see ``FaceRecognizer``'s docstring).

Reported per task on the test views (as in GS-LoRA's Tab. 3): Acc_f, Acc_r, Acc_o and H (H and Drop use the
*pretrained* model's accuracy on the task's identities), plus verification AUC on the retained identities (all
same-identity pairs of their test views + as many different pairs; flip-summed embeddings) and on the forgotten
ones, before (pretrained model) and after, the held-out-identity AUC (unseen faces) before and after, trainable
parameters and wall time. Writes ``results.json``, ``results.md`` and ``face_forgetting.png`` to ``--out``.

    python benchmarks/face_forgetting.py --out benchmarks/results/face_forgetting
    python benchmarks/face_forgetting.py --quick --out /tmp/ff   # < 1.5 minute smoke run (tiny model, 2 x 2 ids)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forgetting import FineTune, add_h, evaluate, quiet_trainer, with_overrides  # noqa: E402

from lightning_plugins.callbacks import ForgettingDataModule, GSLoRA, format_table  # noqa: E402
from lightning_plugins.callbacks.gslora.lora import DEFAULT_TARGETS  # noqa: E402
from lightning_plugins.callbacks.gslora.tasks import view  # noqa: E402
from lightning_plugins.modules.face import FaceDataModule, FaceRecognizer  # noqa: E402
from lightning_plugins.modules.face.data import heldout_pairs  # noqa: E402
from lightning_plugins.modules.face.metrics import VerificationMetrics, cosine_scores  # noqa: E402

METHODS = ("gslora", "gslora++", "gslora-4shot", "finetune", "retrain")
MODELS = {
    # vit_face_small: conv stem, width 128, 4 blocks, 4 heads, MLP 2x (0.90 M parameters)
    "full": dict(backbone="vit_face_small", backbone_kwargs={}),
    "quick": dict(backbone="vit_face_small", backbone_kwargs=dict(embed_dim=32, depth=2, num_heads=2)),
}
DATA = {
    "full": dict(),  # FaceDataModule's defaults: 80 identities x (40 train, 10 val, 10 test views), 20 held out
    "quick": dict(train_identities=20, train_views=12, eval_views=4),
}
# LoRA targets: "ffn" = GSLoRA's default (blocks.N.mlp.fc1/fc2); "ffn+readout" also adapts the hybrid ViT's
# spatial readout projection (backbone.readout.proj: tokens -> embedding) as its own group
TARGETS = {
    "ffn": None,
    "ffn+readout": [*DEFAULT_TARGETS, r"(?P<block>(?:.*\.)?readout)\.proj"],
}
# 4 views per identity at batch 4 (an epoch over the retain loader is one step per retained identity): with the
# full-data beta 0.2 one task kept Acc_f 13 % after the 20-epoch cap, so the few-shot runs push harder
FEWSHOT = "beta=0.4"


def pretrain(args: argparse.Namespace, data: FaceDataModule) -> tuple[dict, float]:
    """Train (or load the cached) face model; return its state dict and the pretraining wall time."""
    cache = args.cache or Path(tempfile.gettempdir()) / f"lightning-plugins-face-forgetting-{args.size}-{args.seed}.pt"
    config = {"model": MODELS[args.size], "data": DATA[args.size], "steps": args.pretrain_steps,
              "lr": args.pretrain_lr, "seed": args.seed, "batch": 64}
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        if stored.get("config") == json.loads(json.dumps(config)):
            print(f"pretrained model loaded from {cache} ({stored['seconds']:.0f} s to train)")
            return stored["state"], stored["seconds"]
    pl.seed_everything(args.seed, verbose=False)
    model = fresh_model(args, None)
    start = time.perf_counter()
    quiet_trainer(max_steps=args.pretrain_steps, limit_val_batches=0, default_root_dir=str(args.out)).fit(model, data)
    seconds = time.perf_counter() - start
    state = model.state_dict()
    torch.save({"config": config, "state": state, "seconds": seconds}, cache)
    print(f"pretrained in {seconds:.0f} s")
    return state, seconds


def fresh_model(args: argparse.Namespace, state: Optional[dict]) -> FaceRecognizer:
    model = FaceRecognizer(num_classes=args.num_classes, **MODELS[args.size], lr=args.pretrain_lr, fars=(1e-2,))
    if state is not None:
        model.load_state_dict(state)
        model.logit_scale = args.logit_scale  # forgetting sees unsaturated margin-free logits
    return model


# -- verification -------------------------------------------------------------------------------------------------
class Verification:
    """Pair sets of the benchmark: the test views' pairs of given identities, and the held-out identities' pairs."""

    def __init__(self, data: FaceDataModule, seed: int) -> None:
        self.images = torch.stack([data.test_set[i][0] for i in range(len(data.test_set))])
        self.labels = torch.tensor(data.test_set.targets)
        self.heldout = data.heldout_pairs["test"]
        self.seed = seed

    @torch.no_grad()
    def identities_auc(self, model: FaceRecognizer, identities: list[int]) -> Optional[float]:
        """AUC over every same pair of these identities' test views and as many different pairs."""
        if len(identities) < 2:
            return None
        rows = torch.nonzero(torch.isin(self.labels, torch.tensor(identities))).flatten()
        pairs, issame = heldout_pairs(self.labels[rows], self.seed)
        embeddings = embed(model, self.images[rows])
        return auc(cosine_scores(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]), issame)

    @torch.no_grad()
    def heldout_auc(self, model: FaceRecognizer) -> float:
        first = torch.stack([self.heldout[i][0] for i in range(len(self.heldout))])
        second = torch.stack([self.heldout[i][1] for i in range(len(self.heldout))])
        return auc(cosine_scores(embed(model, first), embed(model, second)), self.heldout.issame)

    def measure(self, model: FaceRecognizer, tasks: list[list[int]], index: int, num_classes: int) -> dict:
        task_view = view(tasks, index)
        gone = set(task_view.forgotten) | set(task_view.old)
        return {"auc_r": self.identities_auc(model, [c for c in range(num_classes) if c not in gone]),
                "auc_f": self.identities_auc(model, sorted(task_view.forgotten)),
                "auc_heldout": self.heldout_auc(model)}


def embed(model: FaceRecognizer, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.verification_embeddings(chunk) for chunk in images.split(500)])


def auc(scores: torch.Tensor, issame: torch.Tensor) -> float:
    metric = VerificationMetrics(fars=(1e-2,))
    metric.update(scores, issame.bool())
    return 100.0 * float(metric.compute()["auc"])


# -- methods ------------------------------------------------------------------------------------------------------
def forgetting_data(args, data, shots: Optional[int]) -> ForgettingDataModule:
    return ForgettingDataModule(data, replay_ratio=args.replay_ratio, shots=shots,
                                batch_size=4 if shots else args.batch_size, eval_batch_size=500, seed=args.seed)


def run_gslora(args, data, state, ver, prototypes: bool, shots: Optional[int], name: str) -> list[dict]:
    if shots:
        args = with_overrides(args, args.fewshot)
    pl.seed_everything(args.seed, verbose=False)
    model = fresh_model(args, state)
    fdata = forgetting_data(args, data, shots)
    callback = GSLoRA(args.tasks, target=TARGETS[args.target], beta=args.beta, bound=args.bound,
                      bound_per_sample=args.bound_per_sample, lr=args.lr, alpha=args.alpha,
                      prototypes=prototypes, proto_forget_weight=args.proto_weight, proto_bound=args.proto_bound,
                      proto_retain_weight=args.proto_retain_weight, early_stop=args.early_stop,
                      eval_test=True, plots=False, output_dir=str(args.out / name))
    rows = []
    for index in range(len(args.tasks)):
        trainer = quiet_trainer(max_epochs=args.task_epochs, callbacks=[callback], default_root_dir=str(args.out))
        start = time.perf_counter()
        trainer.fit(model, fdata)
        seconds = time.perf_counter() - start
        result = callback.task_results()[index]
        rows.append({
            "task": index, "seconds": seconds, "epochs": result.get("epochs"),
            "trainable_params": result["trainable_params"], "total_params": result["total_params"],
            **{k: result[f"test_{k}"] for k in ("acc_f", "acc_r", "acc_o")},
            **ver.measure(model, args.tasks, index, args.num_classes),
        })
    return rows


def run_finetune(args, data, state, ver) -> list[dict]:
    pl.seed_everything(args.seed, verbose=False)
    model = fresh_model(args, state)
    fdata = forgetting_data(args, data, None)
    fdata.setup("fit")
    rows = []
    for index in range(len(args.tasks)):
        task_view = view(args.tasks, index)
        fdata.set_forgetting_task(index, sorted(task_view.forgotten), sorted(task_view.old))
        module = FineTune(model, args.beta, args.bound, args.bound_per_sample, args.finetune_lr)
        start = time.perf_counter()
        quiet_trainer(max_epochs=args.finetune_epochs, default_root_dir=str(args.out)).fit(
            module, train_dataloaders=fdata.train_dataloader())
        seconds = time.perf_counter() - start
        trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
        rows.append({"task": index, "seconds": seconds, "epochs": args.finetune_epochs, "trainable_params": trainable,
                     "total_params": sum(p.numel() for p in model.parameters()),
                     **evaluate(model, data.test_set, task_view),
                     **ver.measure(model, args.tasks, index, args.num_classes)})
    return rows


def run_retrain(args, data, ver) -> list[dict]:
    fdata = forgetting_data(args, data, None)
    fdata.setup("fit")
    rows = []
    for index in range(len(args.tasks)):
        task_view = view(args.tasks, index)
        fdata.set_forgetting_task(index, sorted(task_view.forgotten), sorted(task_view.old))
        pl.seed_everything(args.seed, verbose=False)
        model = fresh_model(args, None)
        start = time.perf_counter()
        quiet_trainer(max_steps=args.retrain_steps, default_root_dir=str(args.out)).fit(
            model, train_dataloaders=DataLoader(fdata.retain_dataset(), batch_size=64, shuffle=True))
        seconds = time.perf_counter() - start
        total = sum(p.numel() for p in model.parameters())
        rows.append({"task": index, "seconds": seconds, "epochs": None, "trainable_params": total,
                     "total_params": total, **evaluate(model, data.test_set, task_view),
                     **ver.measure(model, args.tasks, index, args.num_classes)})
    return rows


def add_before(rows: list[dict], before: list[dict]) -> None:
    for row, reference in zip(rows, before):
        for key in ("auc_r", "auc_f", "auc_heldout"):
            row[f"{key}_before"] = reference[key]


# -- report -------------------------------------------------------------------------------------------------------
COLUMNS = ["task", "h", "acc_r", "acc_f", "acc_o", "acc_r_before", "acc_f_before", "auc_r_before", "auc_r",
           "auc_f_before", "auc_f", "auc_heldout_before", "auc_heldout", "trainable_params", "trainable_ratio",
           "epochs", "seconds"]


def summary_table(results: dict) -> list[str]:
    """One line per method and task: the Tab. 3 shape plus the verification columns."""
    header = ("| method | task | Acc_f | Acc_r (before) | Acc_o | H | AUC_r before -> after | AUC_f before -> after | "
              "AUC held-out before -> after | trainable | s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def f(value, fmt=".1f") -> str:
        return "-" if value is None else format(value, fmt)

    for method, rows in results.items():
        for r in rows:
            lines.append(
                f"| {method} | {r['task']} | {f(r['acc_f'])} | {f(r['acc_r'])} ({f(r['acc_r_before'])}) | "
                f"{f(r['acc_o'])} | {f(r['h'])} | {f(r['auc_r_before'], '.2f')} -> {f(r['auc_r'], '.2f')} | "
                f"{f(r['auc_f_before'], '.2f')} -> {f(r['auc_f'], '.2f')} | "
                f"{f(r['auc_heldout_before'], '.2f')} -> {f(r['auc_heldout'], '.2f')} | "
                f"{r['trainable_params']:,} ({100 * r['trainable_ratio']:.1f} %) | {r['seconds']:.0f} |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, rows in results.items():
        tasks = [r["task"] for r in rows]
        for ax, key in zip(axes, ("acc_f", "acc_r", "auc_r")):
            ax.plot(tasks, [math.nan if r[key] is None else r[key] for r in rows], "o-", label=method)
    titles = ("Acc_f (lower is better)", "Acc_r (higher is better)", "verification AUC, retained ids")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("task")
        ax.set_ylabel("% (test views)")
        ax.set_xticks(sorted({r["task"] for rows in results.values() for r in rows}))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def how_run(args: argparse.Namespace, command: str) -> list[str]:
    few = with_overrides(args, args.fewshot)
    bound = "per-sample bound" if args.bound_per_sample else "batch-mean bound"
    stop = "GSLoRA early_stop on (cap" if args.early_stop else "fixed epochs ("
    return [
        "## How this was run", "",
        f"`{command}` on CPU, {args.threads} torch thread(s), seed {args.seed} (pretraining, replay sampling, "
        f"LoRA init, pairs), torch {torch.__version__}, lightning {pl.__version__}, Python "
        f"{platform.python_version()}.", "",
        f"- model: `FaceRecognizer(**{MODELS[args.size]})`, CosFace s=30 m=0.35, pretrained {args.pretrain_steps} "
        f"steps at batch 64, lr {args.pretrain_lr:g}; data `FaceDataModule(**{DATA[args.size]})`; "
        f"forgetting sees logit_scale {args.logit_scale:g}.",
        f"- GS-LoRA / GS-LoRA++: LoRA rank 8 on `{args.target}`, replay {args.replay_ratio:g}, batch "
        f"{args.batch_size}, lr {args.lr:g}, beta {args.beta:g}, BND {args.bound:g} ({bound}), alpha "
        f"{args.alpha:g}, {stop} {args.task_epochs} epochs); GS-LoRA++ w_f {args.proto_weight:g}, BND_pro "
        f"{args.proto_bound:g}, w_r {args.proto_retain_weight:g}.",
        f"- 4-shot: 4 views per identity, batch 4, overrides `{args.fewshot}` ({few.task_epochs} epochs cap).",
        f"- fine-tuning: every weight but the head, lr {args.finetune_lr:g}, same loss, {args.finetune_epochs} "
        "epochs per task.",
        f"- retrain: fresh model, {args.retrain_steps} steps at batch 64 on the retained identities' replay data.",
        f"- Acc_* on the test views ({args.eval_views} per identity); `_before` = the pretrained model. AUC_r: all "
        "same-identity pairs of the retained identities' test views + as many different pairs; AUC_f the same for "
        f"the task's forgotten identities; AUC held-out: pairs of the {100 - args.num_classes} never-trained "
        "identities (FaceDataModule's test pairs).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/face_forgetting"))
    parser.add_argument("--size", choices=sorted(MODELS), default="full")
    parser.add_argument("--cache", type=Path, default=None,
                        help="pretrained weights cache (default: "
                        "<tmp>/lightning-plugins-face-forgetting-<size>-<seed>.pt)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, 2 tasks of 2 identities")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tasks", type=int, default=4, help="number of forgetting tasks")
    parser.add_argument("--ids-per-task", type=int, default=10, help="identities forgotten per task")
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--logit-scale", type=float, default=8.0)
    parser.add_argument("--target", choices=sorted(TARGETS), default="ffn+readout")
    parser.add_argument("--task-epochs", type=int, default=20)
    parser.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--replay-ratio", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.2)
    parser.add_argument("--bound", type=float, default=6.0)
    parser.add_argument("--bound-per-sample", action=argparse.BooleanOptionalAction, default=True,
                        help="bound each forgotten sample's CE (default) or the batch mean as in the paper")
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--proto-weight", type=float, default=0.01)
    parser.add_argument("--proto-bound", type=float, default=18.0)
    parser.add_argument("--proto-retain-weight", type=float, default=0.0)
    parser.add_argument("--fewshot", default=FEWSHOT, help="'key=value,...' overrides for the 4-shot run")
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--retrain-steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    command = "python benchmarks/face_forgetting.py " + " ".join(sys.argv[1:])
    if args.quick:
        args.size, args.pretrain_steps, args.retrain_steps = "quick", 150, 60
        args.task_epochs, args.finetune_epochs, args.tasks, args.ids_per_task = 6, 4, 2, 2
        args.fewshot = "task_epochs=6"
    args.num_classes = DATA[args.size].get("train_identities", 80)
    args.eval_views = DATA[args.size].get("eval_views", 10)
    if args.tasks * args.ids_per_task >= args.num_classes:
        raise SystemExit(f"{args.tasks} tasks x {args.ids_per_task} identities leave no retained identity")
    args.tasks = [list(range(t * args.ids_per_task, (t + 1) * args.ids_per_task)) for t in range(args.tasks)]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"seed {args.seed}, {torch.get_num_threads()} torch thread(s), tasks {args.tasks}")

    total_start = time.perf_counter()
    data = FaceDataModule(batch_size=64, seed=args.seed, **DATA[args.size])
    data.setup()
    ver = Verification(data, args.seed)
    state, pretrain_seconds = pretrain(args, data)
    pretrained = fresh_model(args, state)
    before = [{**evaluate(pretrained, data.test_set, view(args.tasks, t)),
               **ver.measure(pretrained, args.tasks, t, args.num_classes)} for t in range(len(args.tasks))]

    runners = {
        "gslora": lambda: run_gslora(args, data, state, ver, False, None, "gslora"),
        "gslora++": lambda: run_gslora(args, data, state, ver, True, None, "gslora++"),
        "gslora-4shot": lambda: run_gslora(args, data, state, ver, False, 4, "gslora-4shot"),
        "finetune": lambda: run_finetune(args, data, state, ver),
        "retrain": lambda: run_retrain(args, data, ver),
    }
    results: dict[str, list[dict]] = {}
    method_seconds: dict[str, float] = {}
    for method in args.methods.split(","):
        if method not in runners:
            raise SystemExit(f"unknown method {method!r}; choose from {sorted(runners)}")
        start = time.perf_counter()
        results[method] = runners[method]()
        add_h(results[method], before)
        add_before(results[method], before)
        method_seconds[method] = time.perf_counter() - start
        print(f"{method}: {method_seconds[method]:.0f} s")
        # rewritten after every method, so an interrupted run keeps what it measured
        lines = write_outputs(args, command, results, before, pretrain_seconds, method_seconds,
                              time.perf_counter() - total_start)
    print("\n".join(lines))


def write_outputs(args, command: str, results: dict, before: list[dict], pretrain_seconds: float,
                  method_seconds: dict, total_seconds: float) -> list[str]:
    """Write results.md, results.json and the plot for the methods run so far; return the markdown lines."""
    pending = [m for m in args.methods.split(",") if m not in results]
    lines = [f"# Continual forgetting of face identities ({args.size} vit_face_small, {len(args.tasks)} tasks x "
             f"{args.ids_per_task} identities)", "",
             f"Seed {args.seed}, {args.threads} torch thread(s). Pretraining: {pretrain_seconds:.0f} s; whole run "
             f"{total_seconds:.0f} s (" + ", ".join(f"{m} {s:.0f} s" for m, s in method_seconds.items()) + ")"
             + (f"; not run yet: {', '.join(pending)}" if pending else "") + ".", "",
             "Pretrained model per task (Acc_r/Acc_f %, AUC_r): " + ", ".join(
                 f"{b['acc_r']:.1f}/{b['acc_f']:.1f}, {b['auc_r']:.2f}" for b in before)
             + f"; held-out AUC {before[0]['auc_heldout']:.2f}.", "",
             "## Summary (test views; accuracies and AUCs in %)", "", *summary_table(results), ""]
    for method, rows in results.items():
        lines += [f"## {method}", "", "```", format_table(rows, COLUMNS), "```", ""]
    lines += how_run(args, command)
    (args.out / "results.md").write_text("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "seed": args.seed, "threads": args.threads, "pretrain_seconds": pretrain_seconds,
         "total_seconds": total_seconds, "method_seconds": method_seconds, "before": before, "results": results},
        indent=1))
    plot(results, args.out / "face_forgetting.png")
    return lines


if __name__ == "__main__":
    main()
