"""The fused gate operations of `ops_longvq` (`silu_gated_linear`, `gated_residual`) against their plain-autograd
twins: values and every gradient on random shapes, in float64 (`gradcheck`), float32 and under bfloat16 autocast; the
plain path for adapters (a LoRA-style subclass of nn.Linear) and without autograd; and what they save for backward."""

import pytest
import torch
import torch.nn.functional as F

from longvq.benchmark import saved_elements
from longvq.ops_longvq import gated_residual, naive_gated_residual, naive_silu_gated_linear, silu_gated_linear


def _saved_numel(function, *inputs) -> int:
    """Elements of the distinct storages autograd saves for backward while computing function(*inputs), parameters
    of module inputs excluded."""
    parameters = [p for t in inputs if isinstance(t, torch.nn.Module) for p in t.parameters()]
    return saved_elements(lambda: function(*inputs), exclude=parameters)


def _gradients(output, tensors):
    grad = torch.randn_like(output, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(output, tensors, grad, allow_unused=True)


@pytest.mark.parametrize("with_x", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 5), (1, 1, 4, 5)])
def test_silu_gated_linear_matches_its_twin(with_x, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[-1], 6).double()
    gate = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True) if with_x else None
    inputs = [t for t in (x, gate, linear.weight, linear.bias) if t is not None]
    fused = silu_gated_linear(x, gate, linear)
    naive = naive_silu_gated_linear(x, gate, linear)
    torch.testing.assert_close(fused, naive)
    for ours, theirs in zip(_gradients(fused, inputs), _gradients(naive, inputs)):
        torch.testing.assert_close(ours, theirs)
    torch.autograd.gradcheck(lambda *t: silu_gated_linear(x, gate, linear), inputs)


def test_silu_gated_linear_without_bias_and_under_bfloat16_autocast():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4, bias=False)
    x, gate = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, naive = silu_gated_linear(x, gate, linear), naive_silu_gated_linear(x, gate, linear)
    assert fused.dtype == naive.dtype == torch.bfloat16
    torch.testing.assert_close(fused, naive, atol=2e-2, rtol=2e-2)
    ours, theirs = _gradients(fused.float(), [x, gate, linear.weight]), _gradients(naive.float(), [x, gate, linear.weight])
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_silu_gated_linear_saves_its_inputs_only_and_leaves_adapters_alone():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    x, gate = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    assert _saved_numel(silu_gated_linear, x, gate, linear) == 2 * 4 * 16  # x and gate; plain: + SiLU(gate), product
    assert _saved_numel(naive_silu_gated_linear, x, gate, linear) == 4 * 4 * 16

    class Adapter(torch.nn.Linear):  # e.g. a LoRA layer: its forward must run
        def forward(self, inputs):
            return super().forward(inputs) + 1.0

    adapter = Adapter(16, 8)
    torch.testing.assert_close(silu_gated_linear(x, gate, adapter), adapter(x * F.silu(gate)))
    with torch.no_grad():
        torch.testing.assert_close(silu_gated_linear(x, gate, linear), linear(x * F.silu(gate)))


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 5)])
def test_gated_residual_matches_its_twin(shape):
    torch.manual_seed(0)
    residual, update, pre = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fused, naive = gated_residual(residual, update, pre), naive_gated_residual(residual, update, pre)
    torch.testing.assert_close(fused, naive)
    for ours, theirs in zip(_gradients(fused, [residual, update, pre]), _gradients(naive, [residual, update, pre])):
        torch.testing.assert_close(ours, theirs)
    torch.autograd.gradcheck(gated_residual, (residual, update, pre))


def test_gated_residual_keeps_the_residual_dtype_and_saves_its_inputs_only():
    torch.manual_seed(0)
    residual = torch.randn(3, 6, requires_grad=True)
    update, pre = (torch.randn(3, 6, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = gated_residual(residual, update, pre)
    assert out.dtype == torch.float32
    grads = _gradients(out, [residual, update, pre])
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.bfloat16]
    theirs = _gradients(naive_gated_residual(residual, update, pre), [residual, update, pre])
    for a, b in zip(grads, theirs):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    assert _saved_numel(gated_residual, residual, update, pre) == 3 * 3 * 6
