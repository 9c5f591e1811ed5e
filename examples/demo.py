"""The README demo: a Vision Transformer trained on 5,000 real MNIST digits in fp32 and in FP8, then asked to forget.

1. ``examples/configs/vit_mnist5k.yaml`` (the recipe ``lightning-plugins fit`` runs): train, test, save weights.
2. ``examples/configs/vit_mnist5k_fp8.yaml``: the same recipe with ``trainer.precision: fp8-msamp`` (MS-AMP O2; on a
   CPU the FP8 arithmetic is emulated, so it is slower here; on a Hopper GPU it is the fast path). Accuracy and the
   training state per parameter (weights + gradients + Adam state) are printed beside the fp32 run.
3. ``examples/configs/gslora_mnist5k.yaml`` (the recipe ``lightning-plugins forget`` runs): from the fp32 weights,
   GS-LoRA erases digits {0,1}, then {2,3}, then {4,5}, and the per-task table is printed.
4. ``examples/configs/face_train.yaml``: a face recognizer (small hybrid ViT, CosFace) on the embedded instance
   identities (100 LFW faces from scikit-image, each its own identity, augmented views): closed-set identification
   on held-out views of 80 trained faces, verification on 20 faces it never saw.

Extra command-line arguments override the two MNIST training recipes, e.g.
``python examples/demo.py --trainer.max_epochs=5``; ``--threads N`` (default 2) sets the torch threads. The figures depend on it (and on the CPU code path, pinned to
AVX2 here, see :mod:`lightning_plugins.reproducible`), so they are printed with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_plugins.cli import fit_and_test, forget_from_config
from lightning_plugins.reproducible import pin_numerics

CONFIGS = Path(__file__).resolve().parent / "configs"
WEIGHTS = Path("outputs") / "demo" / "vit_mnist5k.pt"


DEFAULT_THREADS = 2  # the README's figures: 2 threads, the AVX2 code path


def main(argv: list[str]) -> None:
    threads, argv = _threads_option(argv)
    numerics = pin_numerics(threads, "avx2")
    print(f"lightning-plugins demo (torch {torch.__version__}, {numerics['threads']} CPU threads, "
          f"CPU code path {numerics['isa']}, deterministic algorithms)")
    print("\n== 1/4: train the ViT on MNIST-5k in fp32 (examples/configs/vit_mnist5k.yaml) ==")
    fp32 = fit_and_test(CONFIGS / "vit_mnist5k.yaml", argv, save_weights=WEIGHTS)
    print("\n== 2/4: the same recipe in FP8, precision=fp8-msamp (examples/configs/vit_mnist5k_fp8.yaml) ==")
    fp8 = fit_and_test(CONFIGS / "vit_mnist5k_fp8.yaml", argv)
    print_training_table({"32-true": fp32, "fp8-msamp (O2)": fp8})
    print("\n== 3/4: forget digits {0,1}, then {2,3}, then {4,5} with GS-LoRA "
          "(examples/configs/gslora_mnist5k.yaml) ==")
    print("accuracies in %: f = classes forgotten in this task, r = retained classes, o = classes forgotten earlier")
    forget_from_config(CONFIGS / "gslora_mnist5k.yaml", [f"--pretrained={WEIGHTS}"])
    print("\n== 4/4: face recognition on 100 LFW faces as instance identities (examples/configs/face_train.yaml) ==")
    face = fit_and_test(CONFIGS / "face_train.yaml", ["--trainer.check_val_every_n_epoch=100"])
    print(f"| face model | parameters | fit time | identification (held-out views) | verification on unseen faces |\n"
          f"|---|---|---|---|---|\n"
          f"| ViT + CosFace | {face['parameters']:,} | {face['fit_seconds']:.0f} s | {100 * face['test/acc']:.2f} % "
          f"| AUC {face['test/heldout/auc']:.4f}, 10-fold accuracy {100 * face['test/heldout/acc']:.2f} % |")


def _threads_option(argv: list[str]) -> tuple[int, list[str]]:
    """``--threads N`` / ``--threads=N`` out of ``argv`` (the rest are config overrides)."""
    threads, rest, args = DEFAULT_THREADS, [], iter(argv)
    for arg in args:
        if arg == "--threads":
            value = next(args, "")
        elif arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"demo: --threads needs a positive integer, got {value!r}")
        threads = int(value)
    return threads, rest


def print_training_table(runs: dict[str, dict]) -> None:
    print("\nTraining: fp32 vs FP8 (training state = weights + gradients + AdamW state, bytes per parameter)")
    print("| precision | parameters | epochs | fit time | test accuracy | test loss | training state |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        state = run["training_state"]
        print(
            f"| {name} | {run['parameters']:,} | {run['epochs']} | {run['fit_seconds']:.0f} s "
            f"| {100 * run['test/acc']:.2f} % of {run['test_samples']} | {run['test/loss']:.4f} "
            f"| {state['total_Bpp']:.2f} B/param ({state['total_bytes'] / 2**20:.1f} MiB) |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
