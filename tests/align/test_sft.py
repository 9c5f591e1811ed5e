"""SFTModule: exact global token normalization (accumulation, simulated DDP), learning, LoRA, checkpoints, CLI.

Batches are built by hand per contract 3 so these tests do not depend on the data module.
"""

from __future__ import annotations

import copy
import math
import time

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from align_helpers import tiny_trainer

from lightning_plugins.modules.align.loading import load_causal_lm, load_tokenizer
from lightning_plugins.modules.align.sft import SFTModule

pytestmark = [pytest.mark.usefixtures("quiet_lightning"), pytest.mark.filterwarnings("ignore::UserWarning")]

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}


def sft_batch(tokenizer, pairs, window_tokens=None):
    """Right-padded contract-3 batch from (prompt, completion) strings; EOS closes every completion."""
    rows, label_rows = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        label_rows.append([-100] * len(p) + c)
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    own = int((labels[:, 1:] != -100).sum())
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "window_tokens": torch.tensor(own if window_tokens is None else window_tokens)}


def count(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def union_token_mean_grads(model, batches):
    """Plain PyTorch: gradient of sum of target-token NLL over all batches / total target tokens."""
    model = copy.deepcopy(model)
    model.zero_grad()
    total = sum(count(b) for b in batches)
    loss = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = loss + F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100,
                                      reduction="sum")
    (loss / total).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class GradRecorder(pl.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n[len("model."):]: p.grad.clone() for n, p in pl_module.named_parameters()}


@pytest.fixture
def micro_batches(tokenizer):
    first = [("2+3=", "5"), ("hello ", "world, this is long")]
    second = [("abc", "d"), ("x", "yz"), ("q", "")]
    a, b = sft_batch(tokenizer, first), sft_batch(tokenizer, second)
    window = count(a) + count(b)
    assert count(a) != count(b)  # unequal token counts: a per-micro-batch mean would be wrong
    a["window_tokens"] = b["window_tokens"] = torch.tensor(window)
    return [a, b]


