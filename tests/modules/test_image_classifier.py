"""ImageClassifier: shapes, embedding, custom backbones, metrics, schedule, errors and a real training run."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_plugins.modules import DigitsDataModule, ImageClassifier
from lightning_plugins.modules.backbones import VisionTransformer
from lightning_plugins.modules.schedules import warmup_cosine

TINY_VIT = dict(image_size=8, in_channels=1, patch_size=2, embed_dim=32, depth=2, num_heads=2)


def test_forward_is_head_of_embedding():
    model = ImageClassifier(num_classes=10, **TINY_VIT).eval()
    images = torch.randn(5, 1, 8, 8)
    embedding = model.embed(images)
    assert embedding.shape == (5, 32)
    assert torch.allclose(model(images), model.head(embedding))


def test_vit_ffn_layers_are_named_like_timm():
    vit = VisionTransformer(image_size=8, patch_size=2, embed_dim=16, depth=3, num_heads=2, mlp_ratio=4)
    names = {name for name, module in vit.named_modules() if isinstance(module, nn.Linear)}
    for block in range(3):
        assert {f"blocks.{block}.mlp.fc1", f"blocks.{block}.mlp.fc2"} <= names
    assert vit.blocks[0].mlp.fc1.out_features == 64


def test_vit_attention_matches_a_plain_reference():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=4, patch_size=2, embed_dim=8, depth=1, num_heads=2).eval()
    attention = vit.blocks[0].attn
    tokens = torch.randn(3, 5, 8)
    reference = nn.MultiheadAttention(8, 2, batch_first=True)
    reference.in_proj_weight.data.copy_(attention.qkv.weight)
    reference.in_proj_bias.data.copy_(attention.qkv.bias)
    reference.out_proj.weight.data.copy_(attention.proj.weight)
    reference.out_proj.bias.data.copy_(attention.proj.bias)
    expected, _ = reference(tokens, tokens, tokens, need_weights=False)
    assert torch.allclose(attention(tokens), expected, atol=1e-6)


def test_custom_backbone_width_from_attribute_or_probe():
    probed = ImageClassifier(num_classes=3, backbone=nn.Sequential(nn.Flatten(), nn.Linear(64, 7)), image_size=8)
    assert probed.head.in_features == 7
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    backbone.num_features = 5
    assert ImageClassifier(num_classes=3, backbone=backbone).head.in_features == 5
    assert "backbone" not in ImageClassifier(num_classes=3, backbone=backbone).hparams


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_classes": -1}, ValueError, "num_classes must be an integer >= 2, got -1"),
        ({"backbone": "resnet9000"}, ValueError, "unknown backbone 'resnet9000'; choose one of \\['vit'\\]"),
        ({"backbone": 3}, TypeError, "backbone must be a name or an nn.Module"),
        ({"patch_size": 3}, ValueError, "patch_size=3 must divide image_size=8"),
        ({"num_heads": 3}, ValueError, "num_heads=3 must divide embed_dim=32"),
        ({"lr": 0}, ValueError, "lr must be > 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, error, message):
    with pytest.raises(error, match=message):
        ImageClassifier(**{**TINY_VIT, **kwargs})


def test_backbone_must_return_flat_features():
    with pytest.raises(ValueError, match="features \\[B, d\\]"):
        ImageClassifier(num_classes=3, backbone=nn.Conv2d(1, 4, 3), image_size=8)


def test_wrong_image_shape_is_reported():
    model = ImageClassifier(num_classes=10, **TINY_VIT)
    with pytest.raises(ValueError, match="expects images of shape \\[B, 1, 8, 8\\]"):
        model(torch.randn(2, 1, 28, 28))


def test_warmup_cosine_schedule_values():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = ImageClassifier(num_classes=10, **TINY_VIT)
    trainer = pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    model.trainer = trainer
    decay, no_decay = model.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.backbone.pos_embed) in no_decay_ids and id(model.head.bias) in no_decay_ids
    assert id(model.head.weight) not in no_decay_ids


def test_num_classes_mismatch_with_data_is_reported():
    model = ImageClassifier(num_classes=5, **TINY_VIT)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="num_classes=5 but DigitsDataModule has 10 classes"):
        trainer.fit(model, DigitsDataModule())
