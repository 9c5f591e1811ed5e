"""Rejection sampling: sampling loop, best-of-k combinatorics, jsonl IO, end to end (tiny models, own tokenizer)."""

from __future__ import annotations

import itertools
import json
import logging
import random

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_plugins.modules.align.sampling import (
    best_of_k_curve,
    load_prompts,
    plot_best_of_k,
    read_multi_response_jsonl,
    rejection_sample,
    sample_responses,
    write_jsonl,
)

CHARS = "0123456789+= abcdefghijklmnopqrstuvwxyz"
PAD, EOS, BOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok():
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": 3}
    for char in CHARS:
        vocab[char] = len(vocab)
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    inner.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, attn_implementation="eager")
    lm = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make EOS likely enough that samples end before max_new_tokens most of the time
        lm.lm_head.weight[EOS] += 0.3 * lm.model.norm.weight.sign()
    return lm


@pytest.fixture(scope="module")
def gpt2(tok):
    """Absolute position embeddings: left padding is only right if position ids skip the pads."""
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=PAD,
                        eos_token_id=EOS, bos_token_id=BOS, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def encode(tok, text):
    return [BOS] + tok.encode(text, add_special_tokens=False)


PROMPTS = ["1+2=", "13+4=", "a"]  # different lengths: exercises left padding


