"""Chat templates: Xwin-LM's exact Vicuna string, span masks, EOS ids, prompt prefixes, template files and errors."""

from __future__ import annotations

import json

import pytest

from lightning_plugins.modules.align.loading import load_tokenizer
from lightning_plugins.modules.align.templates import TEMPLATES, ChatTemplate, get_template

# alignment.md §1.1, the Xwin-LM README "Conversation Template".
README = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>"
)
CHAT = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("char")


def expected_readme(eos: str) -> str:
    return README.format(u1="Hi!", a1="Hello.", u2="2+2?", a2="4").replace("</s>", eos)


def test_vicuna_matches_xwin_readme_exactly(tok):
    tpl = get_template("vicuna_v1.1")
    ids, mask = tpl.encode(tok, CHAT)
    assert ids[0] == tok.bos_token_id  # Llama-2 style BOS, once
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == expected_readme(tok.eos_token)
    assert tpl.render(CHAT) == expected_readme("</s>")
    assert get_template() is tpl  # the default


def test_loss_mask_is_exactly_assistant_spans_and_eos(tok):
    tpl = get_template("vicuna_v1.1")
    ids, mask = tpl.encode(tok, CHAT)
    assert len(ids) == len(mask)
    # Independent reference: locate " Hello.<eos>" and " 4<eos>" in the rendered string (1 char = 1 token).
    text = "\x00" + expected_readme("\x01")  # BOS and EOS as one placeholder char each
    want = [0] * len(text)
    for answer in (" Hello.\x01", " 4\x01"):
        assert text.count(answer) == 1
        start = text.index(answer)
        want[start:start + len(answer)] = [1] * len(answer)
    assert mask == want
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == " Hello.<eos> 4<eos>"
    # EOS is an id, never a tokenized literal, and appears exactly after each assistant turn.
    assert ids.count(tok.eos_token_id) == 2


def test_prompt_ids_are_a_prefix_and_end_with_generation_prompt(tok):
    for name in TEMPLATES:
        tpl = get_template(name)
        msgs = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
        full, mask = tpl.encode(tok, msgs)
        prompt = tpl.prompt_ids(tok, "3+4=")
        assert full[: len(prompt)] == prompt, name
        assert mask[: len(prompt)] == [0] * len(prompt), name
        assert mask.index(1) == len(prompt), name
    assert tok.decode(get_template("vicuna_v1.1").prompt_ids(tok, "hi")).endswith("USER: hi ASSISTANT:")


def test_plain_template_is_undecorated(tok):
    tpl = get_template("plain")
    ids, mask = tpl.encode(tok, [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}])
    assert ids == tok("3+4=7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert mask == [0, 0, 0, 0, 1, 1]


def test_chatml_and_system_messages(tok):
    tpl = get_template("chatml")
    msgs = [{"role": "system", "content": "Be brief."}] + CHAT[:2]
    assert tpl.render(msgs, eos_text="<|im_end|>") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    vic = get_template("vicuna_v1.1")
    assert vic.render([{"role": "system", "content": "S."}] + CHAT[:2]) == "S. USER: Hi! ASSISTANT: Hello.</s>"
    assert vic.render(CHAT[:1], add_generation_prompt=True).endswith("USER: Hi! ASSISTANT:")


def test_unknown_template_lists_names():
    with pytest.raises(ValueError, match="vicuna_v1.1") as err:
        get_template("vicuna")
    assert "chatml" in str(err.value) and "plain" in str(err.value)


def test_template_file(tmp_path, tok):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"user_template": "Q: {content}\n", "assistant_prefix": "A:",
                                "assistant_template": " {content}"}))
    tpl = get_template(str(path))
    assert tpl.name == "mine"
    assert tpl.render(CHAT[:2]) == "Q: Hi!\nA: Hello.</s>"
    yml = tmp_path / "t.yaml"
    yml.write_text("user_template: 'U {content}'\nassistant_template: '{content}'\nadd_bos: true\n")
    ids, _ = get_template(str(yml)).encode(tok, CHAT[:2])
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "U Hi!Hello.<eos>"


def test_template_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("user_template: 'U {content}'\n")
    with pytest.raises(ValueError, match="assistant_template"):
        get_template(str(bad))
    bad.write_text("user_template: 'U {content}'\nassistant_template: '{content}'\nsystem: x\n")
    with pytest.raises(ValueError, match="system"):
        get_template(str(bad))
    bad.write_text("user_template: 'U'\nassistant_template: '{content}'\n")
    with pytest.raises(ValueError, match="user_template"):
        get_template(str(bad))
    with pytest.raises(FileNotFoundError):
        get_template(str(tmp_path / "missing.yaml"))


def test_bad_messages(tok):
    tpl = get_template("plain")
    with pytest.raises(ValueError, match="role"):
        tpl.encode(tok, [{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="system"):
        tpl.encode(tok, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(TypeError):
        tpl.encode(tok, "just a string")


def test_no_eos_token_is_an_error(tok):
    tpl = ChatTemplate(user_template="{content}", assistant_template="{content}")
    tok2 = load_tokenizer("char")
    tok2.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        tpl.encode(tok2, CHAT[:2])
