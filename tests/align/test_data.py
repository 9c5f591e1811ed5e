"""jsonl validation, truncation/drop policy, collated batches (contracts 3-5), accumulation windows, DataModules."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from lightning_plugins.modules.align.collate import PreferenceCollator, SFTCollator, WindowedBatchSampler
from lightning_plugins.modules.align.data import (
    PreferenceDataModule,
    PreferenceDataset,
    SFTDataModule,
    SFTDataset,
    read_jsonl,
)
from lightning_plugins.modules.align.loading import load_causal_lm, load_tokenizer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("char")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- jsonl validation

@pytest.mark.parametrize(
    ("kind", "line", "needles"),
    [
        ("sft", '{"prompt": "a", "completion": "b"', ["malformed JSON"]),
        ("sft", {"prompt": "a"}, ["'completion'", "missing"]),
        ("sft", {"prompt": "a", "completion": 3}, ["'completion'", "string"]),
        ("sft", {"prompt": "a", "completion": "  "}, ["'completion'", "empty"]),
        ("sft", {"messages": [{"role": "user", "content": "x"}]}, ["assistant"]),
        ("sft", {"messages": [{"role": "bot", "content": "x"}]}, ["role"]),
        ("sft", [1, 2], ["object"]),
        ("preference", {"prompt": "a", "chosen": "b"}, ["'rejected'", "missing"]),
        ("preference", {"prompt": "a", "chosen": "", "rejected": "c"}, ["'chosen'", "empty"]),
        ("preference", {"prompt": "a", "chosen": "b", "rejected": "c", "margin": "1"}, ["'margin'"]),
        ("preference", {"prompt": 1, "chosen": "b", "rejected": "c"}, ["'prompt'", "string"]),
        ("multi", {"prompt": "a", "responses": ["x", "y"], "scores": [1.0]}, ["scores"]),
        ("prompts", {"text": "a"}, ["'prompt'"]),
    ],
)
def test_bad_rows_name_file_line_key_and_fix(tmp_path, kind, line, needles):
    good = {"sft": {"prompt": "p", "completion": "c"}, "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
            "multi": {"prompt": "p", "responses": ["x"], "scores": [0.5]}, "prompts": {"prompt": "p"}}[kind]
    path = write(tmp_path / "d.jsonl", [good, "", line])  # the bad row is on line 3 (blank line 2 is skipped)
    with pytest.raises(ValueError) as err:
        read_jsonl(path, kind)
    msg = str(err.value)
    assert f"{path}:3" in msg and "{\"prompt\": str" in msg  # names the place and shows the format
    for needle in needles:
        assert needle in msg


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no rows"):
        read_jsonl(empty, "sft")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl", "sft")
    with pytest.raises(ValueError, match="kind"):
        read_jsonl(empty, "chat")


# ---------------------------------------------------------------- SFT rows, truncation, batches

def test_sft_rows_and_batch_match_hand_construction(tok):
    rows = [{"prompt": "1+2=", "completion": "3"},
            {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
                          {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]}]
    ds = SFTDataset(rows, tok, "plain", max_length=32)
    eos = tok.eos_token_id
    assert ds[0] == {"input_ids": ids(tok, "1+2=3") + [eos], "loss_mask": [0, 0, 0, 0, 1, 1]}
    assert ds[1]["input_ids"] == ids(tok, "abcd") + [eos] + ids(tok, "ef") + [eos]
    assert ds[1]["loss_mask"] == [0, 0, 1, 1, 1, 0, 1, 1]
    assert ds.num_target_tokens == [2, 5] and ds.dropped == {}
    batch = SFTCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "window_tokens"}
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
    want_ids = torch.tensor([ds[0]["input_ids"] + [0, 0], ds[1]["input_ids"]])
    assert torch.equal(batch["input_ids"], want_ids)
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 6 + [0, 0], [1] * 8]))
    m = -100
    assert batch["labels"][0].tolist() == [m, m, m, m, ids(tok, "3")[0], eos, m, m]
    assert batch["window_tokens"].ndim == 0 and batch["window_tokens"].item() == 7


def test_labels_work_with_hf_llama_loss(tok):
    ds = SFTDataset([{"prompt": "12+3=", "completion": "15"}, {"prompt": "1+1=", "completion": "2"}], tok, "plain")
    batch = SFTCollator(tok.pad_token_id)([ds[0], ds[1]])
    torch.manual_seed(0)
    model = load_causal_lm({"model_type": "llama", **TINY}, tok)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    target = batch["labels"][:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep]
    assert keep.sum() == batch["window_tokens"]
    torch.testing.assert_close(out.loss.double(), nll.mean(), rtol=1e-5, atol=1e-6)


def test_sft_truncation_and_drop_policy(tok, tmp_path, caplog):
    path = write(tmp_path / "t.jsonl", [
        {"prompt": "abcdef", "completion": "x"},    # prompt 6 >= max_length 6: dropped
        {"prompt": "abcdefgh", "completion": "x"},  # dropped
        {"prompt": "abc", "completion": "wxyz"},    # 3 + 5 tokens -> completion cut to "wxy" (EOS lost)
        {"prompt": "abcde", "completion": "z"},     # keeps exactly one completion token
    ])
    with caplog.at_level(logging.WARNING, logger="lightning_plugins.modules.align.data"):
        ds = SFTDataset.from_jsonl(path, tok, "plain", max_length=6)
    assert ds.dropped == {"prompt_too_long": 2}
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        f"{path}: dropped 2 of 4 rows (prompt_too_long: the prompt alone leaves no room for a completion token); "
        "raise max_length (now 6) to keep them."
    ]
    assert ds[0] == {"input_ids": ids(tok, "abcwxy"), "loss_mask": [0, 0, 0, 1, 1, 1]}
    assert ds[1] == {"input_ids": ids(tok, "abcdez"), "loss_mask": [0, 0, 0, 0, 0, 1]}
    with pytest.raises(ValueError, match="raise max_length"):
        SFTDataset.from_jsonl(path, tok, "plain", max_length=3)


def test_window_tokens_sum_over_accumulation_window():
    counts = [1, 2, 3, 4, 5, 6, 7]  # row i has counts[i] target tokens
    sampler = WindowedBatchSampler(list(range(7)), batch_size=2, drop_last=False, accumulate_grad_batches=2,
                                   token_counts=counts)
    batches = list(sampler)
    assert [[i for i, _ in b] for b in batches] == [[0, 1], [2, 3], [4, 5], [6]]
    # windows: {b0, b1} -> 1+2+3+4 = 10, {b2, b3} -> 5+6+7 = 18; the incomplete last window counts its own batches.
    assert [{w for _, w in b} for b in batches] == [{10}, {10}, {18}, {18}]
    sampler3 = WindowedBatchSampler(list(range(7)), 2, False, 3, counts)
    assert [b[0].window_tokens for b in sampler3] == [21, 21, 21, 7]
    assert len(sampler3) == 4
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        WindowedBatchSampler(list(range(7)), 2, False, 0, counts)


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in batch.items()})
        return self.w * 0 + (batch["labels"] != -100).sum().float() * self.w

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_sft_datamodule_windows_under_trainer(tmp_path, quiet_lightning):
    rows = [{"prompt": "p" * (i % 3 + 1), "completion": "c" * (i % 4 + 1)} for i in range(7)]
    path = write(tmp_path / "s.jsonl", rows)
    dm = SFTDataModule(tokenizer="char", train_path=path, template="plain", batch_size=2, seed=1)
    assert dm.hparams.batch_size == 2 and dm.hparams.val_path is None and dm.tokenizer is dm.tokenizer
    module = _Recorder()
    _trainer(max_epochs=2, accumulate_grad_batches=3).fit(module, datamodule=dm)
    seen = module.seen
    assert len(seen) == 8  # 4 batches per epoch
    own = [int((b["labels"][:, 1:] != -100).sum()) for b in seen]
    for epoch in range(2):
        e_own, e_seen = own[epoch * 4:(epoch + 1) * 4], seen[epoch * 4:(epoch + 1) * 4]
        assert [int(b["window_tokens"]) for b in e_seen] == [sum(e_own[:3])] * 3 + [e_own[3]]
    assert sum(own[:4]) == sum(len(r["completion"]) + 1 for r in rows)  # every completion token + EOS counted once
    assert dm.val_dataloader() == []


def test_sft_datamodule_validation_counts_own_batch(tmp_path, tok):
    path = write(tmp_path / "s.jsonl", [{"prompt": "ab", "completion": "cde"}] * 3)
    dm = SFTDataModule(train_path=path, val_path=path, template="plain", batch_size=2, shuffle=False)
    batches = list(dm.val_dataloader())
    assert [int(b["window_tokens"]) for b in batches] == [8, 4]


def test_datamodule_argument_errors(tmp_path):
    path = write(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(FileNotFoundError, match="val_path"):
        SFTDataModule(train_path=path, val_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="max_length"):
        SFTDataModule(train_path=path, max_length=1)
    with pytest.raises(ValueError, match="vicuna_v1.1"):
        PreferenceDataModule(train_path=path, template="nope")


# ---------------------------------------------------------------- preference rows and batches

def test_preference_same_rule_both_sides_and_batch_layout(tok, tmp_path, caplog):
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "ab", "chosen": "cdefgh", "rejected": "x", "margin": 1.5},  # chosen cut to fit, rejected kept
        {"prompt": "abcdefg", "chosen": "c", "rejected": "d"},                  # prompt too long: pair dropped
        {"prompt": "a", "chosen": "z", "rejected": "yy"},
    ])
    with caplog.at_level(logging.WARNING, logger="lightning_plugins.modules.align.data"):
        ds = PreferenceDataset.from_jsonl(path, tok, "plain", max_length=5)
    assert ds.dropped == {"prompt_too_long": 1} and len(ds) == 2
    assert sum("dropped 1 of 3 rows" in r.getMessage() for r in caplog.records) == 1
    eos = tok.eos_token_id
    assert ds[0]["chosen_ids"] == ids(tok, "abcde") and ds[0]["chosen_mask"] == [0, 0, 1, 1, 1]
    assert ds[0]["rejected_ids"] == ids(tok, "abx") + [eos] and ds[0]["rejected_mask"] == [0, 0, 1, 1]
    assert (ds[0]["margin"], ds[1]["margin"], ds[1]["pair_index"]) == (1.5, 0.0, 1)
    batch = PreferenceCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "margin", "pair_index"}
    assert batch["input_ids"].shape == (4, 5)
    assert batch["input_ids"].tolist() == [
        ids(tok, "abcde"), ids(tok, "az") + [eos, 0, 0], ids(tok, "abx") + [eos, 0], ids(tok, "ayy") + [eos, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 1, 1, 0]]
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.5, 0.0]
    assert batch["pair_index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="raise max_length"):
        PreferenceDataset.from_jsonl(path, tok, "plain", max_length=1)


def test_preference_datamodule_reference_protocol(tmp_path):
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(5)]
    train, val = write(tmp_path / "t.jsonl", rows), write(tmp_path / "v.jsonl", rows[:2])
    dm = PreferenceDataModule(train_path=train, val_path=val, template="plain", batch_size=2, seed=3)
    assert dm.splits() == ["train", "val"]
    assert PreferenceDataModule(train_path=train).splits() == ["train"]
    ref = list(dm.reference_dataloader("train"))
    assert [b["pair_index"].tolist() for b in ref] == [[0, 1], [2, 3], [4]]
    assert "ref_chosen_logps" not in ref[0]
    fp = dm.fingerprint("train")
    assert len(fp) == 64 and fp == PreferenceDataModule(train_path=train, template="plain").fingerprint("train")
    assert fp != dm.fingerprint("val")
    assert fp != PreferenceDataModule(train_path=train, template="plain", max_length=6).fingerprint("train")
    assert fp != PreferenceDataModule(train_path=train, template="vicuna_v1.1").fingerprint("train")
    chosen, rejected = -torch.arange(5.0), -10 - torch.arange(5.0)
    dm.attach_reference_logps("train", chosen, rejected)
    seen = set()
    for batch in dm.train_dataloader():  # shuffled: gathered by pair_index
        idx = batch["pair_index"]
        assert torch.equal(batch["ref_chosen_logps"], chosen[idx])
        assert torch.equal(batch["ref_rejected_logps"], rejected[idx])
        seen.update(idx.tolist())
    assert seen == set(range(5))
    assert "ref_chosen_logps" not in next(iter(dm.val_dataloader()))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        dm.attach_reference_logps("val", chosen, rejected)
    with pytest.raises(ValueError, match="split"):
        dm.fingerprint("test")


def test_windows_are_per_rank_when_lightning_injects_a_distributed_sampler(tmp_path):
    """What Lightning does under DDP: re-create our batch sampler around a DistributedSampler (rank 1 of 2)."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    rows = [{"prompt": "p", "completion": "c" * (i + 1)} for i in range(10)]
    dm = SFTDataModule(train_path=write(tmp_path / "s.jsonl", rows), template="plain", batch_size=2, shuffle=False)
    dm.trainer = type("T", (), {"accumulate_grad_batches": 2})()
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    ranked = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=False))
    batches = list(ranked)
    # rank 1 gets rows 1, 3, 5, 7, 9 whose counts are (i + 1) + 1 (completion + EOS): 3, 5, 7, 9, 11
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert [int(b["window_tokens"]) for b in batches] == [3 + 5 + 7 + 9] * 2 + [11]
