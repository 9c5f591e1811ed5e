"""``ObjectDetector``: Lightning training/evaluation over the detection backends, setup checks, FP8, and a slow
quality run on the embedded MNIST scenes."""

import time

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_plugins  # noqa: F401  (registers precision="fp8-msamp")
from lightning_plugins.modules.detection.detector import ObjectDetector

FAST = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False)
SMALL_TV = {"fpn_channels": 32}


def rectangle_scenes(n=8, size=64, num_classes=3, seed=0):
    """``(image, target)`` pairs: one white rectangle per image whose height encodes its class."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        label = i % num_classes
        w, h = 16, 14 + 6 * label
        x, y = (int(v) for v in torch.randint(0, size - 34, (2,), generator=gen))
        image = torch.zeros(3, size, size)
        image[:, y:y + h, x:x + w] = 1.0
        items.append((image, {"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
                              "labels": torch.tensor([label])}))
    return items


def collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def loader(items, batch_size=4):
    return DataLoader(items, batch_size=batch_size, collate_fn=collate)


def test_trainer_fit_logs_map_and_losses(quiet_lightning):
    pl.seed_everything(0)
    model = ObjectDetector(num_classes=3, backend_kwargs=SMALL_TV, warmup_steps=2,
                           class_names=["short", "mid", "tall"])
    data = rectangle_scenes()
    trainer = pl.Trainer(max_steps=4, num_sanity_val_steps=0, **FAST)
    trainer.fit(model, loader(data), loader(data))
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/classification", "train/bbox_regression", "train/bbox_ctrness",
                "val/map", "val/map_50", "val/map_75", "val/mar_100"):
        assert key in metrics, key
    assert torch.isfinite(metrics["train/loss"])
    assert any(key.startswith("val/ap/") and key[7:] in ("short", "mid", "tall") for key in metrics)
    result = trainer.test(model, loader(data), verbose=False)[0]
    assert "test/map" in result
    predictions = trainer.predict(model, loader(data))
    assert len(predictions) == 2 and set(predictions[0][0]) == {"boxes", "scores", "labels"}


def test_forgetting_protocol():
    model = ObjectDetector(num_classes=3, backend_kwargs={"fpn_channels": 32, "transformer_blocks": 1})
    images, targets = collate(rectangle_scenes(n=2))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    parts = model.forgetting_losses(images, targets)
    assert set(parts) == {"cls", "box"} and parts["cls"].requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)
    with torch.no_grad():
        detections = model.detect(torch.stack(images))
    assert len(detections) == 2 and model(images)[0]["boxes"].shape[-1] == 4
    assert model.num_classes == 3 and model.class_names == ["0", "1", "2"]
    assert model.gslora_target is not None
    assert ObjectDetector(num_classes=3, backend_kwargs=SMALL_TV).gslora_target is None


def test_fp8_trains_fcos_te(quiet_lightning):
    assert lightning_plugins.MSAMPPrecision  # the import registers precision="fp8-msamp"
    pl.seed_everything(0)
    model = ObjectDetector(num_classes=3, backend_kwargs={"fpn_channels": 32, "transformer_blocks": 2,
                                                          "transformer_heads": 2}, warmup_steps=1)
    trainer = pl.Trainer(precision="fp8-msamp", max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, **FAST)
    trainer.fit(model, loader(rectangle_scenes()))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    names = [d.name for d in trainer.precision_plugin.conversion_report.converted]  # type: ignore[attr-defined]
    assert any(name.endswith("backbone.blocks.1.mlp.fc2") for name in names), names


def test_transformers_backend_in_trainer(quiet_lightning):
    pl.seed_everything(0)
    tiny = dict(d_model=32, encoder_layers=1, decoder_layers=2, ffn_dim=64, num_queries=10, num_heads=4,
                backbone_depths=[1, 1, 1, 1], backbone_widths=[16, 16, 32, 32])
    model = ObjectDetector(num_classes=3, backend="transformers", backend_kwargs=tiny, warmup_steps=1)
    data = rectangle_scenes(n=4)
    trainer = pl.Trainer(max_steps=2, num_sanity_val_steps=0, **FAST)
    trainer.fit(model, loader(data), loader(data))
    assert "train/loss_ce_0" in trainer.callback_metrics and "val/map" in trainer.callback_metrics
    assert model.forgetting_losses(*collate(data[:2]))["box"] > 0


class FakeCocoData(pl.LightningDataModule):
    num_classes = 3

    def category_map(self):
        return {"category_ids": [1, 3, 7], "class_names": ["a", "b", "c"]}

    def train_dataloader(self):
        return loader(rectangle_scenes(n=4))


def test_setup_checks_classes_and_takes_the_category_map(quiet_lightning, tmp_path):
    model = ObjectDetector(num_classes=3, backend_kwargs=SMALL_TV)
    trainer = pl.Trainer(max_steps=1, default_root_dir=tmp_path, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=FakeCocoData())
    assert model.class_names == ["a", "b", "c"] and model.category_ids == [1, 3, 7]
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = ObjectDetector.load_from_checkpoint(path)
    assert restored.class_names == ["a", "b", "c"] and restored.category_ids == [1, 3, 7]
    wrong = ObjectDetector(num_classes=5, backend_kwargs=SMALL_TV)
    with pytest.raises(ValueError, match="set the model's num_classes to 3"):
        pl.Trainer(max_steps=1, **FAST).fit(wrong, datamodule=FakeCocoData())


def test_crowd_regions_reach_the_metric():
    from lightning_plugins.modules.detection.detector import _metric_target, _without_crowd

    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]),
              "crowd_boxes": torch.tensor([[20.0, 20, 40, 40]])}
    out = _metric_target(target, 3)
    assert out["iscrowd"].tolist() == [0, 1, 1, 1] and out["labels"].tolist() == [1, 0, 1, 2]
    flagged = {"boxes": torch.tensor([[0.0, 0, 10, 10], [1, 1, 5, 5]]), "labels": torch.tensor([1, 2]),
               "iscrowd": torch.tensor([0, 1])}
    assert _without_crowd(flagged)["labels"].tolist() == [1]


def test_argument_errors():
    with pytest.raises(ValueError, match="did you mean 'torchvision'"):
        ObjectDetector(backend="torchvison")
    with pytest.raises(ValueError, match="did you mean 'fpn_channels'"):
        ObjectDetector(backend_kwargs={"fpn_chanels": 64})
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        ObjectDetector(num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="gradient_clip_norm"):
        ObjectDetector(gradient_clip_norm=0)


@pytest.mark.slow
def test_fcos_learns_the_mnist_scenes(quiet_lightning, tmp_path):
    """The short-run floor of the default detector: FCOS (ResNet-18, 128-ch FPN), 450 steps of batch 8 with the
    cosine over the run -> test mAP >= 0.15, mAP50 >= 0.22 (measured 0.196 / 0.272 at 1 thread; 330 steps give
    0.126, 400 steps 0.156; the 700-step benchmark reaches 0.584 / 0.699)."""
    from lightning_plugins.modules.detection.data import COCODetectionDataModule

    pl.seed_everything(0)
    data = COCODetectionDataModule(batch_size=8, scenes_dir=str(tmp_path / "scenes"))
    model = ObjectDetector(num_classes=data.num_classes)
    trainer = pl.Trainer(max_steps=450, limit_val_batches=0, num_sanity_val_steps=0, **FAST)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    elapsed = time.perf_counter() - start
    print(f"FCOS 450 steps: test mAP {result['test/map']:.3f}, mAP50 {result['test/map_50']:.3f}, {elapsed:.0f} s")
    assert model.class_names == data.class_names
    assert result["test/map"] >= 0.15 and result["test/map_50"] >= 0.22
