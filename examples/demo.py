"""The README demo: a Vision Transformer trained on 5,000 real MNIST digits, then tested.

The recipe is the CLI config ``examples/configs/vit_mnist5k.yaml`` (the same one
``lightning-plugins fit --config examples/configs/vit_mnist5k.yaml`` runs). Extra command-line arguments are
passed through as config overrides, e.g. ``python examples/demo.py --trainer.max_epochs=5``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from lightning_plugins.cli import LightningPluginsCLI

CONFIG = Path(__file__).resolve().parent / "configs" / "vit_mnist5k.yaml"


def train_and_test(config: Path, overrides: list[str]) -> dict[str, float]:
    """Build model, data and trainer from ``config``; fit; test; return the figures."""
    cli = LightningPluginsCLI(args=["--config", str(config), *overrides], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {
        "parameters": sum(p.numel() for p in cli.model.parameters()),
        "epochs": cli.trainer.current_epoch,
        "fit_seconds": fit_seconds,
        "test_acc": result["test/acc"],
        "test_images": len(cli.datamodule.test_set),
    }


def main(argv: list[str]) -> None:
    print(f"lightning-plugins demo: {CONFIG.name} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    figures = train_and_test(CONFIG, argv)
    print()
    print("| run | parameters | epochs | fit time | test accuracy |")
    print("|---|---|---|---|---|")
    print(
        f"| ViT, 32-true | {figures['parameters']:,} | {figures['epochs']} | {figures['fit_seconds']:.0f} s "
        f"| {100 * figures['test_acc']:.2f} % of {figures['test_images']} |"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
