"""GSLoRA combined with FP8 training: ``Trainer(precision="fp8-msamp", callbacks=[GSLoRA(...)])``.

The precision plugin converts the model's Linear layers (the FFNs included) to FP8Linear before the callback wraps
the FFNs with LoRA; the adapters train in fp32 on top of the frozen FP8 layers and merge into their weights at the
end of each task. At the end of each task's run the plugin swaps the FP8 layers back to plain nn.Linear, so the
next task's Trainer (a new plugin) converts them again and the model that comes out is plain and portable.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_plugins  # noqa: F401  (registers precision="fp8-msamp")
from lightning_plugins.callbacks import ForgettingDataModule, GSLoRA
from lightning_plugins.callbacks.gslora.lora import find_lora
from lightning_plugins.fp8 import FP8Linear

TASKS = [[0, 1], [2, 3]]


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_fp8_model_forgets_two_tasks(pretrained_vit, mnist, quiet, level):
    from lightning_plugins import MSAMPPrecision

    model = pretrained_vit()
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    callback = GSLoRA(TASKS, beta=0.1, bound=15.0, plots=False)
    for _ in TASKS:
        plugin = MSAMPPrecision(level=level)  # a new Trainer and plugin per task, as the CLI's `forget` builds them
        trainer = pl.Trainer(max_epochs=20, callbacks=[callback], plugins=[plugin], **quiet())
        trainer.fit(model, data)
        # O2 swaps the callback's AdamW over the adapters for FP8AdamW (FP8/FP16 moments; adapters stay fp32)
        assert type(trainer.optimizers[0]).__name__ == ("FP8AdamW" if level == "O2" else "AdamW")
    rows = callback.task_results()
    print("\n" + level + " " + str([{k: row[k] for k in ("acc_f_before", "acc_f", "acc_r_before", "acc_r")} for row in rows]))
    ffn = [m for n, m in model.named_modules() if n.endswith(("mlp.fc1", "mlp.fc2"))]
    assert ffn and all(type(m) is nn.Linear for m in ffn) and not find_lora(model)
    assert not [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for row in rows:
        assert row["acc_f_before"] > 70 and row["acc_f"] <= 10.0
        assert row["acc_r"] >= row["acc_r_before"] - 10.0
