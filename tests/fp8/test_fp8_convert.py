"""convert_to_fp8: filter, exclusions, skip reasons, report table, errors, portable state dict."""

import logging

import pytest
import torch
from torch import nn

from lightning_plugins.fp8 import FP8Linear, ScalingRegistry, convert_to_fp8, matches_pattern


class TinyLM(nn.Module):
    def __init__(self, vocab=48, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(dim, 4 * dim), "down": nn.Linear(4 * dim, dim)}) for _ in range(2)
        )
        self.odd = nn.Linear(dim, 10)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)  # out_proj is a Linear subclass
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block["down"](torch.relu(block["up"](h)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.lm_head(h) + self.odd(h).sum(-1, keepdim=True)


def _reasons(report):
    return {d.name: d.reason for d in report.skipped}


def test_converts_eligible_layers_and_reports_each_skip():
    torch.manual_seed(0)
    model = TinyLM()
    report = convert_to_fp8(model)
    assert sorted(d.name for d in report.converted) == [
        "blocks.0.down",
        "blocks.0.up",
        "blocks.1.down",
        "blocks.1.up",
    ]
    reasons = _reasons(report)
    assert reasons["lm_head"] == "excluded by pattern 'lm_head'"
    assert reasons["odd"] == "out_features=10 is not a multiple of 16"
    assert "subclass" in reasons["attn.out_proj"]
    assert isinstance(model.blocks[0]["up"], FP8Linear) and type(model.odd) is nn.Linear
    table = report.table()
    for name in ("blocks.0.up", "lm_head", "odd", "attn.out_proj"):
        assert name in table
    assert "4 converted" in table and "3 skipped" in table
    model(torch.randint(0, 48, (2, 5))).sum().backward()  # still trains


def test_tied_weight_is_skipped_even_without_exclusion():
    model = TinyLM()
    report = convert_to_fp8(model, exclude=())
    assert _reasons(report)["lm_head"] == "tied weight (shared with embed.weight)"


def test_module_filter_and_user_exclusions():
    model = TinyLM()
    report = convert_to_fp8(model, module_filter_fn=lambda mod, name: name.startswith("blocks.0"), exclude=["down"])
    assert [d.name for d in report.converted] == ["blocks.0.up"]
    reasons = _reasons(report)
    assert reasons["blocks.1.up"] == "module_filter_fn returned False"
    assert reasons["blocks.0.down"] == "excluded by pattern 'down'"


def test_glob_and_component_patterns():
    assert matches_pattern("model.lm_head", "lm_head")
    assert matches_pattern("blocks.1.up", "blocks.1")
    assert not matches_pattern("multihead.proj", "head")
    assert not matches_pattern("blocks.10.up", "blocks.1")
    assert matches_pattern("blocks.3.up", "blocks.*.up")


def test_unmatched_user_pattern_warns():
    with pytest.warns(UserWarning, match="matched no linear layer"):
        report = convert_to_fp8(TinyLM(), exclude=("lm_head", "output_layer"))
    assert report.unmatched_exclude == ("output_layer",)


def test_zero_converted_is_an_error_with_the_table():
    pattern = r"converted no layer(.|\n)*blocks.0.up(.|\n)*module_filter_fn returned False"
    with pytest.raises(RuntimeError, match=pattern):
        convert_to_fp8(TinyLM(), module_filter_fn=lambda mod, name: False)
    with pytest.raises(RuntimeError, match="no layer of a supported type"):
        convert_to_fp8(nn.Sequential(nn.ReLU()))
    with pytest.raises(RuntimeError, match="not a multiple of 16"):
        convert_to_fp8(nn.Sequential(nn.Linear(10, 20)))


def test_second_call_is_idempotent():
    model = TinyLM()
    convert_to_fp8(model)
    report = convert_to_fp8(model)
    assert not report.converted and len(report.already_fp8) == 4


def test_shared_linear_is_swapped_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = convert_to_fp8(model)
    assert len(report.converted) == 1
    assert isinstance(model[0], FP8Linear) and model[0] is model[2]


def test_parameters_and_state_dict_survive_conversion():
    torch.manual_seed(0)
    model = TinyLM()
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    convert_to_fp8(model)
    assert [id(p) for p in model.parameters()] == params_before  # an existing optimizer stays valid
    assert list(model.state_dict()) == keys_before
    plain = TinyLM()
    plain.load_state_dict(model.state_dict())  # strict, into plain nn.Linear layers
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_scaling_registry_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    convert_to_fp8(model)
    registry = ScalingRegistry(model)
    assert len(registry) == 4 and len(registry.states()) == 16
    for _ in range(3):
        model(torch.randint(0, 48, (2, 5))).sum().backward()
        registry.update()
    torch.save(registry.state_dict(), tmp_path / "scales.pt")
    other = TinyLM()
    convert_to_fp8(other)
    other_registry = ScalingRegistry(other)
    other_registry.load_state_dict(torch.load(tmp_path / "scales.pt", weights_only=True))
    for key, state in registry.states().items():
        loaded = other_registry.states()[key]
        assert torch.equal(state.scale, loaded.scale) and torch.equal(state.amax_history, loaded.amax_history)
        assert torch.equal(state.counter, loaded.counter)
    partial = TinyLM()
    convert_to_fp8(partial, exclude=("lm_head", "blocks.1"))
    with pytest.raises(ValueError, match=r"missing \[\].*unexpected \['blocks.1.down', 'blocks.1.up'\]"):
        ScalingRegistry(partial).load_state_dict(registry.state_dict())


def test_table_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_plugins.fp8.convert"):
        convert_to_fp8(TinyLM())
    assert "FP8 conversion: 4 converted" in caplog.text


def test_bad_arguments():
    with pytest.raises(ValueError, match="root module cannot be an nn.Linear"):
        convert_to_fp8(nn.Linear(16, 16))
    with pytest.raises(TypeError, match="nn.Module"):
        convert_to_fp8("model")
    with pytest.raises(TypeError, match="callable"):
        convert_to_fp8(TinyLM(), module_filter_fn="blocks")
    with pytest.raises(TypeError, match="non-empty strings"):
        convert_to_fp8(TinyLM(), exclude=["lm_head", 3])
    with pytest.raises(ValueError, match="allowed"):
        convert_to_fp8(TinyLM(), backend="fp8")
    with pytest.raises(ValueError, match="dim_multiple"):
        convert_to_fp8(TinyLM(), dim_multiple=0)
