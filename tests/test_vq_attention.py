"""Block-wise VQ-attention == the dense O(T^2) oracle, in value and gradient."""

import zlib

import pytest
import torch

from longvq import LongVQConfig
from longvq.modeling_longvq import LongVQRotaryRelativePositionalBias, LongVQSimpleRelativePositionalBias
from longvq.ops_longvq import naive_vq_attention as dense_vq_attention
from longvq.ops_longvq import vq_attention


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
    fast, _ = vq_attention(
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
    fast, _ = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size, bidirectional, memory=False)
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
    full, _ = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size, False)
    window_only, _ = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size, False, memory=False)
    assert (full[:, 3 * chunk_size :] - window_only[:, 3 * chunk_size :]).abs().max() > 0.1


def test_float64_identity_is_tight():
    """In float64 the identity holds to rounding, i.e. the block-wise form is exact, not an approximation."""
    bias, codebook, codes, raw_keys, query, value, mask = _case(37, 5, 4, False, "simple", 3)
    bias = bias.double()
    args = [t.detach().double() for t in (query, codebook[codes], value)]
    fast, _ = vq_attention(args[0], args[1], args[2], codes, codebook.double(), mask, bias, 5, False)
    slow = dense_vq_attention(args[0], args[1], args[2], mask, bias, 5, False)
    assert ((fast - slow) * mask.unsqueeze(-1)).abs().max() < 1e-12


@pytest.mark.parametrize("block_aligned", [False, True], ids=["any_split", "block_aligned"])
@pytest.mark.parametrize("length,chunk_size,codebook_size", [(13, 3, 4), (29, 5, 7), (40, 8, 6), (33, 1, 3)])
def test_calls_continuing_a_state_equal_one_call(length, chunk_size, codebook_size, block_aligned):
    """`vq_attention` over consecutive parts, each continuing the previous part's final state, gives the outputs
    and the gradients of one call over the whole sequence (a row's real tokens first, the padding trailing), and
    the final state after the parts equals the one-call final state."""
    seed = zlib.crc32(repr((length, chunk_size, codebook_size, block_aligned)).encode())
    bias, codebook, codes, raw_keys, query, value, _ = _case(length, chunk_size, codebook_size, False, "simple", seed)
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (codes.shape[0],), generator=generator)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    keys = _quantized(codebook, codes, raw_keys)
    whole, whole_state = vq_attention(
        query, keys, value, codes, codebook, mask, bias, chunk_size, lengths=lengths, output_final_state=True
    )
    if block_aligned:  # parts of whole blocks; every row runs every column (its padding trails)
        cuts = sorted({chunk_size * int(c) for c in torch.randint(1, -(-length // chunk_size), (2,), generator=generator)})
    else:
        cuts = sorted({int(c) for c in torch.randint(1, length, (3,), generator=generator)})
    bounds = [0, *cuts, length]
    outputs, state = [], None
    for begin, end in zip(bounds, bounds[1:]):
        part = slice(begin, end)
        part_lengths = None if block_aligned else (lengths - begin).clamp(0, end - begin)
        out, state = vq_attention(
            query[:, part], keys[:, part], value[:, part], codes[:, part], codebook, mask[:, part], bias, chunk_size,
            initial_state=state, lengths=part_lengths, output_final_state=True, block_aligned=block_aligned,
        )  # fmt: skip
        outputs.append(out)
    parts = torch.cat(outputs, dim=1)
    real = mask.unsqueeze(-1)
    torch.testing.assert_close(parts * real, whole * real, atol=1e-5, rtol=1e-5)
    weight = torch.randn(whole.shape, generator=generator) * real
    for name, grad_parts, grad_whole in zip(
        ("query", "value", "key"),
        torch.autograd.grad((parts * weight).sum(), (query, value, raw_keys)),
        torch.autograd.grad((whole * weight).sum(), (query, value, raw_keys)),
    ):
        torch.testing.assert_close(grad_parts, grad_whole, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if not block_aligned:  # (block-aligned parts advance every row by every column, padding included)
        for name in ("mask", "memory_counts", "positions"):
            assert torch.equal(getattr(state, name), getattr(whole_state, name)), name
        assert torch.equal(state.codes[state.mask], whole_state.codes[whole_state.mask])  # empty slots: any code
        torch.testing.assert_close(state.memory_sums, whole_state.memory_sums, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.values * state.mask[..., None], whole_state.values * whole_state.mask[..., None])
