"""LoRA wrapper: numerics against peft, explicit merge/re-init, target discovery on several model families."""

import math

import pytest
import torch
from torch import nn

from lightning_plugins.callbacks.gslora.lora import (
    LoRALinear,
    find_lora,
    find_target_layers,
    group_lora_parameters,
    inject_lora,
    remove_lora,
)


class FFN(nn.Module):
    def __init__(self, dim=6, hidden=10):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(6, 6)
        self.mlp = FFN()

    def forward(self, x):
        return self.mlp(self.attn(x))


class TinyNet(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_forward_and_merge_match_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 10))
    reference = peft.inject_adapter_in_model(
        peft.LoraConfig(r=8, lora_alpha=1, lora_dropout=0.0, target_modules=["0"], init_lora_weights=True),
        nn.Sequential(nn.Linear(6, 10)),
    )
    reference[0].base_layer.load_state_dict(base[0].state_dict())
    ours = LoRALinear(base[0], rank=8, alpha=1.0)
    assert ours.scaling == pytest.approx(1 / 8) == reference[0].scaling["default"]
    with torch.no_grad():
        ours.lora_A.normal_()
        ours.lora_B.normal_()
        reference[0].lora_A["default"].weight.copy_(ours.lora_A)
        reference[0].lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), reference(x))
    reference[0].merge(adapter_names=["default"])
    ours.merge_()
    torch.testing.assert_close(ours.base_layer.weight, reference[0].base_layer.weight)
    # after the explicit merge the adapter is fresh: B = 0, so the output is the merged layer's alone
    assert not ours.lora_B.any()
    torch.testing.assert_close(ours(x), reference(x))


def test_init_is_loralib_kaiming_and_zero():
    layer = LoRALinear(nn.Linear(64, 32), rank=8)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert layer.lora_A.abs().max() <= bound
    assert float(layer.lora_A.std()) == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert not layer.lora_B.any()
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_no_merge_on_eval_and_seeded_reset():
    layer = LoRALinear(nn.Linear(4, 4))
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    weight = layer.base_layer.weight.clone()
    layer.eval()
    layer.train()
    assert torch.equal(layer.base_layer.weight, weight)
    layer.reset_lora(torch.Generator().manual_seed(3))
    first = layer.lora_A.clone()
    layer.reset_lora(torch.Generator().manual_seed(3))
    assert torch.equal(first, layer.lora_A)


def test_half_precision_base_keeps_float32_adapter():
    layer = LoRALinear(nn.Linear(4, 3).to(torch.bfloat16))
    assert layer.lora_A.dtype == torch.float32
    out = layer(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_inject_is_idempotent_groups_by_block_and_remove_restores_keys():
    net = TinyNet()
    keys = set(net.state_dict())
    adapters = inject_lora(net)
    assert list(adapters) == [f"blocks.{i}.mlp.fc{j}" for i in range(3) for j in (1, 2)]
    assert inject_lora(net) == adapters
    layers = find_target_layers(net)
    groups = group_lora_parameters(adapters, layers, "block")
    assert list(groups) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(len(tensors) == 4 for tensors in groups.values())
    assert len(group_lora_parameters(adapters, layers, "layer")) == 6
    assert len(group_lora_parameters(adapters, layers, "matrix")) == 12
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_B.normal_()
    x = torch.randn(2, 6)
    expected = net(x)
    assert remove_lora(net) == 6
    assert not find_lora(net) and set(net.state_dict()) == keys
    torch.testing.assert_close(net(x), expected)


def test_inject_rejects_other_rank():
    net = TinyNet()
    inject_lora(net, rank=8)
    with pytest.raises(ValueError, match="already has a LoRA adapter of rank 8"):
        inject_lora(net, rank=4)


def test_no_match_lists_linear_layers():
    with pytest.raises(ValueError) as err:
        find_target_layers(TinyNet(), r"transformer\.h\.\d+\.mlp\.c_fc")
    message = str(err.value)
    assert "no Linear layer of TinyNet fully matches" in message
    assert "'blocks.0.attn'" in message and "'blocks.0.mlp.fc1'" in message and "target=" in message


def test_match_on_non_linear_is_an_error():
    with pytest.raises(ValueError, match=r"matches 'blocks.0.mlp', a FFN; GS-LoRA adapts nn.Linear layers only"):
        find_target_layers(TinyNet(), r"(?P<block>blocks\.\d+)\.mlp")


def test_bad_pattern():
    with pytest.raises(ValueError, match="not a valid regex"):
        find_target_layers(TinyNet(), "blocks.(")


def test_default_targets_find_project_vit():
    from lightning_plugins.modules import ImageClassifier

    layers = find_target_layers(ImageClassifier(depth=2, embed_dim=16, num_heads=2))
    assert [(t.name, t.block) for t in layers] == [
        (f"backbone.blocks.{i}.mlp.fc{j}", f"backbone.blocks.{i}") for i in range(2) for j in (1, 2)
    ]


def test_default_targets_find_torchvision_vit():
    vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")
    model = vision_transformer.VisionTransformer(
        image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    layers = find_target_layers(model)
    assert [(t.name, t.block) for t in layers] == [
        (f"encoder.layers.encoder_layer_{i}.mlp.{j}", f"encoder.layers.encoder_layer_{i}") for i in range(2)
        for j in (0, 3)
    ]


def _named_tree(names):
    """A module whose Linear layers have exactly the given dotted names."""
    root = nn.Module()
    for name in names:
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, nn.Linear(2, 2))
    return root


def test_default_targets_on_hugging_face_v4_names():
    # BERT and ViT in transformers 4: FFN = layer.N.intermediate.dense and layer.N.output.dense; the attention's
    # own output projection (layer.N.attention.output.dense) is not an FFN layer
    names = [f"vit.encoder.layer.{i}.{p}" for i in range(2)
             for p in ("attention.attention.query", "attention.output.dense", "intermediate.dense", "output.dense")]
    layers = find_target_layers(_named_tree(names))
    assert [t.name for t in layers] == [f"vit.encoder.layer.{i}.{p}" for i in range(2)
                                        for p in ("intermediate.dense", "output.dense")]
    assert {t.block for t in layers} == {"vit.encoder.layer.0", "vit.encoder.layer.1"}


def test_default_targets_on_hugging_face_models():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50))
    assert [t.name for t in find_target_layers(bert)] == [
        f"encoder.layer.{i}.{p}" for i in range(2) for p in ("intermediate.dense", "output.dense")]
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
        vocab_size=50))
    layers = find_target_layers(llama)
    assert [t.name for t in layers] == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2)
                                        for p in ("gate", "up", "down")]
    assert {t.block for t in layers} == {"model.layers.0", "model.layers.1"}
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
        patch_size=4, num_channels=1, num_labels=3))
    names = [t.name for t in find_target_layers(vit)]
    assert len(names) == 4 and all("attention" not in n for n in names)
