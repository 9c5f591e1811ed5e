"""`load_tokenizer` / `load_causal_lm` / `load_encoder`: char tokenizer, config dicts, errors, real offline models."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_plugins.modules.align import loading
from lightning_plugins.modules.align.loading import CACHE_ENV, load_causal_lm, load_encoder, load_tokenizer

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


def test_char_tokenizer_ids_and_roundtrip():
    tok = load_tokenizer("char")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert len(tok) == 4 + 1 + 95
    assert tok.convert_tokens_to_ids("\n") == 4
    assert tok.convert_tokens_to_ids(" ") == 5
    assert tok.convert_tokens_to_ids("~") == 99
    text = "USER: 3+4= ?\nASSISTANT: 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [4 + 1 + ord(c) - 32 if c != "\n" else 4 for c in text]  # one id per character
    assert tok.decode(ids) == text
    assert tok("a\tb", add_special_tokens=False)["input_ids"] == [70, 3, 71]
    assert tok.padding_side == "right"


def test_tiny_llama_from_dict_takes_ids_from_tokenizer():
    tok = load_tokenizer("char")
    torch.manual_seed(0)
    model = load_causal_lm(TINY, tok)
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (100, 0, 1, 2)
    assert cfg._attn_implementation == "eager"
    batch = tok(["ab", "abc"], padding=True, return_tensors="pt", add_special_tokens=False)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape == (2, 3, 100)
    assert next(model.parameters()).dtype == torch.float32


def test_dict_config_errors():
    tok = load_tokenizer("char")
    with pytest.raises(ValueError, match="vocab_size=50"):
        load_causal_lm({**TINY, "vocab_size": 50}, tok)
    with pytest.raises(ValueError, match="not-a-model"):
        load_causal_lm({**TINY, "model_type": "not-a-model"}, tok)
    with pytest.raises(TypeError):
        load_causal_lm(3, tok)


def test_missing_paths_raise_file_not_found(tmp_path):
    missing = str(tmp_path / "nope")
    for fn in (load_causal_lm, load_tokenizer, load_encoder):
        with pytest.raises(FileNotFoundError, match="nope"):
            fn(missing)


def test_local_folder_roundtrip(tmp_path):
    tok = load_tokenizer("char")
    torch.manual_seed(0)
    model = load_causal_lm(TINY, tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = load_tokenizer(str(tmp_path))
    assert tok2("a+b=", add_special_tokens=False)["input_ids"] == tok("a+b=", add_special_tokens=False)["input_ids"]
    model2 = load_causal_lm(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value), key
    torch.testing.assert_close(model2(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_encoder_from_dict():
    tok = load_tokenizer("char")
    enc = load_encoder(
        {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}, tok
    )
    assert type(enc).__name__ == "BertModel"
    assert enc.config.vocab_size == 100 and enc.config.pad_token_id == 0
    out = enc(input_ids=torch.tensor([[2, 40, 41, 1]]))
    assert out.last_hidden_state.shape == (1, 4, 32)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert loading.cache_root() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    assert loading.cache_root() == loading.Path.home() / ".cache" / "lightning-plugins"


def test_atomic_write_keeps_existing_target(tmp_path):
    target = tmp_path / "entry"

    def write(d):
        (d / "f.txt").write_text("first")

    loading._atomic_write_dir(target, write)
    loading._atomic_write_dir(target, lambda d: (d / "f.txt").write_text("second"))  # lost race: keep the first
    assert (target / "f.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temp dirs left behind


@pytest.mark.slow
def test_smollm2_gguf_loads_caches_and_answers(monkeypatch, tmp_path, one_torch_thread):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    tok = load_tokenizer("smollm2-135m-instruct")
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    model = load_causal_lm("smollm2-135m-instruct", tok)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    entries = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert [e.rsplit(".", 1)[-1] for e in entries] == ["model", "tokenizer"]
    model_dir = tmp_path / "gguf" / entries[0]
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    mtime = os.stat(model_dir / "model.safetensors").st_mtime_ns
    cached = load_causal_lm("smollm2-135m-instruct", tok)  # from the cache: same weights, no rewrite
    assert os.stat(model_dir / "model.safetensors").st_mtime_ns == mtime
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7+5?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = cached.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "12" in answer


@pytest.mark.slow
def test_minilm_encoder_alias(one_torch_thread):
    tok = load_tokenizer("all-minilm-l6-v2")
    enc = load_encoder("all-minilm-l6-v2", tok)
    assert type(enc).__name__ == "BertModel" and enc.config.vocab_size == 30522
    batch = tok(["a cat sits", "a dog runs fast"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape and hidden.shape[-1] == 384
    assert torch.isfinite(hidden).all()


def test_pretrained_model_rejects_a_larger_tokenizer(tmp_path):
    tok = load_tokenizer("char")
    load_causal_lm({**TINY, "vocab_size": 120}, tok).save_pretrained(tmp_path)
    assert load_causal_lm(str(tmp_path), tok).config.vocab_size == 120
    small = load_causal_lm({**TINY, "vocab_size": 100}, tok)
    small.save_pretrained(tmp_path / "small")
    tok.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="101 tokens"):
        load_causal_lm(str(tmp_path / "small"), tok)
