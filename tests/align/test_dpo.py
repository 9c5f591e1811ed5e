"""DPOModule: reference kept out of parameters/checkpoints, init invariants, TRL 1.16 DPOTrainer parity (loss,
metrics, 5-step trajectories), precomputed reference with its persistent cache, LoRA adapter reference."""

from __future__ import annotations

import copy
import hashlib
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from align_helpers import preference_batch, tiny_trainer

from lightning_plugins.modules.align import ref_cache
from lightning_plugins.modules.align.dpo import DPOModule
from lightning_plugins.modules.align.loading import load_causal_lm
from lightning_plugins.modules.losses import sequence_logps

pytestmark = [pytest.mark.usefixtures("quiet_lightning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

LN2 = math.log(2)
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}
TRIPLES = [("2+3=", "5", "7"), ("hello", " there friend", " x"), ("abc", "d", "zzzz"), ("9+9=", "18", "81"),
           ("ok", "?", "!!")]


class FakePreferenceData(pl.LightningDataModule):
    """Test double of the contract-5 protocol (splits/fingerprint/reference_dataloader/attach_reference_logps)."""

    def __init__(self, tokenizer, train, val, batch_size=2):
        super().__init__()
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.rows = {"train": list(train), "val": list(val)}
        self.reference = {}
        self.attach_calls = 0

    def splits(self):
        return [name for name, rows in self.rows.items() if rows]

    def fingerprint(self, split):
        return hashlib.sha256(repr(self.rows[split]).encode()).hexdigest()

    def _collate(self, split, indices):
        batch = preference_batch(self.tokenizer, [self.rows[split][i] for i in indices], pair_index=indices)
        if split in self.reference:
            chosen, rejected = self.reference[split]
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = chosen[indices], rejected[indices]
        return batch

    def _loader(self, split):
        return torch.utils.data.DataLoader(range(len(self.rows[split])), batch_size=self.batch_size, shuffle=False,
                                           collate_fn=partial(self._collate, split))

    def reference_dataloader(self, split):
        return self._loader(split)

    def attach_reference_logps(self, split, chosen, rejected):
        assert chosen.shape == rejected.shape == (len(self.rows[split]),)
        self.reference[split] = (chosen, rejected)
        self.attach_calls += 1

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def perturbed(model, seed, scale=0.05):
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return model


# -- (a) the reference stays out of parameters, state_dict and checkpoints ------------------------------------------
def test_reference_not_in_parameters_state_dict_or_checkpoint(tokenizer, tmp_path, one_torch_thread):
    torch.manual_seed(0)
    module = DPOModule(TINY, tokenizer="char", lr=1e-3)
    policy_params = sum(p.numel() for p in module.model.parameters())
    assert sum(p.numel() for p in module.parameters()) == policy_params
    assert module.reference_model is not None and module.reference_model is not module.model
    assert all(not p.requires_grad for p in module.reference_model.parameters())
    assert all(k.startswith("model.") for k in module.state_dict())
    assert len(module.state_dict()) == len(module.model.state_dict())
    reference_before = copy.deepcopy(module.reference_model.state_dict())
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(module, torch.utils.data.DataLoader([preference_batch(tokenizer, TRIPLES)], batch_size=None))
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == {"model." + k for k in module.model.state_dict()}
    assert "reference" not in checkpoint["hyper_parameters"] or checkpoint["hyper_parameters"]["reference"] == "copy"
    # the policy moved, the reference did not
    assert any(not torch.equal(module.model.state_dict()[k], v) for k, v in reference_before.items())
    assert all(torch.equal(module.reference_model.state_dict()[k], v) for k, v in reference_before.items())
    restored = DPOModule.load_from_checkpoint(path)
    assert sum(p.numel() for p in restored.parameters()) == policy_params


# -- (b) invariants at init ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("loss_type", "expected"), [("sigmoid", LN2), ("hinge", 1.0), ("ipo", 25.0),
                                                     ("robust", LN2)])
def test_init_invariants(tokenizer, loss_type, expected):
    torch.manual_seed(1)
    module = DPOModule(TINY, tokenizer="char", loss_type=loss_type,
                       label_smoothing=0.1 if loss_type == "robust" else 0.0)
    loss, values = module.compute_loss(preference_batch(tokenizer, TRIPLES))
    assert abs(loss.item() - expected) < 1e-5
    assert values["rewards/accuracies"].sum().item() == 0.0  # strict >: ties are not wins
    assert values["rewards/chosen"].abs().max().item() == 0.0
    assert values["rewards/margins"].abs().max().item() == 0.0


