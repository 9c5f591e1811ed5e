"""FSDP2 sharding of the suite's modules under Lightning's ``ModelParallelStrategy``.

Lightning's ``ModelParallelStrategy`` leaves the parallelisation to the module's ``configure_model`` hook. The
suite's modules call :func:`shard_with_fsdp2` there: with a device mesh (that strategy) every block of the model
(Transformer blocks, Hugging Face decoder layers) and then the whole module become FSDP2 units sharded over the
data-parallel mesh dimension; with any other strategy (no mesh) nothing happens. Tensor parallelism needs a plan
per architecture that these modules do not define, so a mesh with a tensor-parallel dimension larger than 1 is
refused with the setting that fixes it.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

__all__ = ["shard_with_fsdp2", "hf_block_types"]

#: LightningModule methods that run as forwards of the root FSDP2 unit
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def shard_with_fsdp2(module: nn.Module, mesh: Optional[Any], block_types: Iterable[type] = (),
                     block_names: Iterable[str] = ()) -> int:
    """Apply FSDP2's ``fully_shard`` to every submodule of one of ``block_types`` (or whose class name is in
    ``block_names``), then to ``module``, over ``mesh``'s data-parallel dimension. Returns the number of FSDP2
    units made (0 without a mesh, or when ``module`` is already sharded: the hook runs again on a later fit)."""
    if mesh is None:
        return 0
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):
        return 0
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        size = mesh["tensor_parallel"].size()
        raise ValueError(
            f"{type(module).__name__} supports data-parallel sharding (FSDP2) only, but the ModelParallelStrategy "
            f"mesh has tensor_parallel_size={size}; use ModelParallelStrategy(data_parallel_size=<number of "
            "devices>, tensor_parallel_size=1)"
        )
    data_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    types, block_names = tuple(block_types), set(block_names)
    blocks = [m for m in module.modules()
              if m is not module and (isinstance(m, types) or type(m).__name__ in block_names)]
    for block in blocks:
        fully_shard(block, mesh=data_mesh)
    fully_shard(module, mesh=data_mesh)
    # FSDP2 gathers a unit's parameters around its forward; the steps of a LightningModule often reach their
    # submodules without calling the module's own forward, so the steps count as forwards of the root unit too
    for name in STEP_METHODS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return len(blocks) + 1


def hf_block_types(model: nn.Module) -> tuple[str, ...]:
    """Class names of a Hugging Face model's repeated blocks (its ``_no_split_modules``, e.g. the decoder layers)."""
    names = getattr(model, "_no_split_modules", None) or ()
    return tuple(str(n) for n in names)
