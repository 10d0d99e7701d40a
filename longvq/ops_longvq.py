# Copyright 2026 The LongVQ Authors. Licensed under the Apache License, Version 2.0.
"""LongVQ's operations as plain functions of tensors, each fast path next to its slow, obviously-right twin.

- EMA: `ema_scan` (block scan of matmuls, optional initial state in, final state out), `ema_final_state` (per-row end
  states of ragged rows), `ema_step` (one decoding step), `fft_causal_convolution` (truncated kernels); twin:
  `naive_ema`, the recurrence one step at a time.
- VQ-attention: `vq_attention` (block-parallel, causal or bidirectional; a causal call takes an optional
  `VQAttentionState` in and returns the state after its tokens), `vq_attention_step` (one decoding token against the
  joint window + memory layout of a decoding state); twins: `naive_vq_attention` (dense O(T^2) softmax attention over
  the quantized keys, the identity the block-wise computation must reproduce) and `naive_vq_attention_rows` (the same
  at sampled query positions, for very long inputs).

The tests compare every fast path with its twin. Copied into Hub checkpoints beside `modeling_longvq.py` (which
imports it): standard library and torch only; on CUDA tensors the block-wise attention runs the fused Triton kernel of
`triton_longvq` (copied with it) when Triton is installed.

Shapes: B batch, T length, D hidden_size, H intermediate_size (value width), Z shared_representation_size,
N ema_projection_size, S codebook_size, C chunk_size.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .triton_longvq import blockwise_attention_triton, kernel_supports


def autocast_off(x: torch.Tensor):
    """A context that turns autocast off on x's device: EMA kernels and recurrences and VQ distances must be computed
    in float32 under bf16/fp16 autocast (a matmul there would otherwise run in half precision)."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()  # entering an autocast context costs ~10 us, per layer of every decode step
    return torch.autocast(x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-dimensional damped EMA (MEGA)
# ---------------------------------------------------------------------------------------------------------------------


def fft_causal_convolution(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[..., t] = sum_{s <= t} kernel[..., t - s] x[..., s], computed with a real FFT in float32.

    x: (B, D, T); kernel: (D, K) with K <= T. Returns (B, D, T) float32.
    """
    length, kernel_length = x.shape[-1], kernel.shape[-1]
    fft_size = 1 << (length + kernel_length - 1).bit_length()  # no wrap-around into the outputs; a fast FFT size
    x_f = torch.fft.rfft(x.float(), n=fft_size)
    k_f = torch.fft.rfft(kernel.float(), n=fft_size)
    return torch.fft.irfft(x_f * k_f, n=fft_size)[..., :length]



_SMALLEST_LOG_POWER = -40.0  # q^e is floored at e^-40 ~ 4e-18: products of two such powers stay normal floats


def powers(q: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """q^e for q (channels, N) and exponents (L,): (channels, N, L), as exp(e log q) in float32.

    Powers that would be below e^-40 are raised to it: an absolute change < 4e-18 per kernel tap, far below float32
    resolution of the outputs, which keeps every power and product of two powers out of the subnormal range where
    CPU arithmetic is tens of times slower.
    """
    return torch.exp((exponents.float()[None, None, :] * torch.log(q)[:, :, None]).clamp(min=_SMALLEST_LOG_POWER))


class _Transpose(torch.autograd.Function):
    """The transpose of a matrix as a contiguous tensor, in forward and backward: PyTorch's 2-D transposing copy is
    several times faster than a permuting copy of the same data, and a contiguous gradient spares `bmm` a copy per
    batch matrix. (Measured: a 4K-token training step of the benchmark model, one thread, 1.8-1.9 s with it, 2.1 s
    with `x.t().contiguous()` and autograd's own backward.)"""

    @staticmethod
    def forward(ctx, x):
        return x.t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.t().contiguous()


_SCAN_PERIOD = 64  # block length P of `ema_scan`
_POWER_PERIOD = 64  # period P of the factorised power sums: (D, N, P) and (D, N, T / P) powers instead of (D, N, T)


def power_sum(weights: torch.Tensor, q: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """`y[..., c, t] = sum_n weights[..., c, n] q[c, n]^(start + t)` for t < length: (..., channels, length) float32.

    With `t = a P + r`, `q^(start + t) = q^(start + a P) q^r`: one batched matmul over the channels of
    (..., A, N) x (N, P), so no (channels, N, length) tensor of powers is built (nor exponentiated).
    """
    period = min(_POWER_PERIOD, length)
    periods = -(-length // period)
    lead, (channels, n) = weights.shape[:-2], weights.shape[-2:]
    outer = weights.reshape(-1, channels, n, 1) * powers(q, start + period * torch.arange(periods, device=q.device))
    rows = outer.shape[0]
    outer = outer.permute(1, 0, 3, 2).reshape(channels, rows * periods, n)  # (c, M A, N)
    out = torch.bmm(outer, powers(q, torch.arange(period, device=q.device)))  # (c, M A, P)
    out = out.view(channels, rows, periods * period)[..., :length].transpose(0, 1)
    return out.reshape(*lead, channels, length)



def ema_scan(
    x: torch.Tensor, gain: torch.Tensor, q: torch.Tensor, readout: torch.Tensor, initial_state: torch.Tensor | None = None
):
    """The causal EMA of x (B, T, C) over all C EMA channels (pads zeroed) in blocks of P steps, as matmuls, for input
    gain `p beta`, decay `q = 1 - p delta` and readout `eta / sqrt(N)` (each (C, N) float32).

    Within a block, each channel applies the (P x P) lower-triangular Toeplitz matrix of the kernel's first P
    taps. Across blocks, the recurrence is carried by the (B, C, N) states between blocks: each block's own end
    state `u_a` is a (P x N) matmul, the states `h_a = q^P h_(a-1) + u_a` (from `h_(-1)` = initial_state) follow
    from an inclusive scan by doubling (log2 of the number of blocks vectorised steps), and a block's outputs
    add `eta q^(p+1) h_(a-1)`. Returns the output (B, T, C) and the state after step T (B, C, N), float32; the
    state is None when T is not a multiple of P (the zero-padded tail would have decayed it).
    """
    batch, length, channels = x.shape
    period = min(_SCAN_PERIOD, length)
    pad = -length % period
    blocks = (length + pad) // period
    x = _Transpose.apply(F.pad(x.float(), (0, 0, 0, pad)).view(-1, channels)).view(channels, batch * blocks, period)
    q_powers = powers(q, torch.arange(period + 1, device=x.device))  # (C, N, P + 1): q^0 .. q^P
    taps = torch.linalg.vecdot(q_powers[..., :period], (gain * readout).unsqueeze(-1), dim=1)  # (C, P): K[0..P-1]
    # (C, P, P) with [r, p] = K[p - r] (zero for p < r): windows of the zero-padded taps, newest first.
    toeplitz = F.pad(taps, (period - 1, 0)).unfold(-1, period, 1).flip(1)
    out = torch.bmm(x, toeplitz)  # (C, BA, P)
    ends = torch.bmm(x, (gain.unsqueeze(-1) * q_powers[..., :period].flip(-1)).transpose(1, 2))  # (C, BA, N)
    # The initial state enters as a block of its own in front: states[0] = h_(-1), states[a + 1] = h_a.
    if initial_state is None:
        initial_state = ends.new_zeros(batch, channels, q.shape[1])
    first = initial_state.transpose(0, 1)
    states = torch.cat([first.unsqueeze(2), ends.view(channels, batch, blocks, -1)], dim=2)  # (C, B, A + 1, N)
    span, decay = 1, q_powers[..., period]  # q^(P span)
    while span <= blocks:  # after this step, states[a] sums the blocks (a - 2 span, a]
        states = states + decay.view(channels, 1, 1, -1) * F.pad(states[:, :, :-span], (0, 0, span, 0))
        span, decay = 2 * span, (decay * decay).clamp(min=math.exp(_SMALLEST_LOG_POWER))
    starts = states[:, :, :-1].reshape(channels, batch * blocks, -1)  # the state before each block
    out = torch.baddbmm(out, starts, readout.unsqueeze(-1) * q_powers[..., 1:])  # + (C, N, P)
    out = _Transpose.apply(out.view(channels, -1)).view(batch, blocks * period, channels)[:, :length]
    return out, (states[:, :, -1].transpose(0, 1) if pad == 0 else None)



def ema_final_state(
    x: torch.Tensor, lengths: torch.Tensor, gain: torch.Tensor, q: torch.Tensor, initial_state: torch.Tensor | None
) -> torch.Tensor:
    """Recurrent state (B, D, N) float32 after the first `lengths[b]` steps of row b of x (B, T, D), pads zeroed:
    `h = sum_t p beta q^(len-1-t) x_t + q^len h_init`, without materialising a (D, N, T) tensor: with
    `len-1-t = a P + r`, the sum is `sum_a q^(a P) sum_r q^r x`, two batched matmuls over the channels."""
    batch, length, channels = x.shape
    # Newest step first, each row starting from its own last step (steps before a row's start are zeros).
    index = (lengths[:, None] - 1 - torch.arange(length, device=x.device)[None, :]) % length
    steps_back = x.float().gather(1, index.unsqueeze(-1).expand_as(x))
    steps_back = steps_back * (torch.arange(length, device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
    period = min(_POWER_PERIOD, length)
    periods = -(-length // period)
    steps_back = F.pad(steps_back, (0, 0, 0, periods * period - length))
    steps_back = steps_back.view(batch * periods, period, channels).permute(2, 0, 1).contiguous()  # (D, B A, P)
    within = torch.bmm(steps_back, powers(q, torch.arange(period, device=x.device)).transpose(1, 2))  # (D, B A, N)
    outer = powers(q, period * torch.arange(periods, device=x.device)).transpose(1, 2)  # (D, A, N)
    state = (within.view(channels, batch, periods, -1) * outer[:, None]).sum(2).transpose(0, 1)  # (B, D, N)
    state = state * gain
    if initial_state is not None:
        state = state + initial_state * powers(q, lengths.float()).permute(2, 0, 1)
    return state



def ema_step(x: torch.Tensor, state: torch.Tensor, gain: torch.Tensor, q: torch.Tensor, readout: torch.Tensor):
    """One recurrence step for decoding. x: (B, C); state: (B, C, N) float32. Returns y (B, C) float32 and the new
    state."""
    state = torch.addcmul(gain * x.float().unsqueeze(-1), q, state)
    return torch.linalg.vecdot(state, readout), state


def naive_ema(x, damping_logit, decay_logit, expansion, projection, bidirectional=False):
    """MEGA's damped EMA one step at a time, from the EMA parameters (channels, N) (`LongVQMultiDimensionalEma`'s).
    x: (B, T, D). Returns the raw EMA output (B, T, D) in float64.

    Causal: h_t = p*beta x_t + (1 - p*delta) h_{t-1}, y_t = sum_n eta h_t / sqrt(N).
    Bidirectional: the second D channels run the same recurrence over the reversed sequence, and y_t adds that
    backward output at t + 1 (the current token is counted once, by the forward direction).
    """
    p = torch.sigmoid(damping_logit.double())
    gain = p * expansion.double()
    decay = 1 - p * torch.sigmoid(decay_logit.double())
    readout = projection.double() / math.sqrt(decay.shape[-1])
    x = x.double()
    batch, length, dim = x.shape

    def run(inputs, channels):
        state = torch.zeros(batch, dim, decay.shape[-1], dtype=torch.float64)
        outputs = []
        for t in range(length):
            state = gain[channels] * inputs[:, t, :, None] + decay[channels] * state
            outputs.append((state * readout[channels]).sum(-1))
        return torch.stack(outputs, dim=1)

    forward = run(x, slice(0, dim))
    if not bidirectional:
        return forward
    backward = run(x.flip(1), slice(dim, 2 * dim)).flip(1)  # backward[t] = sum_{s >= t} K2[s - t] x_s
    shifted = torch.cat([backward[:, 1:], torch.zeros_like(backward[:, :1])], dim=1)
    return forward + shifted




# ---------------------------------------------------------------------------------------------------------------------
# Gated SiLU projection: one saved buffer fewer per gate
# ---------------------------------------------------------------------------------------------------------------------


class _SiluGatedLinear(torch.autograd.Function):
    """`linear(x * silu(gate), weight, bias)` (x None: `linear(silu(gate))`) that saves its inputs only: backward
    recomputes the sigmoid, SiLU and product from them instead of autograd keeping `silu(gate)`, the product (and the
    gate for SiLU's own backward) as separate buffers. Under autocast the forward runs at the autocast dtype (as
    `F.linear` would) and the backward in the gradient's dtype; each gradient is returned in its input's dtype."""

    @staticmethod
    def forward(ctx, x, gate, weight, bias):
        ctx.save_for_backward(x, gate, weight)
        ctx.has_bias = bias is not None
        activation = F.silu(gate)
        return F.linear(activation if x is None else x * activation, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, gate, weight = ctx.saved_tensors
        dtype = grad.dtype
        gate_c = gate.to(dtype)
        sigmoid = torch.sigmoid(gate_c)
        activation = gate_c * sigmoid
        product = activation if x is None else x.to(dtype) * activation
        grad_product = grad @ weight.to(dtype)
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        grad_activation = grad_product if x is None else grad_product * x.to(dtype)
        grad_gate = grad_activation * sigmoid * (1 + gate_c * (1 - sigmoid))
        grad_x = None if x is None else (grad_product * activation).to(x.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(weight.dtype)
        return grad_x, grad_gate.to(gate.dtype), grad_weight.to(weight.dtype), grad_bias


def silu_gated_linear(x: torch.Tensor | None, gate: torch.Tensor, linear: torch.nn.Module) -> torch.Tensor:
    """`linear(x * silu(gate))`, or `linear(silu(gate))` when x is None, for a `torch.nn.Linear` `linear`; fused
    (`_SiluGatedLinear`, which saves x and gate only) when autograd records and `linear` is a plain `nn.Linear`,
    otherwise (an adapter such as a PEFT LoRA layer, no gradient, a `torch.func` transform) the plain expression.
    Twin: `naive_silu_gated_linear`."""
    if type(linear) is not torch.nn.Linear or not torch.is_grad_enabled():
        return naive_silu_gated_linear(x, gate, linear)
    return _SiluGatedLinear.apply(x, gate, linear.weight, linear.bias)


def naive_silu_gated_linear(x: torch.Tensor | None, gate: torch.Tensor, linear: torch.nn.Module) -> torch.Tensor:
    """`linear(x * silu(gate))` (x None: `linear(silu(gate))`) as plain autograd operations."""
    activation = F.silu(gate)
    return linear(activation if x is None else x * activation)


class _GatedResidual(torch.autograd.Function):
    """`lerp(residual, silu(pre), sigmoid(update))` computed in the residual's dtype, saving its three inputs only
    (which the layer keeps anyway: its input, the projection holding `update`, and `pre` for the SiLU): backward
    recomputes the sigmoid and SiLU instead of autograd keeping them as two more buffers."""

    @staticmethod
    def forward(ctx, residual, update, pre):
        ctx.save_for_backward(residual, update, pre)
        return torch.lerp(residual, F.silu(pre.to(residual.dtype)), torch.sigmoid(update.to(residual.dtype)))

    @staticmethod
    def backward(ctx, grad):
        residual, update, pre = ctx.saved_tensors
        pre_c = pre.to(residual.dtype)
        weight, pre_sigmoid = torch.sigmoid(update.to(residual.dtype)), torch.sigmoid(pre_c)
        gated = pre_c * pre_sigmoid
        grad_update = grad * (gated - residual) * weight * (1 - weight)
        grad_pre = grad * weight * pre_sigmoid * (1 + pre_c * (1 - pre_sigmoid))
        return grad * (1 - weight), grad_update.to(update.dtype), grad_pre.to(pre.dtype)


def gated_residual(residual: torch.Tensor, update: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """MEGA's gated residual `residual + sigmoid(update) * (silu(pre) - residual)` in the residual's dtype; fused
    (`_GatedResidual`) when autograd records, else the plain expression (twin: `naive_gated_residual`)."""
    if not torch.is_grad_enabled():
        return naive_gated_residual(residual, update, pre)
    return _GatedResidual.apply(residual, update, pre)


def naive_gated_residual(residual: torch.Tensor, update: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return torch.lerp(residual, F.silu(pre.to(residual.dtype)), torch.sigmoid(update.to(residual.dtype)))


# ---------------------------------------------------------------------------------------------------------------------
# Block-wise VQ-attention
# ---------------------------------------------------------------------------------------------------------------------


def window_offsets(chunk_size: int, bidirectional: bool, device=None) -> torch.Tensor:
    """Offsets `i - j` between query slot i of block n and the window's key slots j (blocks n-1, n[, n+1]).

    Returns (C, W) long with W = 2C (causal) or 3C (bidirectional).
    """
    width = (3 if bidirectional else 2) * chunk_size
    queries = torch.arange(chunk_size, device=device)[:, None] + chunk_size
    return queries - torch.arange(width, device=device)[None, :]


def _prefix_sums(grid: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum over dim 1 of (B, n, ...). For the few blocks of a segment a product with a
    triangular matrix of ones is several times faster on CPU than `cumsum` over that strided dim."""
    blocks = grid.shape[1]
    if blocks > 64:
        return grid.cumsum(1)
    ones = torch.ones(blocks, blocks, device=grid.device, dtype=grid.dtype).tril()
    with autocast_off(grid):  # counts and sums stay float32
        return (ones @ grid.reshape(grid.shape[0], blocks, -1)).view(grid.shape)



def code_value_sums(codes, values, mask, codebook_size):
    """Per-row count (B, S) and value sum (B, S, H) of the real tokens. codes (B, L), values (B, L, H), mask (B, L)."""
    # Sums in >= float32, like vq_attention's memory statistics (bf16/fp16 values under autocast).
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    weight = mask.to(values.dtype)
    counts = torch.zeros(codes.shape[0], codebook_size, device=codes.device).scatter_add_(1, codes, weight.float())
    sums = torch.zeros(codes.shape[0], codebook_size, values.shape[-1], device=values.device, dtype=values.dtype)
    sums = sums.scatter_add(1, codes.unsqueeze(-1).expand_as(values), values * weight.unsqueeze(-1))
    return counts, sums



def code_statistics(codes: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, codebook_size: int, with_sums: bool):
    """Per-code count (S,) and, if `with_sums`, key sum (S, Z) (else None) over the real tokens of the whole batch;
    float32, no gradient."""
    if not with_sums:
        return torch.zeros(codebook_size, device=codes.device).index_add_(0, codes.flatten(), mask.flatten().float()), None
    keys = keys.detach().reshape(1, -1, keys.shape[-1])
    counts, sums = code_value_sums(codes.reshape(1, -1), keys, mask.reshape(1, -1), codebook_size)
    return counts[0], sums[0]



def _block_memory(codes, value, key_mask, codebook_size, chunk_size, bidirectional, initial_memory):
    """Each block's memory: per-code counts (B, n, S) and value sums (B, n, S, H) of the keys outside its window
    (causal: blocks <= n - 2, plus `initial_memory`), in >= float32. codes (B, nC), value (B, nC, H), key_mask (B, nC): the
    sequence padded to whole blocks.

    Per-block code counts and value sums are scattered straight into their place in a (B, n + 2, S, ...) grid of block
    totals (no one-hot); a cumulative sum over blocks then gives, for causal block n, the totals of blocks <= n - 2.
    """
    batch, h_dim, s_dim = codes.shape[0], value.shape[-1], codebook_size
    num_blocks = codes.shape[1] // chunk_size
    sums_dtype = torch.promote_types(value.dtype, torch.float32)
    real = key_mask.reshape(batch, num_blocks, chunk_size)
    grid_rows = torch.arange(num_blocks, device=codes.device)[:, None] + 2
    grid_index = (grid_rows * s_dim + codes.view(batch, num_blocks, chunk_size)).view(batch, -1)
    counts = torch.zeros(batch, (num_blocks + 2) * s_dim, device=codes.device, dtype=sums_dtype)
    counts = counts.scatter_add_(1, grid_index, real.view(batch, -1).to(sums_dtype))
    masked_values = value * key_mask.unsqueeze(-1).to(value.dtype)
    sums = torch.zeros(batch, (num_blocks + 2) * s_dim, h_dim, device=codes.device, dtype=sums_dtype)
    sums = sums.scatter_add_(1, grid_index.unsqueeze(-1).expand(-1, -1, h_dim), masked_values.to(sums_dtype))
    counts, sums = counts.view(batch, num_blocks + 2, s_dim), sums.view(batch, num_blocks + 2, s_dim, h_dim)
    if bidirectional:  # the whole sequence minus the window blocks n - 1, n, n + 1 (grid rows n + 1 .. n + 3)
        padded_counts, padded_sums = F.pad(counts, (0, 0, 0, 1)), F.pad(sums, (0, 0, 0, 0, 0, 1))
        memory_counts = counts.sum(1, keepdim=True) - sum(padded_counts[:, 1 + i : 1 + i + num_blocks] for i in range(3))
        memory_sums = sums.sum(1, keepdim=True) - sum(padded_sums[:, 1 + i : 1 + i + num_blocks] for i in range(3))
        return memory_counts.round(), memory_sums  # counts: exact integers despite the float subtraction
    memory_counts = _prefix_sums(counts)[:, :num_blocks]
    memory_sums = _prefix_sums(sums)[:, :num_blocks]
    if initial_memory is not None:
        memory_counts = memory_counts + initial_memory[0].unsqueeze(1).to(memory_counts.dtype)
        memory_sums = memory_sums + initial_memory[1].unsqueeze(1).to(memory_sums.dtype)
    return memory_counts, memory_sums


def _pad_to_blocks(chunk_size, query, key, value, codes, key_mask):
    """The inputs of `_blockwise_attention`, padded at the end to a whole number of blocks (padded keys masked)."""
    pad = -query.shape[1] % chunk_size
    if not pad:
        return query, key, value, codes, key_mask
    query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    return query, key, value, F.pad(codes, (0, pad)), F.pad(key_mask, (0, pad), value=False)


def _kernel_attention(
    query, key, value, codes, codebook, key_mask, position_bias, chunk_size, bidirectional, initial_memory, memory
):  # fmt: skip
    """`_blockwise_attention` (same arguments, no dropout) through the fused Triton kernel of `triton_longvq`: the
    memory statistics come from `_block_memory` (autograd carries the kernel's gradient w.r.t. the value sums back
    through the prefix sums to the values), the (C, W) window bias from `position_bias`; the kernel does the rest.
    Taken by `_blockwise_attention` for CUDA tensors when Triton is installed; the tests call it on CPU tensors under
    Triton's interpreter. `memory=False` runs the same kernel with an empty codebook."""
    batch, length, _ = query.shape
    num_blocks = -(-length // chunk_size)
    query, key, value, codes, key_mask = _pad_to_blocks(chunk_size, query, key, value, codes, key_mask)
    if memory:
        counts, sums = _block_memory(
            codes, value, key_mask, codebook.shape[0], chunk_size, bidirectional, initial_memory
        )  # fmt: skip
    else:
        codebook = codebook[:0]
        counts = torch.zeros(batch, num_blocks, 0, device=query.device)
        sums = torch.zeros(batch, num_blocks, 0, value.shape[-1], device=query.device)
    bias = position_bias(window_offsets(chunk_size, bidirectional, device=query.device))

    def blocks(t):
        return t.reshape(batch * num_blocks, chunk_size, *t.shape[2:])

    out = blockwise_attention_triton(
        blocks(query), blocks(key), blocks(value), blocks(key_mask), bias, codebook, counts.flatten(0, 1),
        sums.flatten(0, 1), num_blocks, bidirectional,
    )  # fmt: skip
    return out.reshape(batch, num_blocks * chunk_size, -1)[:, :length]


def _masked_logits(additive: torch.Tensor, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`additive + query @ keys^T` for (Bn, C, W) float32 additive terms (bias, masks, log counts), (Bn, C, Z) queries
    and (Bn, W, Z) keys. Under autocast (or with half-precision queries) the product runs in half precision and the
    sum in float32: the masks' huge negative values would become -inf in half precision, and a row masked everywhere
    (a padded query) would softmax to NaN and poison every gradient."""
    if query.dtype == additive.dtype and not torch.is_autocast_enabled(query.device.type):
        return torch.baddbmm(additive, query, keys.transpose(1, 2))
    return torch.bmm(query, keys.transpose(1, 2).to(query.dtype)).to(additive.dtype) + additive


def _blockwise_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    key_mask: torch.Tensor,
    position_bias,
    chunk_size: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    initial_memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory: bool = True,
) -> torch.Tensor:
    r"""Exact softmax attention over vector-quantized keys in O(T (2C + S) (Z + H)), blocks counted from index 0.

    Args:
        query: (B, T, Z). key: (B, T, Z) quantized keys, equal to `codebook[codes]` in value.
        value: (B, T, H). codes: (B, T) long. codebook: (S, Z). key_mask: (B, T) bool, True on real tokens.
        position_bias: maps offsets `i - j` to a bias, added inside the window only.
        initial_memory: causal only, per-code counts (B, S) and value sums (B, S, H) of tokens before the sequence,
            in every block's memory (decoding continues from a cache this way).
        memory: False attends to the window only (the MEGA-chunk ablation, `config.codebook_memory=False`).

    The sequence is cut into blocks of C tokens, counted from index 0. A query in block n sees
      - the window: keys of blocks n-1, n (causal, j <= i) or n-1, n, n+1 (bidirectional), with logit
        `q.k_j / sqrt(Z) + bias(i - j)`;
      - the memory: every other key, grouped by code: logit `q.C_s / sqrt(Z) + log N_s`, value `M_s` (mean of the
        group's values), where the group is blocks <= n-2 (causal) or the whole sequence outside the window.
    One softmax covers both, so this equals dense softmax attention over the quantized keys with the bias applied
    inside the window. The memory reads the codebook (no gradient), so the straight-through gradient reaches a key
    only from queries that see it in their window.

    Returns (B, T, H); rows of padded queries are finite but meaningless.
    """
    if not (dropout > 0 and training) and kernel_supports(query):
        return _kernel_attention(
            query, key, value, codes, codebook, key_mask, position_bias, chunk_size, bidirectional, initial_memory,
            memory,
        )  # fmt: skip
    batch, length, z_dim = query.shape
    h_dim, s_dim = value.shape[-1], codebook.shape[0]
    num_blocks = -(-length // chunk_size)
    query, key, value, codes, key_mask = _pad_to_blocks(chunk_size, query, key, value, codes, key_mask)
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)  # counts and softmax statistics in >= float32
    never = torch.finfo(softmax_dtype).min  # additive mask: exp underflows to exactly 0, all-masked rows stay finite

    # Batch and blocks are flattened into one bmm batch of B*n blocks. A block's neighbour in the flat order is its
    # neighbour in the sequence, except across rows, where the key mask below gives the neighbour weight 0.
    def blocks(t):
        return t.reshape(batch * num_blocks, chunk_size, *t.shape[2:])

    q = blocks(query) * z_dim**-0.5
    k, v, m = blocks(key), blocks(value), blocks(key_mask)
    position = torch.arange(num_blocks, device=query.device).repeat(batch)  # block index of each flat block
    neighbours = (-1, 0, 1) if bidirectional else (-1, 0)

    def neighbour(t, shift):
        """Flat block i + shift of t (zeros past either end). Only the narrow keys and masks are shifted."""
        if shift == 0:
            return t
        zeros = torch.zeros_like(t[:1])
        return torch.cat([zeros, t[:-1]]) if shift < 0 else torch.cat([t[1:], zeros])

    # Window logits q.k_j / sqrt(Z) + bias(i - j), masked: padded keys, keys beyond the row's ends, future keys.
    offsets = window_offsets(chunk_size, bidirectional, device=query.device)  # (C, W)
    bias = position_bias(offsets).to(softmax_dtype)
    if not bidirectional:
        bias = bias.masked_fill(offsets < 0, never)
    key_allowed = []
    for shift in neighbours:
        inside = (position + shift >= 0) & (position + shift < num_blocks)
        key_allowed.append(neighbour(m, shift) & inside[:, None])
    key_allowed = torch.cat(key_allowed, dim=1)  # (Bn, W)
    key_bias = torch.zeros(key_allowed.shape, device=query.device, dtype=softmax_dtype).masked_fill(~key_allowed, never)
    k_window = torch.cat([neighbour(k, shift) for shift in neighbours], dim=1)  # (Bn, W, Z), Z is narrow

    def window_output(*parts):
        """sum_j w_ij v_j over the window, given the weights of each neighbour block: one bmm per neighbour on views
        of v, accumulated in place (no window copy of the values)."""
        by_shift = dict(zip(neighbours, parts))
        out = torch.bmm(by_shift[0], v)
        if -1 in by_shift:  # block i reads v of block i - 1
            out[1:].baddbmm_(by_shift[-1][1:], v[:-1])
        if 1 in by_shift:
            out[:-1].baddbmm_(by_shift[1][:-1], v[1:])
        return out

    if not memory:
        window_logits = _masked_logits(bias + key_bias[:, None, :], q, k_window)
        weights = torch.softmax(window_logits.to(softmax_dtype), dim=-1).to(v.dtype)
        if dropout > 0 and training:
            weights = F.dropout(weights, p=dropout)
        out = window_output(*weights.split(chunk_size, dim=-1))
        return out.reshape(batch, num_blocks * chunk_size, h_dim)[:, :length]

    memory_counts, memory_sums = _block_memory(codes, value, key_mask, s_dim, chunk_size, bidirectional, initial_memory)
    memory_counts = memory_counts.reshape(batch * num_blocks, 1, s_dim)
    memory_sums = memory_sums.reshape(batch * num_blocks, s_dim, h_dim).to(v.dtype)
    # Memory logit q.C_s / sqrt(Z) + log N_s (never where N_s = 0); its value M_s = sums_s / N_s enters as w_s / N_s.
    # Window and memory logits come out of one bmm against [window keys | codewords], the additive terms
    # (position bias and causal mask per query slot; key mask and log counts per block) summed into its input.
    log_counts = torch.where(memory_counts > 0, memory_counts.clamp(min=1).log(), never)
    keys = torch.cat([k_window, codebook.to(k_window.dtype).expand(k_window.shape[0], -1, -1)], dim=1)
    per_slot = F.pad(bias, (0, s_dim))  # (C, W + S)
    per_block = torch.cat([key_bias, log_counts.view(-1, s_dim)], dim=-1)  # (Bn, W + S)
    logits = _masked_logits(per_slot + per_block[:, None, :], q, keys)
    weights = torch.softmax(logits.to(softmax_dtype), dim=-1).to(v.dtype)
    if dropout > 0 and training:
        weights = F.dropout(weights, p=dropout)
    *window_weights, memory_weights = weights.split([chunk_size] * len(neighbours) + [s_dim], dim=-1)
    memory_weights = memory_weights / memory_counts.clamp(min=1).to(v.dtype)
    out = torch.baddbmm(window_output(*window_weights), memory_weights, memory_sums)
    return out.reshape(batch, num_blocks * chunk_size, h_dim)[:, :length]



@dataclass
class VQAttentionState:
    """What causal VQ-attention carries from one call to the next: the window, the 2C slots of the block of each row's
    last token and the block before it (their quantized keys, with autograd history when computed in training, codes,
    values and which slots are filled), the memory of every earlier token as per-code counts and value sums, and each
    row's position on the block grid (the tokens it has seen)."""

    keys: torch.Tensor  # (B, 2C, Z)
    codes: torch.Tensor  # (B, 2C) long
    values: torch.Tensor  # (B, 2C, H)
    mask: torch.Tensor  # (B, 2C) bool
    memory_counts: torch.Tensor  # (B, S) float32
    memory_sums: torch.Tensor  # (B, S, H) float32
    positions: torch.Tensor  # (B,) long


def vq_attention(
    query, key, value, codes, codebook, key_mask, position_bias, chunk_size, bidirectional=False, dropout=0.0,
    training=False, memory=True, initial_state=None, lengths=None, output_final_state=False, block_aligned=False,
):  # fmt: skip
    r"""Exact softmax attention over vector-quantized keys, block-parallel, in O(T (2C + S) (Z + H)).

    Args:
        query: (B, T, Z). key: (B, T, Z) quantized keys, equal to `codebook[codes]` in value. value: (B, T, H).
        codes: (B, T) long. codebook: (S, Z). key_mask: (B, T) bool, True on real tokens.
        position_bias: maps offsets `i - j` to a bias, added inside the window only.
        memory: False attends to the window only (the MEGA-chunk ablation, `config.codebook_memory=False`).
        initial_state: causal only, a `VQAttentionState` the tokens continue: row b's first token is at grid
            position `initial_state.positions[b]`, its window holds the state's window slots, and every block's
            memory includes the state's memory.
        lengths: (B,) long, each row's tokens (its real tokens come first; the rest is padding); default T.
        output_final_state: causal only, also return the `VQAttentionState` after each row's `lengths[b]` tokens.
        block_aligned: the caller guarantees that every row starts at a block boundary (no state, or a state whose
            rows all ended on one: the pieces of a long input), so the tokens are placed by concatenation instead of
            per-row scatters.

    Without a state, blocks count from index 0 and a query in block n sees the window (blocks n-1, n, causally j <= i,
    or n-1, n, n+1 bidirectionally, logit `q.k_j / sqrt(Z) + bias(i - j)`) and the memory (every other key grouped by
    code: logit `q.C_s / sqrt(Z) + log N_s`, value `M_s` the mean of the group's values) under one softmax: dense
    softmax attention over the quantized keys with the bias applied inside the window (`naive_vq_attention`). The
    memory reads the codebook (no gradient), so the straight-through gradient reaches a key only from queries that see
    it in their window. A state's window slots are put in front of the tokens so that each row lands at its own block
    phase; a state that carries keys with autograd history passes gradients across calls.

    Returns (B, T, H) (rows of padded queries finite but meaningless) and the final state or None.
    """
    if bidirectional and (initial_state is not None or output_final_state):
        raise ValueError("Bidirectional VQ-attention has no state: it sees the whole sequence at once.")
    if initial_state is None and not output_final_state:
        out = _blockwise_attention(
            query, key, value, codes, codebook, key_mask, position_bias, chunk_size, bidirectional, dropout, training,
            memory=memory,
        )  # fmt: skip
        return out, None
    batch, length = codes.shape
    window, codebook_size = 2 * chunk_size, codebook.shape[0]
    if lengths is None:
        lengths = torch.full((batch,), length, dtype=torch.long, device=codes.device)
    if initial_state is None:  # [2C empty slots | tokens | spare block]: the tokens start a block
        positions = torch.zeros_like(lengths)
        start = torch.full_like(lengths, window)
        previous = (None,) * 4
        memory_counts = torch.zeros(batch, codebook_size, device=codes.device)
        sums_dtype = torch.promote_types(value.dtype, torch.float32)
        memory_sums = torch.zeros(batch, codebook_size, value.shape[-1], device=codes.device, dtype=sums_dtype)
    else:  # [window (2C slots) | tokens | spare block]: row b's first token at index `start[b]`, in (C, 2C]
        positions = initial_state.positions.to(codes.device)
        last_block = (positions + chunk_size - 1) // chunk_size - 1  # block of the last seen token
        start = positions - (last_block - 1) * chunk_size
        previous = (initial_state.keys, initial_state.codes, initial_state.values, initial_state.mask)
        memory_counts, memory_sums = initial_state.memory_counts, initial_state.memory_sums
    index = start[:, None] + torch.arange(length, device=codes.device)  # (B, T) into the extended sequence

    def extend(old, new):
        """[old window (2C slots, zeros if None) | new, from each row's `start` | zeros up to one spare block]."""
        if old is None:
            old = new.new_zeros(batch, window, *new.shape[2:])
        spare = new.new_zeros(batch, chunk_size, *new.shape[2:])
        if block_aligned:  # every row starts at index 2C
            return torch.cat([old.to(new.dtype), new, spare], dim=1)
        out = torch.cat([old.to(new.dtype), torch.zeros_like(new), spare], dim=1)
        return out.scatter(1, index.view(batch, length, *([1] * (new.dim() - 2))).expand_as(new), new)

    ext_keys, ext_codes, ext_values, ext_mask = (extend(*pair) for pair in zip(previous, (key, codes, value, key_mask)))
    if initial_state is None:  # nothing in front of the tokens
        out = _blockwise_attention(
            query, key, value, codes, codebook, key_mask, position_bias, chunk_size, False, dropout, training,
            memory=memory,
        )  # fmt: skip
    elif block_aligned:  # the window's older block joins the memory; its newer block goes in front of the tokens
        older_counts, older_sums = code_value_sums(
            initial_state.codes[:, :chunk_size], initial_state.values[:, :chunk_size],
            initial_state.mask[:, :chunk_size], codebook_size,
        )  # fmt: skip
        used = slice(chunk_size, window + length)
        out = _blockwise_attention(
            extend(None, query)[:, used], ext_keys[:, used], ext_values[:, used], ext_codes[:, used], codebook,
            ext_mask[:, used], position_bias, chunk_size, False, dropout, training,
            (memory_counts + older_counts, memory_sums + older_sums), memory,
        )[:, chunk_size:]  # fmt: skip
    else:
        used = slice(0, window + length)
        out = _blockwise_attention(
            extend(None, query)[:, used], ext_keys[:, used], ext_values[:, used], ext_codes[:, used], codebook,
            ext_mask[:, used], position_bias, chunk_size, False, dropout, training, (memory_counts, memory_sums),
            memory,
        )  # fmt: skip
        out = out.gather(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    if not output_final_state:
        return out, None

    # The new window: the blocks of each row's last token and the one before; everything earlier joins the memory.
    last_index = start + lengths - 1  # = start - 1 (the last old token) when a row adds nothing
    first_kept = (last_index // chunk_size - 1) * chunk_size
    before_window = torch.arange(ext_codes.shape[1], device=codes.device)[None, :] < first_kept[:, None]
    counts, sums = code_value_sums(ext_codes, ext_values, ext_mask & before_window, codebook_size)
    kept = first_kept[:, None] + torch.arange(window, device=codes.device)

    def window_of(t):
        return t.gather(1, kept.view(batch, window, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

    final = VQAttentionState(
        keys=window_of(ext_keys), codes=window_of(ext_codes), values=window_of(ext_values), mask=window_of(ext_mask),
        memory_counts=memory_counts + counts, memory_sums=memory_sums + sums, positions=positions + lengths,
    )  # fmt: skip
    return out, final


def _attention_at(queries, positions, key, value, key_mask, position_bias, chunk_size, bidirectional, memory):
    """The dense oracle for the queries (B, R, Z) at sequence positions `positions` (R,) long, against all T keys:
    window and visibility masks from block indices, positional bias inside the window, keys read without gradient
    outside it, padded keys (and with `memory=False` keys outside the window) masked out. Returns (B, R, H)."""
    length, z_dim = key.shape[1], queries.shape[-1]
    key_positions = torch.arange(length)
    offsets = positions[:, None] - key_positions[None, :]  # (R, T): i - j
    block_gap = positions[:, None] // chunk_size - key_positions[None, :] // chunk_size
    if bidirectional:
        in_window = block_gap.abs() <= 1
        visible = torch.ones(len(positions), length, dtype=torch.bool)
    else:
        in_window = (block_gap == 0) | (block_gap == 1)
        visible = offsets >= 0
    near = queries @ key.transpose(-1, -2) / math.sqrt(z_dim) + position_bias(offsets)
    far = queries @ key.detach().transpose(-1, -2) / math.sqrt(z_dim)
    logits = torch.where(in_window, near, far)
    allowed = visible & key_mask[:, None, :]
    if not memory:
        allowed = allowed & in_window
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return weights @ value


def naive_vq_attention(query, key, value, key_mask, position_bias, chunk_size, bidirectional, memory=True):
    """Naive O(T^2) softmax attention over quantized keys, with the positional bias inside the window only
    (`memory=False`: keys outside the window are not seen at all, the MEGA-chunk ablation).

    query (B, T, Z); key (B, T, Z) quantized keys (straight-through to the raw keys); value (B, T, H);
    key_mask (B, T) bool. Blocks of `chunk_size` are counted from index 0; key j is in the window of query i when
    block(i) - block(j) is 0 or 1 (causal, with j <= i) or |block(i) - block(j)| <= 1 (bidirectional).
    Outside the window the key is read without gradient, as the block-wise memory reads the codebook.
    """
    positions = torch.arange(query.shape[1])
    return _attention_at(query, positions, key, value, key_mask, position_bias, chunk_size, bidirectional, memory)


def naive_vq_attention_rows(query, key, value, key_mask, position_bias, chunk_size, bidirectional, rows, memory=True):
    """`naive_vq_attention` for the query positions `rows` only, in O(R T) instead of O(T^2) time and memory, for
    checking very long sequences at sampled positions.

    Same arguments as `naive_vq_attention` plus rows (R,) long. Returns (B, R, H): row r is the attention output at
    position rows[r].
    """
    return _attention_at(query[:, rows], rows, key, value, key_mask, position_bias, chunk_size, bidirectional, memory)


# ---------------------------------------------------------------------------------------------------------------------
# One decoding step
# ---------------------------------------------------------------------------------------------------------------------


EMPTY_LOGIT = torch.finfo(torch.float32).min  # logit offset of an empty slot: exp underflows to exactly 0


def memory_logit_offsets(counts: torch.Tensor) -> torch.Tensor:
    """The logit offsets of memory codes with counts N_s: log N_s, or `EMPTY_LOGIT` for a code no token has used."""
    return torch.where(counts > 0, counts.clamp(min=1).log(), EMPTY_LOGIT)


def vq_attention_step(query, value, codes, codebook, position_bias, chunk_size, state, plan, memory: bool = True):
    """Causal VQ-attention for one new token per row against a decoding state, in O(2C + S) per token, with the same
    work at every step and no host synchronisation (so it can be compiled or captured as a CUDA graph).

    The state's window is a ring of two block halves (`cache_longvq.LongVQLayerState`): the token overwrites the slot
    of the token C positions before its block's previous one, which is first folded into the memory (its code's count
    and running mean; nothing for an empty slot or a padded row). Then the token attends to window + memory with one
    gather, one softmax and one matmul over the state's joint layout: window slots get the positional bias, the ring's
    not yet folded slots (`plan.in_window` False) and the memory codes do not.
    query (B, 1, Z), value (B, 1, H), codes (B, 1); `state` is the decoding state in its joint layout and `plan` the
    step's shared bookkeeping (`cache_longvq.LongVQLayerState`, `LongVQDecodePlan`). Updates `state` in place;
    returns (B, 1, H). `memory=False` attends to the window only.
    """
    rows, write, real = plan.rows, plan.write, plan.real
    window = 2 * chunk_size
    # Fold the slot's previous token into the memory: N_c += 1, M_c += (v - M_c) / N_c, for its code c only.
    leaving_code, leaving_value = state.keys[rows, write], state.values[rows, write]
    leaving = real & (state.logit_offsets[rows, write] >= 0)
    counts = state.memory_counts[rows, leaving_code] + leaving.float()
    memory_slot = window + leaving_code
    mean = state.values[rows, memory_slot]
    folded_mean = mean.float() + (leaving_value.float() - mean.float()) / counts.clamp(min=1)[:, None]
    state.memory_counts[rows, leaving_code] = counts
    state.values[rows, memory_slot] = torch.where(leaving[:, None], folded_mean.to(mean.dtype), mean)
    state.logit_offsets[rows, memory_slot] = memory_logit_offsets(counts)
    # Write the token into the slot; a padded row's slot keeps what it held.
    state.keys[rows, write] = torch.where(real, codes[:, 0], leaving_code)
    state.values[rows, write] = torch.where(real[:, None], value[:, 0].to(state.values.dtype), leaving_value)
    state.logit_offsets[rows, write] = torch.where(real, 0.0, state.logit_offsets[rows, write])

    # logits = q.C_code / sqrt(Z) + [bias(i - j) inside the window | log N_s] (+ the empty-slot offsets), one softmax.
    scores = (query[:, 0] * query.shape[-1] ** -0.5).float() @ codebook.t()  # (B, S), every key is a codeword
    bias = position_bias(plan.offsets).float()
    codes, offsets, values = state.keys, state.logit_offsets, state.values
    if memory:  # the ring's unfolded slots are memory entries: no bias
        bias = F.pad(torch.where(plan.in_window, bias, 0.0), (0, codes.shape[1] - window))
    else:  # the window only
        codes, offsets, values = codes[:, :window], offsets[:, :window], values[:, :window]
        bias = torch.where(plan.in_window, bias, EMPTY_LOGIT)
    logits = scores.gather(1, codes) + (offsets + bias).clamp(min=EMPTY_LOGIT)
    weights = torch.softmax(logits, dim=-1).to(values.dtype)
    return (weights.unsqueeze(1) @ values).to(value.dtype)
