"""RewardModel: where the score is read (pad == eos, left/right padding), pooling, TRL RewardTrainer parity,
validation statistics in checkpoints, text scoring and a small learning run."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from align_helpers import preference_batch, tiny_trainer

from lightning_plugins.modules.align.loading import load_causal_lm
from lightning_plugins.modules.align.reward_model import RewardModel, RewardStats
from lightning_plugins.modules.losses import reward_loss

pytestmark = [pytest.mark.usefixtures("quiet_lightning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 64}


TRIPLES = [("2+3=", "5", "7"), ("hello", " there friend", " x"), ("abc", "d", "zzzz")]


def test_score_read_at_eos_when_pad_equals_eos(tokenizer):
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    module = RewardModel({**TINY, "pad_token_id": eos}, tokenizer="char").eval()
    batch = preference_batch(tokenizer, TRIPLES, pad_id=eos)  # padding with the EOS id
    ids, mask = batch["input_ids"], batch["attention_mask"]
    last = mask.sum(dim=1) - 1
    assert (ids[torch.arange(len(ids)), last] == eos).all()
    with torch.no_grad():
        hidden = module.body(input_ids=ids, attention_mask=mask).last_hidden_state
        manual = module.head(hidden[torch.arange(len(ids)), last]).squeeze(-1)
        # an id-based reader (first pad/eos id) would read the token before EOS on every row
        before_eos = module.head(hidden[torch.arange(len(ids)), last - 1]).squeeze(-1)
    scores = module.score(ids, mask)
    torch.testing.assert_close(scores, manual, rtol=0, atol=1e-6)
    assert (scores - before_eos).abs().min() > 1e-4


def test_left_padding_gives_the_right_padding_scores(tokenizer):
    torch.manual_seed(1)
    module = RewardModel(TINY, tokenizer="char").eval()
    right = preference_batch(tokenizer, TRIPLES)
    left = preference_batch(tokenizer, TRIPLES, left=True)
    assert not torch.equal(right["input_ids"], left["input_ids"])
    torch.testing.assert_close(module.score(left["input_ids"], left["attention_mask"]),
                               module.score(right["input_ids"], right["attention_mask"]), rtol=0, atol=1e-5)


def test_head_initialization_and_parameters(tokenizer):
    torch.manual_seed(2)
    module = RewardModel(TINY, tokenizer="char")
    assert module.head.weight.shape == (1, 64) and torch.equal(module.head.bias, torch.zeros(1))
    assert abs(module.head.weight.std().item() - 1 / 65 ** 0.5) < 0.05
    assert not any(name.startswith("body.lm_head") for name, _ in module.named_parameters())


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_encoder_pooling(tokenizer, pooling):
    torch.manual_seed(3)
    module = RewardModel(TINY_BERT, tokenizer="char", backbone="encoder", pooling=pooling).eval()
    batch = preference_batch(tokenizer, TRIPLES)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = module.body(input_ids=ids, attention_mask=mask).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "mean":
        pooled = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(ids))])
    else:
        pooled = hidden[torch.arange(len(ids)), mask.sum(1) - 1]
    torch.testing.assert_close(module.score(ids, mask), module.head(pooled).squeeze(-1).detach(), rtol=0, atol=1e-6)


def test_loss_metrics_and_margin(tokenizer):
    torch.manual_seed(4)
    module = RewardModel(TINY, tokenizer="char", center_rewards_coefficient=0.01)
    batch = preference_batch(tokenizer, TRIPLES, margins=[0.5, 0.0, 1.0])
    rewards = module(batch["input_ids"], batch["attention_mask"])
    expected = reward_loss(*rewards.chunk(2), margin=batch["margin"], center_rewards_coefficient=0.01)
    loss = module.training_step(batch, 0)
    assert abs(loss.item() - expected.loss.item()) < 1e-7
    module_no_margin = RewardModel(TINY, tokenizer="char", margin=False)
    module_no_margin.load_state_dict(module.state_dict())
    plain = reward_loss(*rewards.chunk(2))
    assert abs(module_no_margin.compute_loss(batch).loss.item() - plain.loss.item()) < 1e-7
    stats = RewardStats()
    chosen, rejected = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 2.0, 1.0])
    stats.update(chosen[:2], rejected[:2])
    stats.update(chosen[2:], rejected[2:])
    values = stats.compute()
    allr = torch.cat([chosen, rejected])
    assert values["accuracy"].item() == pytest.approx(1 / 3)  # the tie is not a win
    assert values["margin"].item() == pytest.approx(0.0)
    assert values["mean_reward"].item() == pytest.approx(allr.mean().item())
    assert values["std_reward"].item() == pytest.approx(allr.std(unbiased=False).item(), abs=1e-6)
    assert (values["min_reward"].item(), values["max_reward"].item()) == (0.0, 2.0)


def test_trl_reward_trainer_parity(tmp_path):
    """alignment.md §3: our module on TRL's collated batch equals RewardTrainer.compute_loss (pad != eos)."""
    import datasets  # the dev extra pins trl 1.16.0 with datasets: a missing install fails here
    import trl
    import tokenizers
    import transformers

    words = "the a cat dog sat ran on mat fast slow yes no red blue big small is was and it".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                               unk_token="<unk>")
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                      eos_token_id=1, tie_word_embeddings=False, num_labels=1)
    seqcls = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():
        seqcls.score.weight.normal_(0.0, 1.0)
    dataset = datasets.Dataset.from_dict({
        "prompt": ["the cat sat on", "a dog", "is the red mat big and"],
        "chosen": [" the mat", " ran fast and was small", " yes"],
        "rejected": [" a big red dog ran", " sat", " no it is blue"],
        "margin": [0.5, 0.0, 1.25],
    })
    for coefficient in (None, 0.01):
        args = trl.RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=coefficient, use_cpu=True,
                                bf16=False, gradient_checkpointing=False, max_length=None, report_to="none")
        trainer = trl.RewardTrainer(model=copy.deepcopy(seqcls), args=args, train_dataset=dataset,
                                    processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
        trainer.model.train()
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}

        module = RewardModel(copy.deepcopy(seqcls), tokenizer=tok, center_rewards_coefficient=coefficient)
        with torch.no_grad():
            module.head.weight.copy_(seqcls.score.weight)  # HF's score head has no bias; ours starts at 0
        module.train()
        ours = module.compute_loss({k: batch[k] for k in ("input_ids", "attention_mask", "margin")})
        assert abs(ours.loss.item() - trl_loss) <= 1e-6
        for name, value in ours.metrics().items():
            assert abs(value.item() - trl_metrics[name]) <= 1e-6, name