def test_accumulated_gradient_equals_union_token_mean(tokenizer, micro_batches, one_torch_thread):
    torch.manual_seed(0)
    module = SFTModule(TINY, tokenizer="char", lr=1e-3)
    reference = union_token_mean_grads(module.model, micro_batches)
    recorder = GradRecorder()
    loader = torch.utils.data.DataLoader(micro_batches, batch_size=None)
    tiny_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[recorder]).fit(module, loader)
    assert recorder.grads is not None and recorder.grads.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(recorder.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # the naive per-micro-batch mean differs clearly: the test can tell them apart
    first = union_token_mean_grads(module.model, micro_batches[:1])
    second = union_token_mean_grads(module.model, micro_batches[1:])
    naive = {n: 0.5 * (first[n] + second[n]) for n in first}
    assert max((naive[n] - g).abs().max().item() for n, g in reference.items()) > 1e-4


def test_simulated_ddp_and_accumulation_average_to_global_token_mean(tokenizer, one_torch_thread):
    torch.manual_seed(1)
    module = SFTModule(TINY, tokenizer="char")
    ranks = [
        [sft_batch(tokenizer, [("a", "bcd"), ("e", "f")]), sft_batch(tokenizer, [("gh", "ijklmnop")])],
        [sft_batch(tokenizer, [("q", "r")]), sft_batch(tokenizer, [("s", "tu"), ("v", "wxyz"), ("0", "1")])],
    ]
    for windows in ranks:  # window_tokens = this rank's tokens over its accumulation window
        for b in windows:
            b["window_tokens"] = torch.tensor(sum(count(x) for x in windows))
    global_tokens = sum(count(b) for windows in ranks for b in windows)
    accumulate, world = 2, 2
    grads = {n: torch.zeros_like(p) for n, p in module.model.named_parameters()}
    for windows in ranks:
        for b in windows:
            module.zero_grad()
            loss, _ = module.compute_loss(b, accumulate, world, reduce_sum=lambda t: torch.tensor(float(global_tokens)))
            (loss / accumulate).backward()  # what Lightning does with the returned loss
            for n, p in module.model.named_parameters():
                grads[n] += p.grad / world  # DDP averages over ranks
    reference = union_token_mean_grads(module.model, [b for windows in ranks for b in windows])
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_loss_without_trainer_is_the_token_mean(tokenizer):
    torch.manual_seed(2)
    module = SFTModule(TINY, tokenizer="char")
    batch = sft_batch(tokenizer, [("1+1=", "2"), ("say hi", " hi there")])
    loss = module.training_step(batch, 0)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert abs(loss.item() - expected.item()) < 1e-6
    del batch["window_tokens"]
    assert abs(module.training_step(batch, 0).item() - expected.item()) < 1e-6


def test_learns_a_deterministic_task_quickly(tokenizer, one_torch_thread):
    """Tiny Llama, 'a+b=' -> (a+b) mod 10: the validation loss must fall by 10x within a couple of seconds."""
    pairs = [(f"{a}+{b}=", str((a + b) % 10)) for a in range(10) for b in range(10)]
    batch = sft_batch(tokenizer, pairs)
    torch.manual_seed(0)
    module = SFTModule(TINY, tokenizer="char", lr=3e-3, warmup_steps=10)
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    before = tiny_trainer().validate(module, loader, verbose=False)[0]["val/loss"]
    start = time.perf_counter()
    tiny_trainer(max_steps=250).fit(module, loader)
    elapsed = time.perf_counter() - start
    after = tiny_trainer().validate(module, loader, verbose=False)[0]
    assert before > 2.0  # about ln(vocab) at init
    assert after["val/loss"] < before / 10, (before, after)
    assert after["val/token_accuracy"] > 0.95
    assert after["val/num_tokens"] == count(batch)
    assert elapsed < 60


def test_lora_trains_only_the_adapters(tokenizer, one_torch_thread):
    torch.manual_seed(3)
    module = SFTModule(TINY, tokenizer="char", lr=1e-2,
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batch = sft_batch(tokenizer, [("ab", "cd"), ("ef", "gh")])
    tiny_trainer(max_steps=2).fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_checkpoint_round_trip_and_optimizer(tokenizer, tmp_path, one_torch_thread):
    torch.manual_seed(4)
    module = SFTModule(TINY, tokenizer="char", lr=1e-3, warmup_steps=4, weight_decay=0.1)
    batch = sft_batch(tokenizer, [("ab", "cd")])
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    path = tmp_path / "sft.ckpt"
    trainer.save_checkpoint(path)
    restored = SFTModule.load_from_checkpoint(path)
    for (n, p), q in zip(module.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(p, q), n
    config = restored.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert [g["weight_decay"] for g in config["optimizer"].param_groups] == [0.1, 0.0]
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 / 4)
    for _ in range(5):
        config["optimizer"].step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_prebuilt_model_and_generate(tokenizer):
    torch.manual_seed(5)
    lm = load_causal_lm(TINY, tokenizer=tokenizer)
    module = SFTModule(lm, tokenizer=tokenizer)
    assert module.model is lm and "model" not in module.hparams and "tokenizer" not in module.hparams
    texts = module.generate(["1+2=", "hello"], max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) and len(t) <= 3 for t in texts)


def test_dropout_disabled_and_errors(tokenizer):
    module = SFTModule({**TINY, "attention_dropout": 0.3}, tokenizer="char")
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in module.model.model.layers)
    with pytest.raises(ValueError, match="lr"):
        SFTModule(TINY, lr=0.0)
    with pytest.raises(TypeError, match="model"):
        SFTModule(3)
    with pytest.raises(ValueError, match="labels"):
        module.training_step({"input_ids": torch.ones(1, 3, dtype=torch.long)}, 0)
    with pytest.raises(TypeError, match="lora"):
        SFTModule(TINY, lora=["q_proj"])


