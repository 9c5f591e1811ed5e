"""``torch.compile`` over FP8Linear (the GPU benchmark compiles Transformer blocks): one graph with no break
(``fullgraph=True``), and the same outputs, gradients and scaling state as eager over steps that pass the JIT
warm-up into delayed scaling. On the CPU: the emulated backend and ``torch._scaled_mm`` (the GPU's GEMM call)."""

import pytest
import torch
from torch import nn

from lightning_plugins.fp8 import FP8Linear, ScalingRegistry
from fp8_support import requires_cpu_scaled_mm, requires_fp8_cuda

DEVICE_PATHS = [
    pytest.param("cpu", "emulated", id="cpu-emulated"),
    pytest.param("cpu", "torch", marks=requires_cpu_scaled_mm, id="cpu-scaled_mm"),
    pytest.param("cuda", "auto", marks=requires_fp8_cuda, id="cuda-auto"),
]


class Block(nn.Module):
    def __init__(self, backend: str) -> None:
        super().__init__()
        kwargs = {"backend": backend, "amax_history_len": 2}  # a short window: steps 3+ use delayed scaling
        self.fc1, self.fc2 = FP8Linear(32, 64, **kwargs), FP8Linear(64, 32, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.slow
@pytest.mark.parametrize(("device", "backend"), DEVICE_PATHS)
def test_compiled_block_is_one_graph_and_matches_eager(device, backend, one_torch_thread):
    torch.manual_seed(0)
    eager = Block(backend).to(device)
    compiled = Block(backend).to(device)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True)  # a graph break would raise: the FP8 GEMMs and scaling must trace
    registries = [ScalingRegistry(eager), ScalingRegistry(compiled)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):  # the amax histories and scales must evolve identically
        x = torch.randn(4, 16, 32, generator=generator).to(device)
        outputs = []
        for block in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = block(xi)
            y.square().mean().backward()
            outputs.append((y.detach(), xi.grad, block.fc1.weight.grad, block.fc2.weight.grad))
        for got, expected in zip(outputs[1], outputs[0]):
            if device == "cpu":
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            else:  # fused CUDA kernels (GELU) can move an FP8 value next to a rounding boundary by one step
                assert ((got - expected).norm() / expected.norm()).item() < 1e-2
        for block, registry in zip((eager, compiled), registries):
            block.zero_grad()
            registry.update()  # the delayed-scaling step the precision plugin takes after each optimizer step
    buffers = dict(compiled.named_buffers())  # the scaling states (non-persistent: amax histories, scales, counters)
    assert len(buffers) == 2 * 4 * 4
    for name, buffer in eager.named_buffers():  # amax values may differ in the last bits (fused kernels)
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-5 if device == "cpu" else 1e-2, atol=0, msg=name)
    assert int(buffers["fc1.input_scaling.counter"]) == 2  # saturated at the window: delayed scaling in use
    assert not compiled.fc1.input_scaling.in_warmup
