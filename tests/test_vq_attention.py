"""Block-wise VQ-attention == the dense O(T^2) oracle, in value and gradient."""

import zlib

import pytest
import torch

from longvq import LongVQConfig
from longvq.modeling_longvq import (
    LongVQRotaryRelativePositionalBias,
    LongVQSimpleRelativePositionalBias,
    vq_attention,
)
from reference import dense_vq_attention


def _random_padding_mask(batch, length, generator):
    """Each row gets random left and right padding, keeping at least one real token."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        left = int(torch.randint(0, length, (1,), generator=generator))
        right = int(torch.randint(left + 1, length + 1, (1,), generator=generator))
        mask[row, left:right] = True
    return mask


def _case(length, chunk_size, codebook_size, bidirectional, bias_kind, seed, z_dim=8, h_dim=6, batch=3):
    generator = torch.Generator().manual_seed(seed)
    config = LongVQConfig(
        chunk_size=chunk_size, shared_representation_size=z_dim, bidirectional=bidirectional,
        relative_positional_bias=bias_kind,
    )  # fmt: skip
    bias_class = LongVQSimpleRelativePositionalBias if bias_kind == "simple" else LongVQRotaryRelativePositionalBias
    bias = bias_class(config)
    for parameter in bias.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    codebook = torch.randn(codebook_size, z_dim, generator=generator)
    # Few distinct codes in use so that memory groups hold several tokens.
    codes = torch.randint(0, codebook_size, (batch, length), generator=generator)
    raw_keys = torch.randn(batch, length, z_dim, generator=generator).requires_grad_()
    query = torch.randn(batch, length, z_dim, generator=generator).requires_grad_()
    value = torch.randn(batch, length, h_dim, generator=generator).requires_grad_()
    mask = _random_padding_mask(batch, length, generator)
    return bias, codebook, codes, raw_keys, query, value, mask


def _quantized(codebook, codes, raw_keys):
    return codebook[codes] + (raw_keys - raw_keys.detach())  # straight-through, as in the quantizer


CASES = [
    # (length, chunk_size, codebook_size)
    (1, 4, 2),
    (3, 4, 5),  # T < C
    (4, 4, 3),  # T == C
    (7, 4, 3),  # T not a multiple of C
    (8, 4, 16),
    (13, 3, 4),
    (29, 5, 7),
    (40, 8, 6),
    (33, 1, 3),  # C = 1
    (50, 16, 32),
]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("bias_kind", ["simple", "rotary"])
@pytest.mark.parametrize("length,chunk_size,codebook_size", CASES)
def test_blockwise_matches_dense_oracle(length, chunk_size, codebook_size, bidirectional, bias_kind):
    seed = zlib.crc32(repr((length, chunk_size, codebook_size, bidirectional, bias_kind)).encode())
    bias, codebook, codes, raw_keys, query, value, mask = _case(
        length, chunk_size, codebook_size, bidirectional, bias_kind, seed
    )
    fast = vq_attention(
        query, _quantized(codebook, codes, raw_keys), value, codes, codebook, mask, bias, chunk_size, bidirectional
    )
    slow = dense_vq_attention(query, _quantized(codebook, codes, raw_keys), value, mask, bias, chunk_size, bidirectional)
    real = mask.unsqueeze(-1)
    torch.testing.assert_close(fast * real, slow * real, atol=1e-5, rtol=1e-5)

    # Gradients of a loss on real positions agree for queries, values, raw keys and bias parameters.
    weight = torch.randn(fast.shape, generator=torch.Generator().manual_seed(seed + 1)) * real
    tensors = [query, value, raw_keys, *bias.parameters()]
    fast_grads = torch.autograd.grad((fast * weight).sum(), tensors)
    slow_grads = torch.autograd.grad((slow * weight).sum(), tensors)
    for name, g_fast, g_slow in zip(["query", "value", "key", "bias", "bias2"], fast_grads, slow_grads):
        torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length,chunk_size,codebook_size", [(1, 4, 2), (7, 4, 3), (29, 5, 7), (33, 1, 3)])
def test_window_only_attention_matches_dense_oracle(length, chunk_size, codebook_size, bidirectional):
    """`memory=False` (the MEGA-chunk ablation) == dense attention restricted to the window, values and gradients."""
    bias, codebook, codes, raw_keys, query, value, mask = _case(length, chunk_size, codebook_size, bidirectional, "rotary", 5)
    keys = _quantized(codebook, codes, raw_keys)
    fast = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size, bidirectional, memory=False)
    slow = dense_vq_attention(query, keys, value, mask, bias, chunk_size, bidirectional, memory=False)
    real = mask.unsqueeze(-1)
    torch.testing.assert_close(fast * real, slow * real, atol=1e-5, rtol=1e-5)
    fast_grads = torch.autograd.grad((fast * real).sum(), [query, value, raw_keys])
    slow_grads = torch.autograd.grad((slow * real).sum(), [query, value, raw_keys])
    for g_fast, g_slow in zip(fast_grads, slow_grads):
        torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-5)


def test_memory_is_exercised():
    """Guard against a vacuous oracle test: with T >> 2C most attention mass must come through the memory path."""
    length, chunk_size = 64, 4
    bias, codebook, codes, raw_keys, query, value, mask = _case(length, chunk_size, 3, False, "simple", 0, batch=1)
    mask[:] = True
    keys = _quantized(codebook, codes, raw_keys)
    full = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size, False)
    window_only = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size, False, memory=False)
    assert (full[:, 3 * chunk_size :] - window_only[:, 3 * chunk_size :]).abs().max() > 0.1


def test_float64_identity_is_tight():
    """In float64 the identity holds to rounding, i.e. the block-wise form is exact, not an approximation."""
    bias, codebook, codes, raw_keys, query, value, mask = _case(37, 5, 4, False, "simple", 3)
    bias = bias.double()
    args = [t.detach().double() for t in (query, codebook[codes], value)]
    fast = vq_attention(args[0], args[1], args[2], codes, codebook.double(), mask, bias, 5, False)
    slow = dense_vq_attention(args[0], args[1], args[2], mask, bias, 5, False)
    assert ((fast - slow) * mask.unsqueeze(-1)).abs().max() < 1e-12
