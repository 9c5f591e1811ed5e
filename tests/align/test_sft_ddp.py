"""SFTModule under real DDP (2 CPU processes, gloo) with gradient accumulation: the optimizer step's gradient is the
token mean over every target token of the step on both ranks, although the ranks' micro-batches hold very different
token counts."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

from lightning_plugins.modules.align import SFTDataModule, SFTModule, write_jsonl
from lightning_plugins.modules.losses import sequence_logps

CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 2, "max_position_embeddings": 64}
# completions of 1 to 60 characters: however Lightning's DistributedSampler (which shuffles training data under DDP
# whatever the DataModule says) deals them out, the four micro-batches hold very different token counts
ROWS = [{"prompt": "q", "completion": "x" * n} for n in (1, 2, 4, 8, 16, 32, 48, 60)]


class Record(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.batches = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.cpu() for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "batches": self.batches},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_two_ranks_two_accumulation_steps_give_the_global_token_mean(tmp_path, quiet_lightning):
    write_jsonl(ROWS, tmp_path / "sft.jsonl")
    torch.manual_seed(0)
    module = SFTModule(model=CONFIG, lr=1e-3)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    data = SFTDataModule(train_path=str(tmp_path / "sft.jsonl"), template="plain", max_length=64, batch_size=2,
                         shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, accumulate_grad_batches=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[Record(str(tmp_path))])
    trainer.fit(module, data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    batches = [b for rank in ranks for b in rank["batches"]]
    assert len(batches) == 4
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert max(counts) > 3 * min(counts)  # the micro-batches are far from equal

    # reference: plain PyTorch, the token-mean NLL over the union of the four micro-batches, initial weights
    reference = SFTModule(model=CONFIG)
    reference.load_state_dict(initial)
    total = 0.0
    for b in batches:
        logits = reference(b["input_ids"], b["attention_mask"])
        total = total - sequence_logps(logits, b["labels"]).logps.sum()
    (total / sum(counts)).backward()
    for name, param in reference.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=1e-4, atol=1e-7, msg=name)

    # the usual per-micro-batch token mean (averaged over micro-batches and ranks) is a different gradient here
    naive = SFTModule(model=CONFIG)
    naive.load_state_dict(initial)
    loss = sum(-sequence_logps(naive(b["input_ids"], b["attention_mask"]), b["labels"]).logps.sum() / count
               for b, count in zip(batches, counts)) / len(batches)
    loss.backward()
    weight = "model.lm_head.weight"
    assert not torch.allclose(dict(naive.named_parameters())[weight].grad, ranks[0]["grads"][weight], rtol=1e-2)
