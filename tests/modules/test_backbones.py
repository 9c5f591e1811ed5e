"""The backbone registry: IResNet (ArcFace), the face ViT presets, FaceNet, torchvision/timm adapters, errors, and
``ImageClassifier`` on a registry name."""

import sys
import time
import types

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_plugins.modules import ImageClassifier
from lightning_plugins.modules.backbones import (
    BACKBONES,
    IResNet,
    VisionTransformer,
    backbone_names,
    backbone_parameters,
    build_backbone,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- IResNet ------------------------------------------------------------------------------------------------------
def test_iresnet_param_counts_match_insightface():
    # insightface arcface_torch's iresnet18 / iresnet50 (112x112, embedding 512, BN1d `features` included)
    assert count(build_backbone("iresnet18")) == 24_025_600
    assert count(build_backbone("iresnet50")) == 43_590_848
    small = build_backbone("iresnet_small")
    assert count(small) == 571_744 and small.num_features == 128 and small.layers == (1, 1, 1)


def test_iresnet_state_dict_uses_arcface_names():
    keys = set(build_backbone("iresnet", layers=(1, 2), widths=(4, 8), image_size=8, embed_dim=6).state_dict())
    expected = {
        "conv1.weight", "bn1.weight", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
        "layer1.0.bn2.running_var", "layer1.0.prelu.weight", "layer1.0.conv2.weight", "layer1.0.bn3.bias",
        "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer2.1.conv2.weight", "bn2.weight",
        "fc.weight", "fc.bias", "features.weight", "features.bias", "features.running_mean",
    }
    assert expected <= keys
    assert "layer2.1.downsample.0.weight" not in keys  # identity shortcut inside a stage
    assert not any(k.startswith("layer3") for k in keys)


def test_iresnet_block_matches_a_functional_reference():
    torch.manual_seed(0)
    model = IResNet(layers=(2,), widths=(6,), image_size=8, in_channels=2, embed_dim=5).eval()
    for module in model.modules():  # non-trivial BN statistics and PReLU slopes
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
        if isinstance(module, nn.PReLU):
            module.weight.data.uniform_(0.0, 0.5)
    images = torch.randn(3, 2, 8, 8)

    def bn(x, m):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - m.running_mean.view(shape)) / (m.running_var.view(shape) + 1e-5).sqrt() * m.weight.view(
            shape) + m.bias.view(shape)

    def prelu(x, m):
        slope = m.weight.view(1, -1, 1, 1)
        return torch.where(x >= 0, x, slope * x)

    x = prelu(bn(F.conv2d(images, model.conv1.weight, padding=1), model.bn1), model.prelu)
    for index, block in enumerate(model.layer1):
        stride = 2 if index == 0 else 1
        out = F.conv2d(bn(x, block.bn1), block.conv1.weight, padding=1)
        out = F.conv2d(prelu(bn(out, block.bn2), block.prelu), block.conv2.weight, stride=stride, padding=1)
        out = bn(out, block.bn3)
        short = x if block.downsample is None else bn(F.conv2d(x, block.downsample[0].weight, stride=2),
                                                      block.downsample[1])
        x = out + short
    expected = bn(F.linear(bn(x, model.bn2).flatten(1), model.fc.weight, model.fc.bias), model.features)
    assert model.layer1[0].downsample is not None and model.layer1[1].downsample is None
    assert torch.allclose(model(images), expected, atol=1e-5)


@pytest.mark.parametrize("image_size", [112, 64])
def test_iresnet_takes_any_size_divisible_by_two_to_the_stages(image_size):
    model = build_backbone("iresnet", layers=(1, 1, 1, 1), widths=(4, 8, 8, 16), image_size=image_size).eval()
    assert model.fc.in_features == 16 * (image_size // 16) ** 2
    assert model(torch.randn(2, 3, image_size, image_size)).shape == (2, 512) and model.num_features == 512


def test_iresnet_rejects_disallowed_sizes_and_wrong_inputs():
    with pytest.raises(ValueError, match="image_size=100 is not allowed with 4 stages.*multiple of 16 \\(16, 32"):
        build_backbone("iresnet18", image_size=100)
    with pytest.raises(ValueError, match="image_size=28 is not allowed with 3 stages.*multiple of 8"):
        build_backbone("iresnet_small", image_size=28)
    with pytest.raises(ValueError, match="widths must be 3 positive integers"):
        IResNet(layers=(1, 1, 1), widths=(8, 16))
    model = build_backbone("iresnet_small")
    with pytest.raises(ValueError, match="expects images of shape \\[B, 3, 32, 32\\], got \\[2, 3, 28, 28\\]"):
        model(torch.randn(2, 3, 28, 28))


def test_iresnet_embedding_bn_weight_stays_frozen_at_one():
    torch.manual_seed(0)
    model = build_backbone("iresnet_small")
    assert not model.features.weight.requires_grad
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(model.features.weight, torch.ones(128))
    assert not torch.equal(model.features.bias, before["features.bias"])
    assert not torch.equal(model.fc.weight, before["fc.weight"])


def test_iresnet_small_learns_a_ten_identity_task():
    torch.manual_seed(0)
    prototypes = torch.randn(10, 3, 32, 32)
    generator = torch.Generator().manual_seed(1)

    def sample(per_class):
        labels = torch.arange(10).repeat_interleave(per_class)
        return prototypes[labels] + torch.randn(len(labels), 3, 32, 32, generator=generator), labels

    images, labels = sample(20)
    test_images, test_labels = sample(10)
    backbone = build_backbone("iresnet_small")
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(2):
        order = torch.randperm(len(labels))
        for begin in range(0, len(labels), 25):
            batch = order[begin:begin + 25]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    assert time.perf_counter() - start < 10
    assert accuracy >= 0.9


# -- ViT presets --------------------------------------------------------------------------------------------------
def test_vit_name_builds_the_unchanged_vision_transformer():
    assert BACKBONES["vit"] is VisionTransformer
    torch.manual_seed(3)
    reference = VisionTransformer(image_size=8, patch_size=2, depth=1, embed_dim=16, num_heads=2)
    torch.manual_seed(3)
    built = build_backbone("vit", image_size=8, patch_size=2, depth=1, embed_dim=16, num_heads=2)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), built.state_dict().values()))


