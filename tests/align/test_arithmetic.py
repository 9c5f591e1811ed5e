"""The arithmetic task: deterministic files with the stated noise, the verifier against hand-computed probabilities,
and a tiny Llama that learns the task with plain PyTorch."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from lightning_plugins.modules.align.arithmetic import ArithmeticTask, ArithmeticVerifier, gold_answer
from lightning_plugins.modules.align.collate import SFTCollator
from lightning_plugins.modules.align.data import SFTDataset, read_jsonl
from lightning_plugins.modules.align.loading import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("char")


def test_prompts_and_gold():
    task = ArithmeticTask()
    prompts = task.prompts()
    assert len(prompts) == 100 and len(set(prompts)) == 100
    assert prompts[0] == "0+0=" and prompts[-1] == "9+9=" and "3+7=" in prompts
    assert gold_answer("3+7=") == task.gold("3+7=") == "10" and task.gold("0+0=") == "0"
    with pytest.raises(ValueError, match="a\\+b="):
        gold_answer("3*7=")


def test_written_files(tmp_path):
    task = ArithmeticTask(seed=0)
    paths = task.write(tmp_path / "a")
    assert sorted(paths) == ["prompts", "rm_train", "rm_val", "sft_train", "sft_val"]
    sft = read_jsonl(paths["sft_train"], "sft")
    assert len(sft) == 1000 and len(read_jsonl(paths["sft_val"], "sft")) == 200
    assert Counter(r["prompt"] for r in sft) == {p: 10 for p in task.prompts()}
    correct = [r["completion"] == gold_answer(r["prompt"]) for r in sft]
    assert abs(sum(correct) / len(sft) - 0.4) < 0.05  # binomial(1000, 0.4): std 0.016
    wrong = Counter(int(r["completion"]) for r, ok in zip(sft, correct) if not ok)
    assert set(wrong) <= set(range(19)) and len(wrong) == 19  # answers are bare numbers in 0..18
    rm_train, rm_val = read_jsonl(paths["rm_train"], "preference"), read_jsonl(paths["rm_val"], "preference")
    for r in rm_train + rm_val:
        assert r["chosen"] == gold_answer(r["prompt"]) != r["rejected"] and 0 <= int(r["rejected"]) <= 18
    # default split "pairs": every prompt in both files, held-out pairs have wrong answers never seen in training
    train_pairs = Counter((r["prompt"], r["rejected"]) for r in rm_train)
    val_pairs = Counter((r["prompt"], r["rejected"]) for r in rm_val)
    assert len(rm_train) == 100 * 4 and len(rm_val) == 100 * 2
    assert max(train_pairs.values()) == max(val_pairs.values()) == 1 and not set(train_pairs) & set(val_pairs)
    assert {p for p, _ in train_pairs} == {p for p, _ in val_pairs} == set(task.prompts())
    assert [r["prompt"] for r in read_jsonl(paths["prompts"], "prompts")] == task.prompts()
    again = ArithmeticTask(seed=0).write(tmp_path / "b")
    other = ArithmeticTask(seed=1).write(tmp_path / "c")
    for name in paths:
        assert paths[name].read_bytes() == again[name].read_bytes()
    assert paths["sft_train"].read_bytes() != other["sft_train"].read_bytes()
    assert paths["rm_val"].read_bytes() != other["rm_val"].read_bytes()


def test_prompt_split_holds_out_whole_prompts(tmp_path):
    task = ArithmeticTask(seed=0, rm_split="prompts")
    paths = task.write(tmp_path)
    rm_train, rm_val = read_jsonl(paths["rm_train"], "preference"), read_jsonl(paths["rm_val"], "preference")
    train_p, val_p = {r["prompt"] for r in rm_train}, {r["prompt"] for r in rm_val}
    assert len(train_p) == 80 and len(val_p) == 20 and not train_p & val_p
    per_prompt = Counter((r["prompt"], r["rejected"]) for r in rm_train)
    assert max(per_prompt.values()) == 1 and len(rm_train) == 80 * 4  # distinct wrong answers per prompt
    assert task.rm_val_prompts != ArithmeticTask(seed=1, rm_split="prompts").rm_val_prompts


def test_task_argument_errors():
    with pytest.raises(ValueError, match="p_correct_sft"):
        ArithmeticTask(p_correct_sft=1.5)
    with pytest.raises(ValueError, match="rm_val_fraction"):
        ArithmeticTask(rm_val_fraction=0.0)
    with pytest.raises(ValueError, match="rm_split must be 'pairs' or 'prompts', got 'rows'"):
        ArithmeticTask(rm_split="rows")
    with pytest.raises(ValueError, match="exceeds the 18 wrong answers"):
        ArithmeticTask(rm_pairs_per_prompt=17, rm_val_pairs_per_prompt=2)


@pytest.mark.parametrize(
    ("response", "ok"),
    [("12", True), (" 12\n", True), ("012", True), ("12a", False), ("", False), ("1 2", False), ("11", False)],
)
def test_is_correct(response, ok):
    assert ArithmeticVerifier.is_correct("3+9=", response) is ok


class Bigram(torch.nn.Module):
    """A hand-built "LM": the logits at position t are ``table[input_ids[t]]`` (a bigram model we control)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_p_correct_equals_hand_computed_product(tok):
    torch.manual_seed(0)
    table = torch.randn(len(tok), len(tok)) * 2
    rows = table.double().tolist()

    def prob(prev: str | int, nxt: str | int) -> float:
        a = prev if isinstance(prev, int) else tok.convert_tokens_to_ids(prev)
        b = nxt if isinstance(nxt, int) else tok.convert_tokens_to_ids(nxt)
        return math.exp(rows[a][b]) / sum(math.exp(v) for v in rows[a])

    eos = tok.eos_token_id
    prompts = ["3+4=", "9+9=", "0+0=", "5+6="]
    # p(gold + EOS | prompt) = product over answer chars and EOS of the bigram probability given the previous char.
    expected = [
        prob("=", "7") * prob("7", eos),
        prob("=", "1") * prob("1", "8") * prob("8", eos),
        prob("=", "0") * prob("0", eos),
        prob("=", "1") * prob("1", "1") * prob("1", eos),
    ]
    model = Bigram(table)
    verifier = ArithmeticVerifier(batch_size=3)  # two batches with different padding
    got = verifier.sequence_logps(model, tok, prompts, [gold_answer(p) for p in prompts]).exp()
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert verifier.p_correct(model, tok, prompts) == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_greedy_accuracy_with_a_model_that_always_says_12(tok):
    table = torch.zeros(len(tok), len(tok))
    table[tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids("1")] = 10
    table[tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")] = 10
    table[tok.convert_tokens_to_ids("2"), tok.eos_token_id] = 10
    model = Bigram(table)
    model.train()
    verifier = ArithmeticVerifier()
    responses = verifier.generate_greedy(model, tok)
    assert set(responses) == {"12"}
    # exactly the prompts with a + b = 12: (3,9), (4,8), ..., (9,3)
    assert verifier.greedy_accuracy(model, tok) == pytest.approx(7 / 100)
    assert model.training  # mode restored
    # without a learned EOS the answer runs on to max_new_tokens and is wrong
    table[tok.convert_tokens_to_ids("2"), tok.convert_tokens_to_ids("1")] = 20
    assert verifier.generate_greedy(Bigram(table), tok, ["3+9="]) == ["1212"]


def test_tiny_llama_learns_the_task(tok, one_torch_thread):
    task = ArithmeticTask()
    rows = [{"prompt": p, "completion": task.gold(p)} for p in task.prompts()]
    ds = SFTDataset(rows, tok, "plain", max_length=16)
    batch = SFTCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    batch.pop("window_tokens")
    torch.manual_seed(0)
    model = load_causal_lm({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 16}, tok)
    verifier = ArithmeticVerifier()
    assert verifier.greedy_accuracy(model, tok) < 0.2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert verifier.greedy_accuracy(model, tok) > 0.9
    assert verifier.p_correct(model, tok) > 0.8
