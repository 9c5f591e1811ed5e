"""The README demo: a Vision Transformer trained on 5,000 real MNIST digits, tested, then asked to forget.

1. ``examples/configs/vit_mnist5k.yaml`` (the recipe ``lightning-plugins fit`` runs): train, test, save weights.
2. ``examples/configs/gslora_mnist5k.yaml`` (the recipe ``lightning-plugins forget`` runs): from those weights,
   GS-LoRA erases digits {0,1}, then {2,3}, then {4,5}, and the per-task table is printed.

Extra command-line arguments override the training recipe, e.g. ``python examples/demo.py --trainer.max_epochs=5``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_plugins.cli import fit_and_test, forget_from_config

CONFIGS = Path(__file__).resolve().parent / "configs"
WEIGHTS = Path("outputs") / "demo" / "vit_mnist5k.pt"


def main(argv: list[str]) -> None:
    print(f"lightning-plugins demo (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    print("\n== 1/2: train the ViT on MNIST-5k (examples/configs/vit_mnist5k.yaml) ==")
    figures = fit_and_test(CONFIGS / "vit_mnist5k.yaml", argv, save_weights=WEIGHTS)
    print("\nTraining (32-true)")
    print("| parameters | epochs | fit time | test accuracy |")
    print("|---|---|---|---|")
    print(
        f"| {figures['parameters']:,} | {figures['epochs']} | {figures['fit_seconds']:.0f} s "
        f"| {100 * figures['test/acc']:.2f} % of {figures['test_samples']} test images |"
    )
    print("\n== 2/2: forget digits {0,1}, then {2,3}, then {4,5} with GS-LoRA (examples/configs/gslora_mnist5k.yaml) ==")
    print("accuracies in %: f = classes forgotten in this task, r = retained classes, o = classes forgotten earlier")
    forget_from_config(CONFIGS / "gslora_mnist5k.yaml", [f"--pretrained={WEIGHTS}"])


if __name__ == "__main__":
    main(sys.argv[1:])