def test_vit_face_is_the_gs_lora_face_transformer():
    model = build_backbone("vit_face")
    assert count(model) == 19_115_520
    assert model.num_features == 512 and len(model.blocks) == 6 and model.blocks[0].attn.num_heads == 8
    assert model.patch_embed.proj.kernel_size == (8, 8) and model.pos_embed.shape == (1, 14 * 14 + 1, 512)
    assert model.blocks[0].mlp.fc1.out_features == 2048
    override = build_backbone("vit_face", depth=1, image_size=16, embed_dim=32, num_heads=2)
    assert len(override.blocks) == 1 and override(torch.randn(2, 3, 16, 16)).shape == (2, 32)


@pytest.mark.parametrize("side", [32, 25])
def test_vit_face_small_takes_any_size(side):
    model = build_backbone("vit_face_small").eval()
    assert model.stem == "conv" and model.num_features == 128 and len(model.blocks) == 4
    assert model(torch.randn(2, 3, side, side)).shape == (2, 128)


# -- registry errors ------------------------------------------------------------------------------------------------
def test_unknown_name_lists_the_names_prefixes_and_a_guess():
    with pytest.raises(ValueError, match="unknown backbone 'iresnet_smal'") as info:
        build_backbone("iresnet_smal")
    message = str(info.value)
    assert "'torchvision:<model>'" in message and "'timm:<model>'" in message and "'inception_resnet_v1'" in message
    assert "did you mean 'iresnet_small'" in message and "\n" not in message
    assert set(backbone_names()) >= {"vit", "vit_face", "vit_face_small", "iresnet18", "iresnet34", "iresnet50",
                                     "iresnet100", "iresnet_small", "iresnet", "inception_resnet_v1"}
    assert backbone_names(include_prefixes=True)[-2:] == ["torchvision:<model>", "timm:<model>"]


def test_bad_kwarg_names_it_and_the_accepted_ones():
    with pytest.raises(TypeError, match="'iresnet18' got unexpected argument\\(s\\) \\['patch_size'\\]; it accepts "
                                        "\\['dropout', 'embed_dim', 'image_size', 'in_channels', 'layers'"):
        build_backbone("iresnet18", patch_size=8)
    with pytest.raises(TypeError, match="unexpected argument\\(s\\) \\['layers'\\].*'max_grid'"):
        build_backbone("vit_face_small", layers=(1,))
    assert "image_size" not in backbone_parameters("torchvision:resnet18")
    assert {"in_channels", "image_size", "weights_path"} <= set(backbone_parameters("iresnet_small"))


