"""GSLoRA(proximal=True): the group lasso as a proximal step switches whole blocks off (exact zeros)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_plugins.callbacks import ForgettingDataModule, GSLoRA


def test_strong_proximal_lasso_switches_every_block_off(pretrained_vit, mnist, quiet):
    model = pretrained_vit()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    callback = GSLoRA([[0, 1]], beta=0.1, bound=15.0, proximal=True, alpha=1e3, plots=False)
    pl.Trainer(max_epochs=2, callbacks=[callback], **quiet()).fit(model, data)
    (row,) = callback.task_results()
    # every step shrinks each block's LoRA norm by lr * alpha = 10: all groups are exactly 0, nothing is merged
    assert row["zero_group_ratio"] == 1.0
    assert all(row[k] == 0.0 for k in row if k.startswith("group_norm/"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, pretrained[key]), key
    assert row["acc_f"] == row["acc_f_before"]


def test_moderate_proximal_lasso_keeps_forgetting(pretrained_vit, mnist, quiet):
    model = pretrained_vit()
    data = ForgettingDataModule(mnist, replay_ratio=0.1, batch_size=32, eval_batch_size=500)
    callback = GSLoRA([[0, 1]], beta=0.1, bound=15.0, proximal=True, alpha=0.1, plots=False)
    pl.Trainer(max_epochs=20, callbacks=[callback], **quiet()).fit(model, data)
    (row,) = callback.task_results()
    norms = [row[k] for k in row if k.startswith("group_norm/")]
    print("\nproximal alpha 0.1:", {k: row[k] for k in ("acc_f", "acc_r", "acc_r_before", "zero_group_ratio")}, norms)
    assert row["acc_f"] <= 5.0 and row["acc_r"] >= row["acc_r_before"] - 10.0
    assert row["zero_group_ratio"] == sum(n == 0.0 for n in norms) / len(norms)