def test_gradient_at_init_is_minus_beta_half(tokenizer):
    """dL/dh = -beta/2 at init: the gradient equals -beta/2 * d(h)/dtheta computed by hand."""
    torch.manual_seed(2)
    beta = 0.1
    module = DPOModule(TINY, tokenizer="char", beta=beta)
    batch = preference_batch(tokenizer, TRIPLES)
    loss, _ = module.compute_loss(batch)
    grads = torch.autograd.grad(loss, list(module.model.parameters()))
    logps = sequence_logps(module(batch["input_ids"], batch["attention_mask"]), batch["input_ids"],
                           batch["completion_mask"]).logps
    chosen, rejected = logps.chunk(2)
    h = (chosen - rejected).mean()
    expected = torch.autograd.grad(-beta / 2 * h, list(module.model.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-8)


# -- (c) parity with TRL 1.16 DPOTrainer ------------------------------------------------------------------------------
WORDS = "the a cat dog sat ran on mat fast slow yes no red blue big small is was and it".split()
TRL_DATA = {"prompt": ["the cat sat on", "a dog", "is the red mat big and"],
            "chosen": [" the mat", " ran fast and was small", " yes"],
            "rejected": [" a big red dog ran", " sat", " no it is blue"]}


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    import datasets  # the dev extra pins trl 1.16.0 with datasets: a missing install fails here
    import trl
    import tokenizers
    import transformers

    assert trl.__version__ == "1.16.0", f"the TRL parity tests are pinned to trl 1.16.0, found {trl.__version__}"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                               unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                      eos_token_id=1, tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(config)
    policy = perturbed(ref, seed=0)
    return trl, tok, policy, ref, datasets.Dataset.from_dict(TRL_DATA), tmp_path_factory.mktemp("trl")


def trl_trainer(trl_setup, loss_type, label_smoothing, **args):
    trl, tok, policy, ref, dataset, out = trl_setup
    config = trl.DPOConfig(output_dir=str(out), beta=0.1, loss_type=[loss_type], label_smoothing=label_smoothing,
                           use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=None, report_to="none",
                           **args)
    return trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=config,
                          train_dataset=dataset, processing_class=tok)


PARITY = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)]


@pytest.mark.parametrize(("loss_type", "label_smoothing"), PARITY)
def test_loss_and_metrics_equal_trl(trl_setup, loss_type, label_smoothing):
    _, tok, policy, ref, dataset, _ = trl_setup
    trainer = trl_trainer(trl_setup, loss_type, label_smoothing)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}

    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, reference=copy.deepcopy(ref), loss_type=loss_type,
                       label_smoothing=label_smoothing)
    module.train()
    loss, values = module.compute_loss(dict(batch))
    assert abs(loss.item() - trl_loss) <= 1e-6
    for name, value in values.items():
        assert abs(value.mean().item() - trl_metrics[name]) <= 1e-6, name
    assert values.keys() >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}


@pytest.mark.parametrize(("loss_type", "label_smoothing"), PARITY)
def test_five_optimizer_steps_track_trl(trl_setup, loss_type, label_smoothing, one_torch_thread):
    """Same AdamW (torch, lr 1e-3, eps 1e-8, no decay), constant LR, grad-norm clip 1.0, same batch order."""
    _, tok, policy, ref, dataset, _ = trl_setup
    trainer = trl_trainer(trl_setup, loss_type, label_smoothing, learning_rate=1e-3, max_steps=5,
                          per_device_train_batch_size=2, lr_scheduler_type="constant", warmup_steps=0,
                          optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                          max_grad_norm=1.0, train_sampling_strategy="sequential", logging_steps=1,
                          save_strategy="no", seed=0)
    trl_losses = []
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        trl_losses.append(loss.item())
        return loss

    trainer.compute_loss = recording
    trainer.train()
    assert len(trl_losses) == 5

    batches = [trainer.data_collator([trainer.train_dataset[i] for i in rows]) for rows in ([0, 1], [2])]
    module = DPOModule(copy.deepcopy(policy), tokenizer=tok, reference=copy.deepcopy(ref), loss_type=loss_type,
                       label_smoothing=label_smoothing, lr=1e-3)
    recorder = LossRecorder()
    tiny_trainer(max_steps=5, gradient_clip_val=1.0, callbacks=[recorder]).fit(
        module, torch.utils.data.DataLoader([dict(b) for b in batches], batch_size=None))
    assert len(recorder.losses) == 5
    for step, (ours, theirs) in enumerate(zip(recorder.losses, trl_losses)):
        # 1e-5 relative to the loss scale (IPO losses are ~20-30; the others ~0.5-1 so this is 1e-5 absolute)
        assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (step, recorder.losses, trl_losses)
    assert abs(recorder.losses[-1] - recorder.losses[0]) > 1e-3  # the trajectories actually moved


