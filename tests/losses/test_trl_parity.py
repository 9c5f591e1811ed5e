"""Our losses against TRL 1.x's own trainers on one identical collated batch (alignment.md §3 recipe).

Needs `trl` and `datasets` (the dev extras, installed by the README test command). Everything runs in fp32 on a
tiny Llama built from a config with a word-level tokenizer built here, so nothing is downloaded. Measured with trl 1.16.0, datasets 5.2.0
and transformers 5.24.0: every loss and metric below matched bit-exactly (|diff| = 0.0).
"""

from __future__ import annotations

import copy

import pytest
import torch

import datasets  # the dev extra: a missing install fails the suite, never skips it
import tokenizers
import transformers
import trl

from lightning_plugins.modules.losses import dpo_loss, reward_loss, sequence_logps

assert trl.__version__ == "1.16.0", f"the TRL parity tests are pinned to trl 1.16.0, found {trl.__version__}"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' checkpointing renames

TOL = 1e-6
WORDS = "the a cat dog sat ran on mat fast slow yes no red blue big small is was and".split()
PROMPTS = ["the cat sat on", "a dog", "is the red mat big and"]
CHOSEN = [" the mat", " ran fast and was small", " yes"]
REJECTED = [" a big red dog ran", " sat", " no it is blue"]


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    vocab["it"] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def llama_config(vocab_size, **extra):
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False, **extra,
    )


def perturbed(model, seed):
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    ref = transformers.LlamaForCausalLM(llama_config(len(tokenizer)))
    policy = perturbed(ref, seed=0)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    return tokenizer, policy, ref, dataset, tmp_path_factory.mktemp("dpo")


def trl_dpo(dpo_setup, loss_type, label_smoothing, beta):
    tokenizer, policy, ref, dataset, output_dir = dpo_setup
    args = trl.DPOConfig(
        output_dir=str(output_dir), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing, use_cpu=True,
        bf16=False, gradient_checkpointing=False, max_length=None, report_to="none",
    )
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                             train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    return trainer, batch, loss, metrics


CASES = [
    ("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("exo_pair", 1e-3), ("nca_pair", 0.0),
    ("bco_pair", 0.0), ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0), ("sigmoid_norm", 0.0),
    ("aot", 0.1), ("aot_unpaired", 0.0), ("discopop", 0.0),
]


@pytest.mark.parametrize(("loss_type", "label_smoothing"), CASES)
def test_dpo_loss_and_metrics_equal_trl(dpo_setup, loss_type, label_smoothing):
    beta = 0.1
    trainer, batch, trl_loss, trl_metrics = trl_dpo(dpo_setup, loss_type, label_smoothing, beta)
    input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        policy_logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        ref_logits = trainer.ref_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    policy = sequence_logps(policy_logits, input_ids, completion_mask)
    ref = sequence_logps(ref_logits, input_ids, completion_mask)
    policy_chosen, policy_rejected = policy.logps.chunk(2)
    ref_chosen, ref_rejected = ref.logps.chunk(2)
    chosen_lengths, rejected_lengths = policy.num_tokens.chunk(2)
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                   label_smoothing=label_smoothing, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)

    assert abs(out.loss.item() - trl_loss.item()) <= TOL
    ours = {**out.metrics(), "logps/chosen": policy_chosen.mean(), "logps/rejected": policy_rejected.mean()}
    for name, value in ours.items():
        assert abs(value.item() - trl_metrics[name]) <= TOL, name


def test_sigmoid_label_smoothing_is_ignored_by_trl_and_rejected_by_us(dpo_setup):
    _, _, smoothed, _ = trl_dpo(dpo_setup, "sigmoid", 0.2, 0.1)
    _, _, plain, _ = trl_dpo(dpo_setup, "sigmoid", 0.0, 0.1)
    assert smoothed.item() == plain.item()  # the TRL 1.x behaviour alignment.md §0 reports
    with pytest.raises(ValueError, match="cdpo"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), loss_type="sigmoid",
                 label_smoothing=0.2)


@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.01])
def test_reward_loss_equals_trl(tmp_path, center_rewards_coefficient):
    torch.manual_seed(1)
    tokenizer = make_tokenizer()
    model = transformers.LlamaForSequenceClassification(llama_config(len(tokenizer), num_labels=1))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # spread the rewards so the loss is not ~log 2
    dataset = datasets.Dataset.from_dict(
        {"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED, "margin": [0.5, 0.0, 1.25]}
    )
    args = trl.RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=center_rewards_coefficient,
                            use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=None, report_to="none")
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}

    with torch.no_grad():
        hidden = trainer.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).last_hidden_state
        last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
        rewards = trainer.model.score(hidden[torch.arange(hidden.shape[0]), last]).squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    out = reward_loss(chosen, rejected, margin=batch["margin"], center_rewards_coefficient=center_rewards_coefficient)
    assert abs(out.loss.item() - trl_loss.item()) <= TOL
    for name, value in out.metrics().items():
        assert abs(value.item() - trl_metrics[name]) <= TOL, name
