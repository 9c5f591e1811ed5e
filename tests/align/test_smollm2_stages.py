"""The stages on a real pretrained model: SmolLM2-135M-Instruct from the offline GGUF wheel, with its ChatML template,
LoRA adapters and pad == eos (a few steps each; slow)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_plugins.modules.align import DPOModule, PreferenceDataModule, SFTDataModule, SFTModule, write_jsonl
from lightning_plugins.modules.align.loading import CACHE_ENV

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One dequantized copy of the GGUF for the module's tests (first load ~20 s)."""
    folder = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


@pytest.mark.slow
def test_lora_sft_step_moves_only_the_adapters(cache, tmp_path, one_torch_thread):
    rows = [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]},
            {"prompt": "Name a colour.", "completion": "Blue."}]
    write_jsonl(rows, tmp_path / "sft.jsonl")
    data = SFTDataModule(tokenizer=ALIAS, train_path=str(tmp_path / "sft.jsonl"), template="chatml", max_length=64,
                         batch_size=2, shuffle=False)
    module = SFTModule(model=ALIAS, tokenizer=ALIAS, lora=LORA, lr=1e-3)
    assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id  # the pitfall case
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(max_steps=2).fit(module, data)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.slow
def test_adapter_reference_dpo_starts_at_ln2_and_learns(cache, tmp_path, one_torch_thread):
    pairs = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
             {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}]
    write_jsonl(pairs, tmp_path / "pairs.jsonl")
    data = PreferenceDataModule(tokenizer=ALIAS, train_path=str(tmp_path / "pairs.jsonl"), template="chatml",
                                max_length=64, batch_size=2, shuffle=False)
    module = DPOModule(model=ALIAS, tokenizer=ALIAS, reference="adapter", lora=LORA, lr=1e-3)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(max_steps=4, callbacks=[Record()]).fit(module, data)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # fresh adapters: policy == reference
    assert losses[-1] < losses[0]