# -- (d) precomputed reference and its cache ---------------------------------------------------------------------------
def first_step_loss(module, datamodule):
    recorder = LossRecorder()
    tiny_trainer(max_steps=1, callbacks=[recorder], limit_val_batches=0).fit(module, datamodule=datamodule)
    return recorder.losses[0]


def test_precomputed_matches_copy_and_uses_the_cache(tokenizer, tmp_path, one_torch_thread):
    torch.manual_seed(3)
    start = load_causal_lm(TINY, tokenizer=tokenizer)
    policy = perturbed(start, seed=1)
    train, val = TRIPLES[:4], TRIPLES[4:]

    # first run: cache miss, reference log-probs computed with the starting policy (= copy mode: loss ln 2)
    first = DPOModule(copy.deepcopy(start), tokenizer=tokenizer, reference="precomputed", lr=1e-3,
                      cache_dir=str(tmp_path))
    data = FakePreferenceData(tokenizer, train, val)
    copy_mode = DPOModule(copy.deepcopy(start), tokenizer=tokenizer, reference="copy", lr=1e-3)
    assert abs(first_step_loss(first, data) - first_step_loss(copy_mode, FakePreferenceData(tokenizer, train, val))) \
        <= 1e-6
    assert first.reference_model is None and first.reference_forward_calls == 3  # 2 train + 1 val batches
    assert [e[:2] for e in first.reference_cache_events] == [("train", "miss"), ("val", "miss")]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    # second run: the same reference (start) hits the cache; with a policy that differs from its reference the first
    # step equals copy mode with an explicit reference = start
    second = DPOModule(copy.deepcopy(start), tokenizer=tokenizer, reference="precomputed", lr=1e-3,
                       cache_dir=str(tmp_path))
    second.model.load_state_dict(policy.state_dict())
    data2 = FakePreferenceData(tokenizer, train, val)
    explicit = DPOModule(copy.deepcopy(policy), tokenizer=tokenizer, reference=copy.deepcopy(start), lr=1e-3)
    expected = first_step_loss(explicit, FakePreferenceData(tokenizer, train, val))
    assert abs(first_step_loss(second, data2) - expected) <= 1e-6
    assert abs(expected - LN2) > 1e-3  # a real comparison, not the init invariant
    assert second.reference_forward_calls == 0 and [e[1] for e in second.reference_cache_events] == ["hit", "hit"]
    for split in ("train", "val"):
        for cached, computed in zip(data2.reference[split], data.reference[split]):
            assert torch.equal(cached, computed)

    # a standalone `validate` attaches the reference too (from the cache here)
    evaluator = DPOModule(copy.deepcopy(policy), tokenizer=tokenizer, reference="precomputed", cache_dir=str(tmp_path))
    evaluator._reference_hash = second._reference_hash  # as restored from a checkpoint by on_load_checkpoint
    metrics = tiny_trainer().validate(evaluator, datamodule=FakePreferenceData(tokenizer, train, val), verbose=False)
    assert [e[1] for e in evaluator.reference_cache_events] == ["hit", "hit"] and "val/rewards/margins" in metrics[0]

    # a different reference weight misses
    other = DPOModule(perturbed(start, seed=9, scale=1e-3), tokenizer=tokenizer, reference="precomputed",
                      cache_dir=str(tmp_path))
    other.precompute_reference(FakePreferenceData(tokenizer, train, val))
    assert [e[1] for e in other.reference_cache_events] == ["miss", "miss"] and other.reference_forward_calls == 3
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_precomputed_errors(tokenizer, tmp_path):
    torch.manual_seed(4)
    module = DPOModule(TINY, tokenizer="char", reference="precomputed", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="ref_chosen_logps"):
        module.compute_loss(preference_batch(tokenizer, TRIPLES))
    with pytest.raises(TypeError, match="DataModule"):
        module.precompute_reference(object())
    with torch.no_grad():
        next(module.model.parameters()).add_(1.0)  # "trained": the reference can no longer be recomputed
    with pytest.raises(RuntimeError, match="starting weights"):
        module.precompute_reference(FakePreferenceData(tokenizer, TRIPLES, []))


