"""Fixtures for the GSLoRA tests: a tiny ViT pretrained once per session on MNIST-5k, and its data."""

from __future__ import annotations


import pytest
import torch

TINY_VIT = dict(depth=2, embed_dim=32, patch_size=7, image_size=28, num_heads=2, lr=1e-2)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True, scope="session")
def _quiet(quiet_lightning):
    yield


def trainer_kwargs(**overrides):
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def quiet(tmp_path):
    """``quiet(**overrides)``: Trainer keyword arguments for a quiet single-CPU run writing under ``tmp_path``."""

    def kwargs(**overrides):
        return trainer_kwargs(**{"default_root_dir": str(tmp_path), **overrides})

    return kwargs


@pytest.fixture(scope="session")
def mnist():
    from lightning_plugins.modules import MNIST5kDataModule

    datamodule = MNIST5kDataModule(batch_size=64)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="session")
def pretrained_vit(mnist, tmp_path_factory):
    """``make()`` returns a fresh tiny ViT (2 blocks, width 32, patch 7) with the session's pretrained weights."""
    import lightning.pytorch as pl

    from lightning_plugins.modules import ImageClassifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(**TINY_VIT)
    root = tmp_path_factory.mktemp("pretrain")
    pl.Trainer(max_epochs=15, **trainer_kwargs(default_root_dir=str(root))).fit(model, mnist)
    torch.set_num_threads(threads)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def make():
        fresh = ImageClassifier(**TINY_VIT)
        fresh.load_state_dict(state)
        return fresh

    return make
