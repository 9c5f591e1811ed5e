"""Lightning precision plugins for FP8 training (MS-AMP's recipe), built on :mod:`lightning_plugins.fp8`.

* :class:`MSAMPPrecision`: the Trainer plugin; ``Trainer(precision="fp8-msamp")`` (after
  ``import lightning_plugins``) is ``MSAMPPrecision()`` = level O2.
* :class:`MSAMPFabricPrecision`: the Fabric counterpart (optimizer swap explicit: ``convert_optimizer``).
* :class:`TrainingStateMeter`: a callback measuring weights + gradients + optimizer state per parameter.
* :func:`to_portable_checkpoint`: a checkpoint that plain fp32 models and ``torch.optim.AdamW`` can load;
  :func:`consolidate_sharded_checkpoint`: the same single file from a sharded (FSDP2) checkpoint folder.
* :mod:`~lightning_plugins.precision.registration`: the ``"fp8-msamp"`` string (a minimal patch, see there).
"""

from lightning_plugins.precision.checkpoint import consolidate_sharded_checkpoint, to_portable_checkpoint
from lightning_plugins.precision.fabric import MSAMPFabricPrecision
from lightning_plugins.precision.memory import TrainingStateMeter
from lightning_plugins.precision.msamp import MSAMPPrecision
from lightning_plugins.precision.registration import (
    PRECISION_FLAG,
    register_precision_flag,
    unregister_precision_flag,
)

__all__ = [
    "PRECISION_FLAG",
    "MSAMPFabricPrecision",
    "MSAMPPrecision",
    "TrainingStateMeter",
    "consolidate_sharded_checkpoint",
    "register_precision_flag",
    "to_portable_checkpoint",
    "unregister_precision_flag",
]