def test_weights_path_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("iresnet_small")
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    loaded = build_backbone("iresnet_small", weights_path=str(tmp_path / "weights.pt"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="not a local file"):
        build_backbone("iresnet_small", weights_path=str(tmp_path / "missing.pt"))


# -- torchvision / timm -------------------------------------------------------------------------------------------
def test_torchvision_resnet18_returns_pooled_features():
    model = build_backbone("torchvision:resnet18").eval()
    assert isinstance(model.fc, nn.Identity) and model.num_features == 512
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    grey = build_backbone("torchvision:resnet18", in_channels=1).eval()
    assert grey.conv1.in_channels == 1 and grey.conv1.kernel_size == (7, 7) and grey.conv1.stride == (2, 2)
    assert grey(torch.randn(2, 1, 64, 64)).shape == (2, 512)


def test_torchvision_grey_conv_is_adapted_from_local_rgb_weights(tmp_path):
    import torchvision

    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), tmp_path / "resnet18.pth")
    grey = build_backbone("torchvision:resnet18", in_channels=1, weights="IMAGENET1K_V1",
                          weights_path=str(tmp_path / "resnet18.pth"))
    assert torch.allclose(grey.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(grey.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)


def test_torchvision_refuses_downloads_and_suggests_names():
    with pytest.raises(ValueError, match="weights='DEFAULT' would download.*weights_path"):
        build_backbone("torchvision:resnet18", weights="DEFAULT")
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet1'; did you mean \\[.*'resnet18'"):
        build_backbone("torchvision:resnet1")
    with pytest.raises(TypeError, match="torchvision:resnet18 rejected the arguments \\['bogus'\\]"):
        build_backbone("torchvision:resnet18", bogus=1)


def test_timm_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        build_backbone("timm:resnet18")


def test_timm_is_called_without_pretrained_weights_and_head(monkeypatch):
    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        model = nn.Sequential(nn.Conv2d(kwargs["in_chans"], 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model.num_features = 4
        return model

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    model = build_backbone("timm:convnext_atto", in_channels=1, drop_path_rate=0.1)
    assert calls == [("convnext_atto", {"pretrained": False, "num_classes": 0, "in_chans": 1, "drop_path_rate": 0.1})]
    assert model.num_features == 4
    with pytest.raises(ValueError, match="pretrained=True would download"):
        build_backbone("timm:convnext_atto", pretrained=True)


# -- FaceNet --------------------------------------------------------------------------------------------------------
def test_inception_resnet_v1_from_scratch_gives_unit_embeddings():
    torch.manual_seed(0)
    model = build_backbone("inception_resnet_v1").eval()
    assert model.num_features == 512
    with torch.no_grad():
        features = model(torch.randn(2, 3, 112, 112))
    assert features.shape == (2, 512)
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="sides >= 75, got \\[1, 3, 64, 64\\]"):
        model(torch.randn(1, 3, 64, 64))


def test_inception_resnet_v1_refuses_downloads_and_bad_shapes(monkeypatch):
    for kwargs in ({"pretrained": "vggface2"}, {"weights_path": "casia-webface"}):
        with pytest.raises(ValueError, match="would make facenet-pytorch download.*weights_path"):
            build_backbone("inception_resnet_v1", **kwargs)
    with pytest.raises(ValueError, match="3-channel"):
        build_backbone("inception_resnet_v1", in_channels=1)
    with pytest.raises(ValueError, match="image_size >= 75"):
        build_backbone("inception_resnet_v1", image_size=64)
    monkeypatch.setitem(sys.modules, "facenet_pytorch.models.inception_resnet_v1", None)
    with pytest.raises(ImportError, match="pip install --no-deps facenet-pytorch==2.6.0"):
        build_backbone("inception_resnet_v1")


# -- ImageClassifier on registry names ------------------------------------------------------------------------------
def test_image_classifier_trains_an_iresnet_step(quiet_lightning, tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=5, backbone="iresnet_small", in_channels=3)
    assert isinstance(model.backbone, IResNet) and model.head.in_features == 128
    assert model.stem == "custom" and model.lr == 1e-3 and model.hparams.backbone == "iresnet_small"
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 5)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    before = model.backbone.conv1.weight.detach().clone()
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, loader, loader)
    assert not torch.equal(before, model.backbone.conv1.weight)
    assert torch.equal(model.backbone.features.weight, torch.ones(128))


def test_image_classifier_passes_sizes_and_backbone_kwargs():
    model = ImageClassifier(num_classes=3, backbone="iresnet_small", in_channels=1, image_size=16,
                            backbone_kwargs={"embed_dim": 24})
    assert model.backbone.image_size == 16 and model.backbone.in_channels == 1 and model.head.in_features == 24
    assert model.hparams.backbone_kwargs == {"embed_dim": 24}
    assert ImageClassifier(num_classes=3, backbone="torchvision:resnet18").backbone.conv1.in_channels == 1
    vit = ImageClassifier(num_classes=3, backbone="vit", backbone_kwargs={"max_grid": 3})
    assert vit.backbone.max_grid == 3 and vit.stem == "conv"
    with pytest.raises(ValueError, match="backbone_kwargs must not set \\['in_channels'\\]"):
        ImageClassifier(num_classes=3, backbone="iresnet_small", backbone_kwargs={"in_channels": 3})
    with pytest.raises(ValueError, match="backbone_kwargs must not set \\['depth'\\]"):
        ImageClassifier(num_classes=3, backbone="vit", backbone_kwargs={"depth": 2})
    with pytest.raises(ValueError, match="patch_size=4 applies to backbone='vit' only"):
        ImageClassifier(num_classes=3, backbone="iresnet_small", patch_size=4)
