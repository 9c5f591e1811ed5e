"""FP8 GEMM backends behind one interface: ``emulated``, ``torch``, ``te`` and ``auto``.

Every backend computes ``a @ b`` for per-tensor scaled operands ``a`` (M, K) and ``b`` (K, N),
``(a.data * a.scale_inv) @ (b.data * b.scale_inv)``, and returns an ``out_dtype`` tensor. Any
memory layout is accepted; the backends make the copies their kernels need.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
import torch.nn.functional as F

from lightning_plugins.fp8.quantize import ScaledTensor, to_float32

__all__ = [
    "BACKENDS",
    "GemmBackend",
    "EmulatedBackend",
    "TorchBackend",
    "TEBackend",
    "get_backend",
    "resolve_backend_name",
    "check_backend_name",
]

BACKENDS = ("auto", "torch", "emulated", "te")
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# cuBLASLt FP8 kernels (Ada sm89, Hopper sm90 and newer).
_MIN_CAPABILITY = (8, 9)


def check_backend_name(name: Any) -> str:
    """Validate a backend name; returns it lower-cased."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"Unknown FP8 GEMM backend {name!r}; allowed: {list(BACKENDS)}.")
    return name.lower()


def _cuda_fp8_capable(device: torch.device) -> bool:
    # ROCm reports gfx9xx as capability 9.x but needs the fnuz FP8 dtypes, which we do not use.
    if device.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= _MIN_CAPABILITY


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """Concrete backend for ``name`` on ``device``: ``auto`` -> ``torch`` on CUDA with compute
    capability >= 8.9, else ``emulated``. Decided by capability, never by device name."""
    name = check_backend_name(name)
    if name != "auto":
        return name
    return "torch" if _cuda_fp8_capable(torch.device(device)) else "emulated"


class GemmBackend:
    """Interface: ``mm(a, b, out_dtype, use_fast_accum)`` for scaled operands ``a`` (M, K), ``b`` (K, N)."""

    name = "base"

    def mm(
        self, a: ScaledTensor, b: ScaledTensor, out_dtype: torch.dtype = torch.float32, use_fast_accum: bool = False
    ) -> torch.Tensor:
        """Return ``dequant(a) @ dequant(b)`` as ``out_dtype``."""
        raise NotImplementedError

    @staticmethod
    def _check(a: ScaledTensor, b: ScaledTensor, out_dtype: torch.dtype) -> None:
        if not isinstance(a, ScaledTensor) or not isinstance(b, ScaledTensor):
            raise TypeError(
                f"FP8 GEMM operands must be ScaledTensor, got {type(a).__name__} and {type(b).__name__}; "
                "build them with lightning_plugins.fp8.quantize()."
            )
        if a.data.dim() != 2 or b.data.dim() != 2 or a.data.shape[1] != b.data.shape[0]:
            raise ValueError(
                f"FP8 GEMM needs a (M, K) and b (K, N), got shapes {tuple(a.data.shape)} and {tuple(b.data.shape)}."
            )
        if out_dtype not in _OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {list(_OUT_DTYPES)}, got {out_dtype}.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EmulatedBackend(GemmBackend):
    """Any device: multiply the FP8 values exactly in fp32, then apply both (power-of-two) scales to the product.

    This is the reference arithmetic, in the order hardware FP8 GEMMs use (unscaled products, scales on the
    output); they differ only by accumulation order. Scaling the output instead of both inputs saves two passes
    over the operands and equals ``dequantize(a) @ dequantize(b)`` bit for bit unless a scaled product would be
    an fp32 subnormal (then it is the more exact of the two).
    """

    name = "emulated"

    def mm(
        self, a: ScaledTensor, b: ScaledTensor, out_dtype: torch.dtype = torch.float32, use_fast_accum: bool = False
    ) -> torch.Tensor:
        self._check(a, b, out_dtype)
        with torch.autocast(a.data.device.type, enabled=False):
            product = torch.mm(to_float32(a.data), to_float32(b.data))
            scale = (a.scale_inv.to(torch.float32) * b.scale_inv.to(torch.float32)).to(product.device)
            return product.mul_(scale).to(out_dtype)


