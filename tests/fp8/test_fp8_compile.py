"""``torch.compile`` over FP8Linear (the GPU benchmark compiles Transformer blocks): one graph with no break
(``fullgraph=True``), and the same outputs, gradients and scaling state as eager over steps that pass the JIT
warm-up into delayed scaling. On the CPU: the emulated backend and ``torch._scaled_mm`` (the GPU's GEMM call);
both weight-gradient modes (O2's FP8 side channel included)."""

import pytest
import torch
from fp8_support import requires_cpu_scaled_mm, requires_fp8_cuda
from torch import nn

from lightning_plugins.fp8 import FP8Linear, ScalingRegistry, clear_fp8_grads, get_fp8_grad

DEVICE_PATHS = [
    pytest.param("cpu", "emulated", id="cpu-emulated"),
    pytest.param("cpu", "torch", marks=requires_cpu_scaled_mm, id="cpu-scaled_mm"),
    pytest.param("cuda", "auto", marks=requires_fp8_cuda, id="cuda-auto"),
]


class Block(nn.Module):
    def __init__(self, backend: str, wgrad_mode: str) -> None:
        super().__init__()
        # a short window: steps 3+ use delayed scaling
        kwargs = {"backend": backend, "amax_history_len": 2, "wgrad_mode": wgrad_mode}
        self.fc1, self.fc2 = FP8Linear(32, 64, **kwargs), FP8Linear(64, 32, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _weight_grads(block: Block) -> list[torch.Tensor]:
    if block.fc1.wgrad_mode == "dequantized":
        return [block.fc1.weight.grad, block.fc2.weight.grad]
    assert block.fc1.weight.grad is None
    return [get_fp8_grad(block.fc1.weight).dequantize(), get_fp8_grad(block.fc2.weight).dequantize()]


def _assert_close(got: torch.Tensor, expected: torch.Tensor, device: str) -> None:
    if device == "cpu":
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:  # fused CUDA kernels (GELU) can move an FP8 value next to a rounding boundary by one step
        assert ((got - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("wgrad_mode", ["dequantized", "fp8"])
@pytest.mark.parametrize(("device", "backend"), DEVICE_PATHS)
def test_compiled_block_is_one_graph_and_matches_eager(device, backend, wgrad_mode, one_torch_thread):
    torch.manual_seed(0)
    eager = Block(backend, wgrad_mode).to(device)
    compiled = Block(backend, wgrad_mode).to(device)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True)  # a graph break would raise: the FP8 GEMMs, scaling and FP8 grads must trace
    registries = [ScalingRegistry(eager), ScalingRegistry(compiled)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):  # the amax histories and scales must evolve identically
        micro_batches = [torch.randn(4, 16, 32, generator=generator).to(device) for _ in range(2)]
        outputs = []
        for block in (eager, compiled):
            input_grads = []
            for i, x in enumerate(micro_batches):  # two micro-batches accumulate into one gradient
                xi = x.clone().requires_grad_()
                y = block(xi)
                if i == 0:  # Lightning zeroes gradients between the first forward and its backward
                    block.zero_grad()
                    clear_fp8_grads(block)
                y.square().mean().backward()
                input_grads.append(xi.grad)
            outputs.append((y.detach(), *input_grads, *_weight_grads(block)))
        for got, expected in zip(outputs[1], outputs[0]):
            _assert_close(got, expected, device)
        for registry in registries:
            registry.update()  # the delayed-scaling step the precision plugin takes after each optimizer step
    buffers = dict(compiled.named_buffers())  # the scaling states (non-persistent: amax histories, scales, counters)
    assert len(buffers) == 2 * 4 * 4
    for name, buffer in eager.named_buffers():  # amax values may differ in the last bits (fused kernels)
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-5 if device == "cpu" else 1e-2, atol=0, msg=name)
    assert int(buffers["fc1.input_scaling.counter"]) == 2  # saturated at the window: delayed scaling in use
    assert not compiled.fc1.input_scaling.in_warmup
