"""``torch.compile`` over FP8Linear (the GPU benchmark compiles Transformer blocks): same outputs, gradients and
scaling state as eager, on the CPU (emulated backend, inductor's C++ code generation)."""

import pytest
import torch
from torch import nn

from lightning_plugins.fp8 import FP8Linear, ScalingRegistry


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = FP8Linear(32, 64, backend="emulated"), FP8Linear(64, 32, backend="emulated")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.slow
def test_compiled_block_matches_eager(one_torch_thread):
    torch.manual_seed(0)
    eager = Block()
    compiled = Block()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    registries = [ScalingRegistry(eager), ScalingRegistry(compiled)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # several steps: the amax histories and scales must evolve identically
        x = torch.randn(4, 16, 32, generator=generator)
        outputs = []
        for block in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = block(xi)
            y.square().mean().backward()
            outputs.append((y.detach(), xi.grad, block.fc1.weight.grad, block.fc2.weight.grad))
        for got, expected in zip(outputs[1], outputs[0]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for block, registry in zip((eager, compiled), registries):
            block.zero_grad()
            registry.update()  # the delayed-scaling step the precision plugin takes after each optimizer step
    buffers = dict(compiled.named_buffers())  # the scaling states (non-persistent: amax histories, scales, counters)
    assert len(buffers) == 2 * 4 * 4
    for name, buffer in eager.named_buffers():  # amax values may differ in the last bits (fused kernels)
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-5, atol=0, msg=name)
    assert int(buffers["fc1.input_scaling.counter"]) == 3