def _pad_fp8(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D fp8 tensor to (rows, cols); done on a uint8 view since fp8 has no pad kernel."""
    if x.shape == (rows, cols):
        return x
    raw = x.contiguous().view(torch.uint8)  # byte 0 is +0.0 in both FP8 formats
    return F.pad(raw, (0, cols - x.shape[1], 0, rows - x.shape[0])).view(x.dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TorchBackend(GemmBackend):
    """``torch._scaled_mm``: CUDA with compute capability >= 8.9 (also runs on CPU in torch >= 2.10).

    On CUDA the kernel needs ``a`` row-major, ``b`` column-major, and K and N multiples of 16;
    K and N are zero-padded (exact) and the output sliced back.

    Args:
        pad_to_16: pad K and N to multiples of 16; ``None`` pads everywhere except on CPU.
    """

    name = "torch"

    def __init__(self, pad_to_16: bool | None = None) -> None:
        self.pad_to_16 = pad_to_16

    def mm(
        self, a: ScaledTensor, b: ScaledTensor, out_dtype: torch.dtype = torch.float32, use_fast_accum: bool = False
    ) -> torch.Tensor:
        self._check(a, b, out_dtype)
        device = a.data.device
        if device.type == "cuda" and not _cuda_fp8_capable(device):
            capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
            raise RuntimeError(
                "FP8 backend 'torch' needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper or newer), "
                f"got capability {capability} (ROCm: {torch.version.hip is not None}); "
                "use backend='emulated' or 'auto'."
            )
        if not hasattr(torch, "_scaled_mm"):
            raise RuntimeError(
                f"torch {torch.__version__} has no torch._scaled_mm; use backend='emulated' or upgrade torch."
            )
        m, k = a.data.shape
        n = b.data.shape[1]
        pad = self.pad_to_16 if self.pad_to_16 is not None else device.type != "cpu"
        k_p, n_p = (_round_up(k, 16), _round_up(n, 16)) if pad else (k, n)
        a_data = _pad_fp8(a.data, m, k_p).contiguous()
        # column-major b == row-major b.T
        b_data = _pad_fp8(b.data.t(), n_p, k_p).contiguous().t()
        try:
            out = torch._scaled_mm(
                a_data,
                b_data,
                scale_a=a.scale_inv.reshape(()).to(torch.float32),
                scale_b=b.scale_inv.reshape(()).to(torch.float32),
                out_dtype=out_dtype,
                use_fast_accum=use_fast_accum,
            )
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(
                f"torch._scaled_mm failed on {device} for {a.data.dtype} x {b.data.dtype} "
                f"(M={m}, K={k}, N={n}): {err}. Use backend='emulated' on this device."
            ) from err
        return out[:, :n] if n_p != n else out


@functools.lru_cache(maxsize=1)
def _import_te() -> Any:
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except ImportError as err:
        raise RuntimeError(
            "FP8 backend 'te' needs NVIDIA Transformer Engine, which is not installed (or failed to import: "
            f"{err}). Install it with `pip install lightning-plugins[te]` on a CUDA machine, or use "
            "backend='torch' (torch._scaled_mm) or 'auto'."
        ) from err


class TEBackend(GemmBackend):
    """Transformer Engine's cuBLASLt GEMM (``general_gemm``, TE 2.x API). Experimental.

    Construction fails with a clear error if TE is missing or its API differs from the one this
    backend was written against.
    """

    name = "te"

    def __init__(self) -> None:
        te = _import_te()
        try:
            self._gemm = importlib.import_module("transformer_engine.pytorch.cpp_extensions").general_gemm
            self._quantizer_cls = importlib.import_module(
                "transformer_engine.pytorch.tensor.float8_tensor"
            ).Float8Quantizer
            self._tex = importlib.import_module("transformer_engine_torch")
        except (ImportError, AttributeError) as err:
            version = getattr(te, "__version__", "unknown")
            raise RuntimeError(
                f"Transformer Engine {version} lacks the general_gemm/Float8Quantizer API (TE 2.x) that backend "
                f"'te' uses ({err}); use backend='torch' or 'auto'."
            ) from err
        self._workspace: dict[torch.device, torch.Tensor] = {}

    def _wrap(self, st: ScaledTensor, fake_dtype: torch.dtype) -> Any:
        kinds = self._tex.DType
        te_dtype = kinds.kFloat8E4M3 if st.data.dtype == torch.float8_e4m3fn else kinds.kFloat8E5M2
        scale = torch.reciprocal(st.scale_inv.reshape(1).float())
        quantizer = self._quantizer_cls(scale=scale, amax=torch.zeros(1, device=scale.device), fp8_dtype=te_dtype)
        return quantizer.create_tensor_from_data(st.data.contiguous().view(torch.uint8), fake_dtype=fake_dtype)

    def mm(
        self, a: ScaledTensor, b: ScaledTensor, out_dtype: torch.dtype = torch.float32, use_fast_accum: bool = False
    ) -> torch.Tensor:
        self._check(a, b, out_dtype)
        device = a.data.device
        if not _cuda_fp8_capable(device):
            raise RuntimeError(f"FP8 backend 'te' needs a CUDA GPU with compute capability >= 8.9, got {device}.")
        m, k = a.data.shape
        n = b.data.shape[1]
        k_p, n_p = _round_up(k, 16), _round_up(n, 16)
        a_p = ScaledTensor(_pad_fp8(a.data, m, k_p), a.scale_inv)
        bt_p = ScaledTensor(_pad_fp8(b.data.t(), n_p, k_p), b.scale_inv)
        if device not in self._workspace:
            self._workspace[device] = torch.empty(32 * 1024 * 1024, dtype=torch.uint8, device=device)
        # TE's "TN" layout computes B @ A^T with A (N, K) and B (M, K), both row-major.
        out = self._gemm(
            self._wrap(bt_p, out_dtype),
            self._wrap(a_p, out_dtype),
            self._workspace[device],
            out_dtype=out_dtype,
            layout="TN",
            use_split_accumulator=not use_fast_accum,
        )[0]
        return out[:, :n] if n_p != n else out


_EMULATED = EmulatedBackend()
_TORCH = TorchBackend()


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> GemmBackend:
    """The backend object for ``name`` (one of :data:`BACKENDS`) on ``device``."""
    resolved = resolve_backend_name(name, device)
    if resolved == "emulated":
        return _EMULATED
    if resolved == "torch":
        return _TORCH
    return _te_backend()


@functools.lru_cache(maxsize=1)
def _te_backend() -> TEBackend:
    return TEBackend()