def test_validation_statistics_in_checkpoint_and_normalized_scores(tokenizer, tmp_path, one_torch_thread):
    torch.manual_seed(5)
    module = RewardModel(TINY, tokenizer="char", lr=1e-3)
    batch = preference_batch(tokenizer, TRIPLES)
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    with pytest.raises(RuntimeError, match="validation"):
        module.score(batch["input_ids"], batch["attention_mask"], normalize=True)
    trainer = tiny_trainer(max_steps=2, num_sanity_val_steps=1)
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    for name in ("loss", "accuracy", "margin", "mean_reward", "std_reward", "min_reward", "max_reward"):
        assert f"val/{name}" in metrics and f"train/{name}" in metrics, name
    module.eval()
    rewards = module.score(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(module.reward_mean, rewards.mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(module.reward_std, rewards.std(unbiased=False), rtol=0, atol=1e-5)
    path = tmp_path / "rm.ckpt"
    trainer.save_checkpoint(path)
    restored = RewardModel.load_from_checkpoint(path).eval()
    assert restored.reward_mean.item() == module.reward_mean.item()
    normalized = restored.score(batch["input_ids"], batch["attention_mask"], normalize=True)
    torch.testing.assert_close(normalized.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(normalized.std(unbiased=False), torch.tensor(1.0), rtol=0, atol=1e-4)


def test_score_texts_matches_manual_encoding(tokenizer):
    from lightning_plugins.modules.align.templates import get_template

    torch.manual_seed(6)
    module = RewardModel(TINY, tokenizer="char").eval()
    chat = get_template("plain")
    prompts, responses = ["1+1=", "3+4="], ["2", "eight"]
    scores = module.score_texts(prompts, responses, template="plain", batch_size=1)
    for prompt, response, score in zip(prompts, responses, scores):
        ids, _ = chat.encode(tokenizer, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": response}])
        assert ids[-1] == tokenizer.eos_token_id
        single = module.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert abs(single.item() - score.item()) < 1e-5
    assert torch.allclose(module.score_texts(prompts, responses, template=chat), scores, atol=1e-5)


def test_learns_a_simple_preference(tokenizer, one_torch_thread):
    """Chosen answers are correct sums, rejected ones are off by one: the RM fits the train pairs and ranks 20
    held-out pairs (unseen prompts) at >= 0.85 (0.95 measured)."""
    import random

    rng = random.Random(0)
    triples = [(f"{a}+{b}=", str(a + b), str(a + b + rng.choice([-1, 1]))) for a in range(10) for b in range(10)]
    rng.shuffle(triples)
    # the rule "chosen = the one the verifier likes" on a small task; the shortcut of a fixed offset is excluded by
    # the random sign, so the model has to relate the answer to the prompt
    train, held_out = triples[:80], triples[80:]
    torch.manual_seed(0)
    module = RewardModel(TINY, tokenizer="char", lr=3e-3)
    loader = torch.utils.data.DataLoader([preference_batch(tokenizer, train)], batch_size=None)
    tiny_trainer(max_steps=150).fit(module, loader)
    module.eval()
    held = preference_batch(tokenizer, held_out)
    chosen, rejected = module.score(held["input_ids"], held["attention_mask"]).chunk(2)
    train_batch = preference_batch(tokenizer, train)
    train_chosen, train_rejected = module.score(train_batch["input_ids"], train_batch["attention_mask"]).chunk(2)
    assert (train_chosen > train_rejected).float().mean() >= 0.95
    assert (chosen > rejected).float().mean() >= 0.85


def test_lora_body_and_errors(tokenizer):
    torch.manual_seed(7)
    module = RewardModel(TINY, tokenizer="char", lora={"r": 2, "target_modules": ["q_proj"]})
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or "lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="pooling"):
        RewardModel(TINY, pooling="max")
    with pytest.raises(ValueError, match="backbone"):
        RewardModel(TINY, backbone="seq2seq")
    lm = load_causal_lm(TINY, tokenizer=tokenizer)
    assert RewardModel(lm, tokenizer=tokenizer).body is lm.model


def test_trains_under_fp8_msamp_precision(tokenizer, one_torch_thread):
    import math

    import lightning_plugins  # noqa: F401  (registers precision="fp8-msamp")

    torch.manual_seed(8)
    module = RewardModel(TINY, tokenizer="char", lr=1e-3)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = tiny_trainer(max_steps=4, precision="fp8-msamp", callbacks=[Record()])
    trainer.fit(
        module, torch.utils.data.DataLoader([preference_batch(tokenizer, TRIPLES)], batch_size=None))
    converted = {d.name for d in trainer.precision_plugin.conversion_report.converted}
    assert "body.layers.0.self_attn.q_proj" in converted
    assert type(module.body.layers[0].self_attn.q_proj).__name__ == "Linear"  # plain again after the run
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_cli_builds_from_a_yaml_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "rm.yaml"
    config.write_text(
        "model:\n  model:\n    model_type: bert\n    hidden_size: 32\n    intermediate_size: 64\n"
        "    num_hidden_layers: 1\n    num_attention_heads: 4\n  backbone: encoder\n  pooling: mean\n"
        "  center_rewards_coefficient: 0.01\n"
    )
    cli = LightningCLI(RewardModel, run=False, args=["--config", str(config)], save_config_callback=None,
                       trainer_defaults={"accelerator": "cpu", "logger": False})
    assert isinstance(cli.model, RewardModel) and cli.model.hparams.pooling == "mean"
    assert type(cli.model.body).__name__ == "BertModel"