def test_cli_builds_from_a_yaml_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "sft.yaml"
    config.write_text(
        "model:\n  model:\n    model_type: llama\n    hidden_size: 32\n    intermediate_size: 64\n"
        "    num_hidden_layers: 1\n    num_attention_heads: 4\n  tokenizer: char\n  lr: 0.001\n"
        "  lora:\n    r: 2\n    target_modules: [q_proj]\n"
    )
    cli = LightningCLI(SFTModule, run=False, args=["--config", str(config)], save_config_callback=None,
                       trainer_defaults={"accelerator": "cpu", "logger": False})
    assert isinstance(cli.model, SFTModule)
    assert cli.model.hparams.model["hidden_size"] == 32 and cli.model.hparams.lora["r"] == 2
    assert math.isclose(cli.model.hparams.lr, 1e-3)


def test_with_the_real_sft_datamodule_accumulation_is_exact(tmp_path, one_torch_thread):
    """End to end with ``data.SFTDataModule`` (its window_tokens): one step over two micro-batches of 2 rows."""
    import json

    from lightning_plugins.modules.align.data import SFTDataModule

    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "tell me", "completion": " a much longer answer"},
            {"prompt": "x", "completion": "yz"}, {"prompt": "q", "completion": "r"},
            {"prompt": "unused", "completion": "row"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = SFTDataModule("char", train_path=str(path), template="plain", batch_size=2, shuffle=False)
    torch.manual_seed(6)
    module = SFTModule(TINY, tokenizer="char")
    data.setup("fit")
    collate = data._collator()
    micro = [collate([data.dataset("train")[i] for i in idx]) for idx in ([0, 1], [2, 3])]
    assert count(micro[0]) != count(micro[1])
    reference = union_token_mean_grads(module.model, micro)
    recorder = GradRecorder()
    tiny_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[recorder]).fit(module, datamodule=data)
    for name, grad in reference.items():
        torch.testing.assert_close(recorder.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_trains_under_fp8_msamp_precision(tokenizer, one_torch_thread):
    """The module is plain nn.Linear code: the FP8 plugin converts its linears and training still reduces the loss."""
    import lightning_plugins  # noqa: F401  (registers precision="fp8-msamp")

    torch.manual_seed(8)
    module = SFTModule(TINY, tokenizer="char", lr=1e-3)
    batch = sft_batch(tokenizer, [("ab", "cd"), ("e", "fgh")])
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = tiny_trainer(max_steps=4, precision="fp8-msamp", callbacks=[Record()])
    trainer.fit(
        module, torch.utils.data.DataLoader([batch], batch_size=None))
    converted = {d.name for d in trainer.precision_plugin.conversion_report.converted}
    assert "model.model.layers.0.self_attn.q_proj" in converted
    assert type(module.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # plain again after the run
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_export_dir_writes_a_folder_the_next_stage_loads(tmp_path, one_torch_thread):
    """The exported folder reloads through `load_causal_lm` with the trained weights (LoRA merged)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_plugins.modules.align.loading import load_causal_lm, load_tokenizer

    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 32}
    batch = {"input_ids": torch.tensor([[2, 20, 21, 22, 1]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 21, 22, 1]]), "window_tokens": torch.tensor(3)}
    for lora in (None, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}):
        torch.manual_seed(0)
        out = tmp_path / ("lora" if lora else "full")
        module = SFTModule(model=config, lr=1e-2, lora=lora, export_dir=str(out))
        pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu").fit(module, DataLoader([batch] * 3, batch_size=None))
        reloaded = load_causal_lm(str(out), load_tokenizer(str(out)))
        module.eval()
        with torch.no_grad():
            expected = module(batch["input_ids"])
            got = reloaded(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not any("lora" in key for key in reloaded.state_dict())
