"""FP8 numerics for training (pure torch; no Lightning): the MS-AMP recipe with a CPU emulation.

* formats: :data:`E4M3` (max 448), :data:`E5M2` (max 57344), :data:`FP16` (for scaled optimizer states).
* scaling: :func:`pow2_scale`, :class:`ScalingState` (amax history, JIT warm-up, delayed scaling;
  :func:`update_scaling_states` updates many at once),
  :func:`frozen_scaling` (evaluation records nothing).
* quantize: :func:`quantize` / :func:`quantize_with_state` (saturating, non-finite flag computed
  before the cast), :func:`dequantize`, :class:`ScaledTensor`.
* GEMM backends: :func:`get_backend` with ``"auto"``, ``"torch"``, ``"emulated"``, ``"te"``.
* :class:`FP8Linear`, :func:`convert_to_fp8`, :class:`ScalingRegistry`, and the FP8 weight-gradient
  side channel (:func:`get_fp8_grad`, :func:`clear_fp8_grads`).
* O2 optimizers: :class:`FP8AdamW`, :class:`FP8Adam`, :func:`from_optimizer`,
  :func:`rebind_lr_schedulers`, :func:`optimizer_state_bytes`, :func:`training_state_bytes`,
  :func:`to_torch_adam_state_dict`.
"""

from lightning_plugins.fp8.convert import (
    DEFAULT_EXCLUDE,
    SUPPORTED_LAYER_TYPES,
    ConversionReport,
    LayerDecision,
    convert_to_fp8,
    matches_pattern,
    revert_fp8,
)
from lightning_plugins.fp8.formats import E4M3, E5M2, FORMATS, FP16, FloatFormat, get_format
from lightning_plugins.fp8.gemm import (
    BACKENDS,
    EmulatedBackend,
    GemmBackend,
    TEBackend,
    TorchBackend,
    get_backend,
    resolve_backend_name,
)
from lightning_plugins.fp8.linear import SCALING_ROLES, WGRAD_MODES, FP8Conv1D, FP8Linear
from lightning_plugins.fp8.optim import (
    EXP_AVG_DTYPES,
    EXP_AVG_SQ_DTYPES,
    MASTER_WEIGHTS,
    FP8Adam,
    FP8AdamW,
    fp8_linear_weights,
    from_optimizer,
)
from lightning_plugins.fp8.optim_utils import (
    optimizer_state_bytes,
    rebind_lr_schedulers,
    to_torch_adam_state_dict,
    training_state_bytes,
)
from lightning_plugins.fp8.quantize import (
    SaturationCounter,
    ScaledTensor,
    count_saturation,
    dequantize,
    quantize,
    quantize_with_state,
    tensor_amax,
)
from lightning_plugins.fp8.registry import ScalingRegistry
from lightning_plugins.fp8.scaling import (
    ScalingState,
    frozen_scaling,
    pow2_scale,
    scaling_frozen,
    update_scaling_states,
)
from lightning_plugins.fp8.wgrad import clear_fp8_grads, fp8_grad_params, get_fp8_grad, set_fp8_grad

__all__ = [
    "BACKENDS",
    "DEFAULT_EXCLUDE",
    "E4M3",
    "E5M2",
    "EXP_AVG_DTYPES",
    "EXP_AVG_SQ_DTYPES",
    "FORMATS",
    "FP16",
    "MASTER_WEIGHTS",
    "SCALING_ROLES",
    "WGRAD_MODES",
    "ConversionReport",
    "EmulatedBackend",
    "FP8Adam",
    "FP8AdamW",
    "FP8Linear",
    "FloatFormat",
    "GemmBackend",
    "LayerDecision",
    "ScaledTensor",
    "ScalingRegistry",
    "ScalingState",
    "TEBackend",
    "TorchBackend",
    "clear_fp8_grads",
    "convert_to_fp8",
    "revert_fp8",
    "SaturationCounter",
    "count_saturation",
    "SUPPORTED_LAYER_TYPES",
    "FP8Conv1D",
    "dequantize",
    "fp8_grad_params",
    "fp8_linear_weights",
    "from_optimizer",
    "frozen_scaling",
    "get_backend",
    "get_fp8_grad",
    "get_format",
    "matches_pattern",
    "optimizer_state_bytes",
    "training_state_bytes",
    "pow2_scale",
    "quantize",
    "quantize_with_state",
    "rebind_lr_schedulers",
    "resolve_backend_name",
    "scaling_frozen",
    "set_fp8_grad",
    "tensor_amax",
    "to_torch_adam_state_dict",
    "update_scaling_states",
]
