"""Pin what changes float results between runs and machines, for figures that reproduce.

Training amplifies last-bit rounding differences into different final figures. Two things decide those bits on a
CPU besides the seed: the number of torch threads (reductions split differently) and the code path each library
picks for the CPU it runs on (MKL, ATen and oneDNN choose AVX-512 or AVX2 kernels, which round differently).
:func:`pin_numerics` fixes both, plus deterministic algorithms, before the first computation.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

__all__ = ["ISA_ENV", "pin_numerics"]

ISA_ENV = {  # environment that pins each library's CPU code path; read at the library's first computation
    "avx2": {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {},
}


def pin_numerics(threads: int = 1, isa: str = "avx2") -> dict[str, Any]:
    """Fix what changes float results between runs and machines; call before any torch computation.

    Sets ``threads`` intra-op torch threads (and one inter-op thread), ``torch.use_deterministic_algorithms(True)``
    and, for ``isa="avx2"``, the AVX2 code paths of MKL, ATen and oneDNN (``"native"`` leaves each library's choice
    for this CPU). Returns the settings in effect, for the report.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    if isa not in ISA_ENV:
        raise ValueError(f"isa must be one of {sorted(ISA_ENV)}, got {isa!r}.")
    os.environ.update(ISA_ENV[isa])
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already ran in this process
        torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    capability = torch.backends.cpu.get_cpu_capability()
    if isa == "avx2" and capability.startswith("AVX512"):
        raise RuntimeError(f"ATen already runs its {capability} kernels: pin_numerics must run before any torch "
                           "computation in this process (or set ATEN_CPU_CAPABILITY=avx2 in the environment).")
    return {"threads": torch.get_num_threads(), "isa": isa, "aten_cpu_capability": capability,
            **{name: os.environ.get(name, "") for name in ISA_ENV["avx2"]},
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(), "torch": torch.__version__}