def test_ref_cache_helpers(tmp_path, tokenizer):
    chosen, rejected = torch.tensor([-1.0, -2.5]), torch.tensor([-3.0, -0.5])
    path = ref_cache.save_reference_logps(tmp_path / "x.safetensors", chosen, rejected, {"split": "train"})
    loaded = ref_cache.load_reference_logps(path)
    assert torch.equal(loaded[0], chosen) and torch.equal(loaded[1], rejected)
    assert ref_cache.load_reference_logps(tmp_path / "missing.safetensors") is None
    model = load_causal_lm(TINY, tokenizer=tokenizer)
    same = copy.deepcopy(model)
    assert ref_cache.weights_hash(model) == ref_cache.weights_hash(same)
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-6
    assert ref_cache.weights_hash(model) != ref_cache.weights_hash(same)
    assert ref_cache.weights_hash(model.to(torch.bfloat16)) != ref_cache.weights_hash(same)
    key = ref_cache.cache_key("fp", "w", ref_cache.tokenizer_identity(tokenizer))
    assert key != ref_cache.cache_key("fp2", "w", ref_cache.tokenizer_identity(tokenizer))
    with pytest.raises(ValueError, match="fingerprint"):
        ref_cache.cache_key("", "w", "t")


# -- (e) LoRA adapter reference ----------------------------------------------------------------------------------------
def test_adapter_reference(tokenizer, one_torch_thread):
    torch.manual_seed(5)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    module = DPOModule(TINY, tokenizer="char", reference="adapter", lora=lora, lr=1e-2)
    assert module.reference_model is None
    batch = preference_batch(tokenizer, TRIPLES)
    loss, values = module.compute_loss(batch)
    assert abs(loss.item() - LN2) < 1e-6 and values["rewards/accuracies"].sum() == 0
    reference_before = module.reference_logps(batch).logps
    recorder = LossRecorder()
    tiny_trainer(max_steps=5, callbacks=[recorder]).fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    assert recorder.losses[-1] < recorder.losses[0] - 1e-3  # the adapters learn
    torch.testing.assert_close(module.reference_logps(batch).logps, reference_before, rtol=0, atol=1e-5)
    policy_after = sequence_logps(module(batch["input_ids"], batch["attention_mask"]), batch["input_ids"],
                                  batch["completion_mask"]).logps
    assert (policy_after - reference_before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="lora"):
        DPOModule(TINY, reference="adapter")


# -- options, metrics, errors ------------------------------------------------------------------------------------
def test_loss_lists_nll_and_metric_logging(tokenizer, one_torch_thread):
    torch.manual_seed(6)
    start = load_causal_lm(TINY, tokenizer=tokenizer)
    policy = perturbed(start, seed=2)
    batch = preference_batch(tokenizer, TRIPLES)

    def build(**kwargs):
        return DPOModule(copy.deepcopy(policy), tokenizer=tokenizer, reference=copy.deepcopy(start), **kwargs)

    sigmoid, _ = build().compute_loss(batch)
    hinge, _ = build(loss_type="hinge").compute_loss(batch)
    mixed, values = build(loss_type=["sigmoid", "hinge", "sft"], loss_weights=[0.5, 2.0, 0.3]).compute_loss(batch)
    nll = values["nll"].item()
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    chosen_mask = lp.mask.chunk(2)[0]
    assert abs(nll + lp.per_token.chunk(2)[0][chosen_mask].mean().item()) < 1e-6
    assert abs(mixed.item() - (0.5 * sigmoid.item() + 2.0 * hinge.item() + 0.3 * nll)) < 1e-5
    rpo, rpo_values = build(nll_coef=0.7).compute_loss(batch)
    assert abs(rpo.item() - (sigmoid.item() + 0.7 * nll)) < 1e-5 and "nll" in rpo_values

    module = build(lr=1e-3)
    trainer = tiny_trainer(max_steps=1, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(module, loader, loader)
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "logits/chosen", "logits/rejected"}
    assert {f"train/{n}" for n in names} | {f"val/{n}" for n in names} <= set(trainer.callback_metrics)
    _, expected = module.compute_loss(batch)
    for name in names - {"loss"}:
        assert abs(trainer.callback_metrics[f"val/{name}"].item() - expected[name].mean().item()) < 1e-5, name


