"""FSDP2 sharding of the suite's modules (modules/sharding.py): what becomes an FSDP2 unit, and the refusals.

Real 2-process ModelParallelStrategy runs of every module are cells of tests/matrix/test_matrix.py."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_plugins.modules import ImageClassifier
from lightning_plugins.modules.backbones.vit import Block
from lightning_plugins.modules.sharding import hf_block_types, shard_with_fsdp2


def test_nothing_happens_without_a_mesh():
    model = ImageClassifier(num_classes=3, embed_dim=16, depth=2, num_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert shard_with_fsdp2(model, None, block_types=(Block,)) == 0
    model.configure_model()  # no device mesh outside ModelParallelStrategy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())


def test_one_unit_per_block_and_one_for_the_rest(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        model = ImageClassifier(num_classes=3, embed_dim=16, depth=3, num_heads=2)
        assert shard_with_fsdp2(model, mesh, block_types=(Block,)) == 4
        units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        assert units == ["", "backbone.blocks.0", "backbone.blocks.1", "backbone.blocks.2"]
        assert shard_with_fsdp2(model, mesh, block_types=(Block,)) == 0  # a second fit: already sharded
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_meshes_are_refused_with_the_fix():
    class TwoWayTensorParallel:  # the refusal reads only the dimension sizes (a real one needs 2 processes)
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return SimpleNamespace(size=lambda: 2 if name == "tensor_parallel" else 1)

    model = ImageClassifier(num_classes=3, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2.*tensor_parallel_size=1"):
        shard_with_fsdp2(model, TwoWayTensorParallel(), block_types=(Block,))


def test_hf_blocks_are_the_decoder_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32)
    model = LlamaForCausalLM(config)
    assert hf_block_types(model) == ("LlamaDecoderLayer",)
    assert hf_block_types(nn.Linear(2, 2)) == ()