class MarkovLM(torch.nn.Module):
    """A stub causal LM (no KV cache, no position ids): the next token is a fixed function of the last one."""

    def __init__(self, vocab_size: int, table: dict[int, int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.table = vocab_size, table
        self.calls = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.shape)
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row, last in enumerate(input_ids[:, -1].tolist()):
            logits[row, -1, self.table.get(last, EOS)] = 50.0
        return type("Out", (), {"logits": logits})()


class NoCache(torch.nn.Module):
    """Hides the KV cache of a Llama so the sampler recomputes the whole sequence each step."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def test_k_unique_responses_per_prompt(model, tok, one_torch_thread):
    ids = [encode(tok, p) for p in PROMPTS]
    out, stats = sample_responses(model, tok, ids, k=6, temperature=1.0, max_new_tokens=12, batch_size=5,
                                  return_stats=True)
    assert [len(r) for r in out] == [6, 6, 6]
    assert all(len(set(r)) == 6 for r in out)
    assert all("<" not in s for r in out for s in r)  # specials skipped
    assert stats.num_short == 0 and stats.mean_unique == 6 and stats.min_unique == 6
    assert stats.draws >= 18 and stats.num_prompts == 3


def test_deterministic_per_seed_and_global_rng_untouched(model, tok, one_torch_thread):
    ids = [encode(tok, p) for p in PROMPTS]
    state = torch.get_rng_state()
    a = sample_responses(model, tok, ids, k=4, temperature=1.0, max_new_tokens=10, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    b = sample_responses(model, tok, ids, k=4, temperature=1.0, max_new_tokens=10, seed=3)
    c = sample_responses(model, tok, ids, k=4, temperature=1.0, max_new_tokens=10, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_matches_hf_generate_unpadded(arch, request, tok, one_torch_thread):
    """Left padding, position ids and the KV cache against HF generate run one prompt at a time (no padding)."""
    model = request.getfixturevalue("model" if arch == "llama" else "gpt2")
    ids = [encode(tok, p) for p in PROMPTS]
    for stop in (EOS, 3):  # 3 = <unk>, never the argmax here: full-length continuations
        ours = sample_responses(model, tok, ids, k=1, temperature=0.0, max_new_tokens=15, unique=False, strip=False,
                                eos_token_ids=[stop])
        for prompt, (response,) in zip(ids, ours):
            mask = torch.ones(1, len(prompt), dtype=torch.long)
            generated = model.generate(torch.tensor([prompt]), attention_mask=mask,
                                       do_sample=False, max_new_tokens=15, eos_token_id=stop, pad_token_id=PAD)
            new = generated[0, len(prompt):].tolist()
            new = new[:new.index(stop)] if stop in new else new
            assert response == tok.decode(new, skip_special_tokens=True)
        if stop == 3:
            assert min(len(r[0]) for r in ours) >= 5  # non-trivial (specials such as EOS are decoded away)


def test_cached_sampling_equals_recompute_and_tiny_top_p_is_greedy(model, tok, one_torch_thread):
    ids = [encode(tok, p) for p in PROMPTS]
    kwargs = dict(k=3, temperature=1.0, top_p=0.9, max_new_tokens=10, unique=False, seed=7)
    assert sample_responses(model, tok, ids, **kwargs) == sample_responses(NoCache(model), tok, ids, **kwargs)
    greedy = sample_responses(model, tok, ids, k=1, temperature=0.0, max_new_tokens=10, unique=False)
    nucleus = sample_responses(model, tok, ids, k=1, temperature=1.0, top_p=1e-6, max_new_tokens=10, unique=False)
    assert greedy == nucleus


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers name
def test_peft_wrapped_policy(model, tok, one_torch_thread):
    """A LoRA-wrapped policy (fresh adapter = the base model) samples exactly as the base model."""
    import copy

    import peft
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = [encode(tok, p) for p in PROMPTS]
    kwargs = dict(k=3, temperature=1.0, max_new_tokens=8, seed=2)
    assert sample_responses(wrapped, tok, ids, **kwargs) == sample_responses(model, tok, ids, **kwargs)


def test_eos_stripping_and_impossible_uniqueness_is_counted(tok, caplog):
    v = tok.get_vocab()
    # '=' -> 'a' -> 'b' -> EOS -> 'z' -> 'z' ...: the response must be exactly "ab"
    lm = MarkovLM(len(tok), {v["="]: v["a"], v["a"]: v["b"], v["b"]: EOS, EOS: v["z"], v["z"]: v["z"], PAD: v["z"]})
    ids = [encode(tok, "1+2="), encode(tok, "3=")]
    with caplog.at_level(logging.WARNING, logger="lightning_plugins.modules.align.generation"):
        out, stats = sample_responses(lm, tok, ids, k=3, temperature=1.0, max_new_tokens=8, max_attempts_factor=4,
                                      return_stats=True)
    assert out == [["ab"], ["ab"]]
    assert stats.num_short == 2 and stats.mean_unique == 1.0 and stats.min_unique == 1
    assert stats.draws == 2 * 4 * 3  # the whole draw budget was spent
    assert stats.truncated == 0
    assert "fewer than k=3 unique" in caplog.text
    # unique=False keeps the duplicates; a draw without EOS within max_new_tokens is kept and counted
    lm_loop = MarkovLM(len(tok), {v["="]: v["a"], v["a"]: v["a"]})
    dup, stats = sample_responses(lm_loop, tok, ids, k=2, max_new_tokens=5, unique=False, return_stats=True)
    assert dup == [["aaaaa"] * 2] * 2 and stats.truncated == 4 and stats.num_short == 0


def test_argument_validation(model, tok):
    ids = [encode(tok, "1=")]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sample_responses(model, tok, ids, k=1, max_new_tokens=100)
    with pytest.raises(ValueError, match="prompt_ids\\[0\\]"):
        sample_responses(model, tok, [[]], k=1)
    with pytest.raises(ValueError, match="top_p"):
        sample_responses(model, tok, ids, k=1, top_p=0.0)
    with pytest.raises(ValueError, match="`k`"):
        sample_responses(model, tok, ids, k=0)


def test_rejection_sample_picks_the_preferred_string(model, tok, one_torch_thread):
    sample_kwargs = dict(temperature=1.0, max_new_tokens=10, seed=1)
    first = sample_responses(model, tok, [encode(tok, p) for p in PROMPTS], k=5, **sample_kwargs)
    targets = {p: r[3] for p, r in zip(PROMPTS, first)}
    calls = []

    def scorer(prompts, responses):
        calls.append(len(prompts))
        return torch.tensor([5.0 if targets[p] == r else -float(len(r)) for p, r in zip(prompts, responses)])

    rows = rejection_sample(model, tok, PROMPTS, scorer, k=5, encode_prompt=lambda t: encode(tok, t),
                            verifier=lambda p, r: r == targets[p], score_batch_size=4, **sample_kwargs)
    assert calls == [4, 4, 4, 3]
    for row, responses in zip(rows, first):
        assert row["responses"] == responses
        assert row["best"] == targets[row["prompt"]] and row["best_score"] == 5.0
        assert row["scores"][3] == 5.0 and len(row["scores"]) == 5
        assert row["correct"] == [False, False, False, True, False]
    # ties: the first occurrence wins
    flat = rejection_sample(model, tok, PROMPTS, lambda p, r: torch.zeros(len(p), 1), k=5,
                            encode_prompt=lambda t: encode(tok, t), **sample_kwargs)
    assert all(row["best"] == row["responses"][0] and "correct" not in row for row in flat)


def test_rejection_sample_rejects_bad_scores(model, tok):
    kwargs = dict(k=2, encode_prompt=lambda t: encode(tok, t), max_new_tokens=4)
    with pytest.raises(ValueError, match="shape"):
        rejection_sample(model, tok, ["1="], lambda p, r: torch.zeros(len(p) + 1), **kwargs)
    with pytest.raises(ValueError, match="non-finite"):
        rejection_sample(model, tok, ["1="], lambda p, r: torch.full((len(p),), float("nan")), **kwargs)


# ------------------------------------------------------------------------------------------------ best-of-k


def _brute_force(row, k, metric, draws):
    scores, n = row["scores"], len(row["scores"])
    values = [float(v) for v in (row["correct"] if metric == "correct" else scores)]
    if draws == "without_replacement":
        subsets = list(itertools.combinations(range(n), k))
    else:
        subsets = list(itertools.product(range(n), repeat=k))
    picks = [max(set(s), key=lambda j: (scores[j], -j)) for s in subsets]  # ties: the earlier response
    return sum(values[j] for j in picks) / len(picks)


def test_best_of_k_hand_computed():
    row = {"prompt": "p", "responses": list("abcd"), "scores": [3.0, 1.0, 2.0, 0.0],
           "correct": [False, True, True, False]}
    # k=2 subsets: {a,b}->a {a,c}->a {a,d}->a {b,c}->c {b,d}->b {c,d}->c: 3 of 6 correct
    curve = best_of_k_curve([row], ks=(1, 2, 4), metric="correct")
    assert curve == pytest.approx({1: 0.5, 2: 0.5, 4: 0.0})
    # expected max score over 2 of 4: (3+3+3+2+1+2)/6
    assert best_of_k_curve([row], ks=(2,), metric="score")[2] == pytest.approx(14 / 6)
    # with replacement, k=2: P(best drawn rank 0) = 1 - (3/4)^2 = 7/16, rank 1 (c): (3/4)^2-(2/4)^2 = 5/16,
    # rank 2 (b): (2/4)^2-(1/4)^2 = 3/16, rank 3 (d): 1/16 -> correct = 5/16 + 3/16
    assert best_of_k_curve([row], ks=(2,), draws="with_replacement")[2] == pytest.approx(0.5)


@pytest.mark.parametrize("draws", ["without_replacement", "with_replacement"])
@pytest.mark.parametrize("metric", ["correct", "score"])
def test_best_of_k_matches_brute_force_with_ties(metric, draws):
    rng = random.Random(0)
    rows = []
    for _ in range(12):
        n = rng.randint(1, 6)
        rows.append({"prompt": "p", "responses": [f"r{j}" for j in range(n)],
                     "scores": [float(rng.randint(0, 3)) for _ in range(n)],  # many ties
                     "correct": [rng.random() < 0.5 for _ in range(n)]})
    for k in range(1, 7):
        expected = sum(_brute_force(r, min(k, len(r["scores"])), metric, draws) for r in rows) / len(rows)
        assert best_of_k_curve(rows, ks=[k], metric=metric, draws=draws)[k] == pytest.approx(expected, abs=1e-12)


def test_best_of_k_large_k_and_errors(caplog):
    row = {"prompt": "p", "responses": [f"r{j}" for j in range(64)], "scores": [float(j % 7) for j in range(64)],
           "correct": [j % 7 == 6 for j in range(64)]}
    curve = best_of_k_curve([row], ks=(1, 4, 16, 64))
    assert curve[1] == pytest.approx(sum(row["correct"]) / 64)
    assert curve[64] == 1.0 and curve[1] < curve[4] < curve[16] <= curve[64]
    with caplog.at_level(logging.WARNING, logger="lightning_plugins.modules.align.best_of_k"):
        assert best_of_k_curve([row], ks=(128,))[128] == 1.0
    assert "fewer than k=128" in caplog.text
    no_labels = {"prompt": "p", "responses": ["a"], "scores": [1.0]}
    with pytest.raises(ValueError, match="no 'correct'"):
        best_of_k_curve([no_labels])
    with pytest.raises(ValueError, match="metric"):
        best_of_k_curve([row], metric="accuracy")
    with pytest.raises(ValueError, match="draws"):
        best_of_k_curve([row], draws="bootstrap")
    with pytest.raises(ValueError, match="empty"):
        best_of_k_curve([])


# ----------------------------------------------------------------------------------------------------- files


def test_jsonl_round_trip_and_fill_best(tmp_path):
    rows = [{"prompt": "1+1=", "responses": ["2", "3"], "scores": [0.5, 0.25], "best": "2", "best_score": 0.5,
             "correct": [True, False]},
            {"prompt": "é", "responses": ["x", "y", "z"], "scores": [1, 2, 2]}]
    path = write_jsonl(rows, tmp_path / "sub" / "rs.jsonl")
    back = read_multi_response_jsonl(path)
    assert back[0] == rows[0]
    assert back[1]["best"] == "y" and back[1]["best_score"] == 2  # filled, first occurrence among ties
    with pytest.raises(ValueError, match="row 0"):
        write_jsonl([{"prompt": "p", "scores": [float("nan")]}], tmp_path / "nan.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}', "2 responses but 1 scores"),
    ('{"prompt": "p", "responses": [], "scores": []}', "non-empty list"),
    ('{"prompt": "p", "responses": ["a"], "scores": ["high"]}', "finite numbers"),
    ('{"prompt": "p", "responses": ["a"], "scores": [true]}', "finite numbers"),
    ('{"prompt": "p", "responses": ["a"], "scores": [NaN]}', "finite numbers"),
    ('{"prompt": 3, "responses": ["a"], "scores": [1]}', "'prompt'"),
    ('{"prompt": "p", "responses": ["a"], "scores": [1], "correct": [1]}', "booleans"),
    ('{"prompt": "p", "responses": ["a"], "scores": [1], "best_score": "x"}', "best_score"),
    ('{"prompt": "p", ', "invalid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_read_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = '{"prompt": "p", "responses": ["a"], "scores": [1]}'
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as err:
        read_multi_response_jsonl(path)
    assert f"{path}:3:" in str(err.value)


def test_read_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_multi_response_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no rows"):
        read_multi_response_jsonl(tmp_path / "empty.jsonl")


def test_load_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+2="}\n\n{"prompt": "3+4=", "completion": "7"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["1+2=", "3+4="]
    (tmp_path / "p.txt").write_text("hello there\n\nsecond\n")
    assert load_prompts(tmp_path / "p.txt") == ["hello there", "second"]
    (tmp_path / "m.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="m.jsonl:1"):
        load_prompts(tmp_path / "m.jsonl")


def test_plot_best_of_k_writes_png(tmp_path):
    one = plot_best_of_k({1: 0.2, 4: 0.4, 16: 0.35}, tmp_path / "one.png")
    two = plot_best_of_k({"accuracy": {1: 0.2, 4: 0.4}, "best score": {"1": 0.1, "4": 0.9}}, tmp_path / "two.png")
    for path in (one, two):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------- end to end

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}


def _checkpoints(tmp_path):
    """One-step-trained SFTModule and RewardModel (char tokenizer) saved by a real Trainer."""
    import lightning.pytorch as pl

    from lightning_plugins.modules.align.loading import load_tokenizer
    from lightning_plugins.modules.align.reward_model import RewardModel
    from lightning_plugins.modules.align.sft import SFTModule

    char = load_tokenizer("char")
    enc = lambda text: char.encode(text, add_special_tokens=False)  # noqa: E731
    seqs = [enc("1+2=3") + [char.eos_token_id], enc("4+4=8") + [char.eos_token_id]]
    ids = torch.tensor(seqs)
    labels = ids.clone()
    labels[:, :4] = -100
    sft_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rm_ids = torch.tensor([enc("1+2=3") + [char.eos_token_id], enc("1+2=7") + [char.eos_token_id]])
    rm_batch = {"input_ids": rm_ids, "attention_mask": torch.ones_like(rm_ids),
                "completion_mask": torch.tensor([[0] * 4 + [1, 1]] * 2), "margin": torch.zeros(1),
                "pair_index": torch.arange(1)}
    paths = []
    for module, batch, name in ((SFTModule(TINY, tokenizer="char", lr=1e-3), sft_batch, "sft.ckpt"),
                                (RewardModel(TINY, tokenizer="char", lr=1e-3), rm_batch, "rm.ckpt")):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_steps=1,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
        trainer.save_checkpoint(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_run_rejection_sampling_end_to_end(tmp_path, one_torch_thread, quiet_lightning):
    from lightning_plugins.modules.align.arithmetic import ArithmeticVerifier
    from lightning_plugins.modules.align.reward_model import RewardModel
    from lightning_plugins.modules.align.sampling import run_rejection_sampling

    torch.manual_seed(0)
    policy, reward = _checkpoints(tmp_path)
    prompts = ["1+2=", "3+4=", "9+9=", "0+5=", "7+1="]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    kwargs = dict(policy=policy, reward_model=reward, prompts_path=str(tmp_path / "prompts.jsonl"), template="plain",
                  k=4, temperature=1.0, max_new_tokens=4, curve_ks=[1, 2, 4, 8], verifier="arithmetic", seed=0,
                  device="cpu", batch_size=8)
    summary = run_rejection_sampling(output_path=str(tmp_path / "out" / "rs.jsonl"), **kwargs)
    rows = read_multi_response_jsonl(tmp_path / "out" / "rs.jsonl")
    assert [r["prompt"] for r in rows] == prompts and summary["rows"] == 5
    counts = [len(r["responses"]) for r in rows]
    assert all(1 <= c <= 4 for c in counts) and all(len(set(r["responses"])) == len(r["responses"]) for r in rows)
    assert summary["num_short"] == sum(c < 4 for c in counts)
    assert summary["mean_unique"] == pytest.approx(sum(counts) / 5)
    # scores, best and labels recomputed independently
    rm = RewardModel.load_from_checkpoint(reward).eval()
    flat = [(r["prompt"], x) for r in rows for x in r["responses"]]
    expected = rm.score_texts([p for p, _ in flat], [x for _, x in flat], "plain")
    assert torch.allclose(torch.tensor([s for r in rows for s in r["scores"]]), expected, atol=1e-5)
    for r in rows:
        assert r["best_score"] == max(r["scores"]) and r["best"] == r["responses"][r["scores"].index(max(r["scores"]))]
        assert r["correct"] == [ArithmeticVerifier.is_correct(r["prompt"], x) for x in r["responses"]]
    curve = json.loads((tmp_path / "out" / "rs.curve.json").read_text())
    assert set(curve["curves"]) == {"accuracy", "best score"} and list(curve["curves"]["accuracy"]) == ["1", "2", "4"]
    assert curve["curves"]["accuracy"]["2"] == pytest.approx(best_of_k_curve(rows, [2])[2])
    assert summary["curves"]["best score"][4] == pytest.approx(sum(r["best_score"] for r in rows) / 5)
    assert (tmp_path / "out" / "rs.curve.png").read_bytes()[:4] == b"\x89PNG"
    # same seed, same file
    run_rejection_sampling(output_path=str(tmp_path / "again.jsonl"), **kwargs)
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "out" / "rs.jsonl").read_text()
    with pytest.raises(ValueError, match="verifier"):
        run_rejection_sampling(output_path=str(tmp_path / "x.jsonl"), **{**kwargs, "verifier": "math"})
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        run_rejection_sampling(output_path=str(tmp_path / "x.jsonl"), **{**kwargs, "policy": "missing.ckpt"})