def test_errors():
    with pytest.raises(ValueError, match="loss_type"):
        DPOModule(TINY, loss_type="dpo")
    with pytest.raises(ValueError, match="loss_weights"):
        DPOModule(TINY, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="cdpo"):
        DPOModule(TINY, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        DPOModule(TINY, beta=0.0)
    with pytest.raises(ValueError, match="reference"):
        DPOModule(TINY, reference="frozen")
    with pytest.raises(ValueError, match="completion_mask"):
        DPOModule(TINY).compute_loss({"input_ids": torch.ones(2, 3, dtype=torch.long)})


def test_precomputed_with_the_real_preference_datamodule(tmp_path, tokenizer, one_torch_thread):
    """End to end with ``data.PreferenceDataModule``: miss then hit, and the first step equals copy mode."""
    import json

    from lightning_plugins.modules.align.data import PreferenceDataModule

    def write(name, triples):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in triples))
        return str(path)

    train_path, val_path = write("train.jsonl", TRIPLES[:4]), write("val.jsonl", TRIPLES[4:])

    def data():
        return PreferenceDataModule("char", train_path=train_path, val_path=val_path, template="plain",
                                    batch_size=2, shuffle=False)

    torch.manual_seed(7)
    start = load_causal_lm(TINY, tokenizer=tokenizer)
    policy = perturbed(start, seed=3)
    cache = tmp_path / "cache"
    first = DPOModule(copy.deepcopy(start), tokenizer="char", reference="precomputed", lr=1e-3, cache_dir=str(cache))
    assert abs(first_step_loss(first, data()) - LN2) < 1e-6
    assert [e[1] for e in first.reference_cache_events] == ["miss", "miss"] and first.reference_forward_calls == 3

    second = DPOModule(copy.deepcopy(start), tokenizer="char", reference="precomputed", lr=1e-3, cache_dir=str(cache))
    second.model.load_state_dict(policy.state_dict())
    explicit = DPOModule(copy.deepcopy(policy), tokenizer="char", reference=copy.deepcopy(start), lr=1e-3)
    expected = first_step_loss(explicit, data())
    assert abs(expected - LN2) > 1e-3
    assert abs(first_step_loss(second, data()) - expected) <= 1e-6
    assert [e[1] for e in second.reference_cache_events] == ["hit", "hit"] and second.reference_forward_calls == 0


def test_trains_under_fp8_msamp_precision(tokenizer, one_torch_thread):
    """FP8 converts the policy's linears only (the unregistered fp32 reference is untouched); loss falls."""
    import lightning_plugins  # noqa: F401  (registers precision="fp8-msamp")

    torch.manual_seed(9)
    module = DPOModule(TINY, tokenizer="char", lr=1e-3)
    recorder = LossRecorder()
    trainer = tiny_trainer(max_steps=4, precision="fp8-msamp", callbacks=[recorder])
    trainer.fit(
        module, torch.utils.data.DataLoader([preference_batch(tokenizer, TRIPLES)], batch_size=None))
    converted = {d.name for d in trainer.precision_plugin.conversion_report.converted}
    assert "model.model.layers.0.self_attn.q_proj" in converted
    assert type(module.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # plain again after the run
    assert type(module.reference_model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert abs(recorder.losses[0] - LN2) < 1e-2  # FP8 policy vs fp32 reference: close to ln 2, not exact
    assert all(math.isfinite(x) for x in recorder.losses) and recorder.losses[-1] < recorder.losses[0]


def test_cli_builds_from_a_yaml_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "dpo.yaml"
    config.write_text(
        "model:\n  model:\n    model_type: llama\n    hidden_size: 32\n    intermediate_size: 64\n"
        "    num_hidden_layers: 1\n    num_attention_heads: 4\n  reference: precomputed\n"
        "  loss_type: [sigmoid, sft]\n  loss_weights: [1.0, 0.5]\n  beta: 0.2\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
    )
    cli = LightningCLI(DPOModule, run=False, args=["--config", str(config)], save_config_callback=None,
                       trainer_defaults={"accelerator": "cpu", "logger": False})
    assert isinstance(cli.model, DPOModule) and cli.model.reference_mode == "precomputed"
    assert cli.model.loss_types == ["sigmoid", "sft"] and cli.model.loss_weights == [1.0, 0.5]
    assert cli.model.hparams.beta == 0.2


def test_reference_hash_travels_in_checkpoints(tokenizer, tmp_path, one_torch_thread):
    torch.manual_seed(10)
    module = DPOModule(TINY, tokenizer="char", reference="precomputed", lr=1e-3, cache_dir=str(tmp_path / "c"))
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=FakePreferenceData(tokenizer, TRIPLES[:2], []))
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["dpo_reference_hash"] == module._reference_hash
    torch.manual_seed(11)  # a config-dict model rebuilt under another seed: the checkpoint's hash still wins
    restored = DPOModule.load_from_checkpoint(path)
    assert restored._reference_hash == module._reference_hash
    restored.precompute_reference(FakePreferenceData(tokenizer, TRIPLES[:2], []))
    assert [e[1] for e in restored.reference_cache_events] == ["hit"]
