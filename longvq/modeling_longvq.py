# Copyright 2026 The LongVQ Authors. Licensed under the Apache License, Version 2.0.
"""PyTorch LongVQ: MEGA-style blocks with vector-quantized, linear-time exact softmax attention.

Reads top to bottom: small modules (norms, EMA, positional bias, quantizer, VQ-attention) -> the block ->
`LongVQPreTrainedModel` -> `LongVQModel` -> heads. This file is copied into Hub checkpoints as remote code, so it
imports only the standard library, torch, transformers and `.configuration_longvq`.

Shapes: B batch, T length, D hidden_size, H intermediate_size (value width), Z shared_representation_size,
N ema_projection_size, S codebook_size, C chunk_size.
"""

import contextlib
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import logging

from .checkpoint_longvq import check_weight_files
from .configuration_longvq import LongVQConfig

logger = logging.get_logger(__name__)

# The name of the decoding state in forward()/generate() arguments and in model outputs: transformers 5.24 renamed it
# from `past_key_values` to `cache` (outputs keep a deprecated alias). Arguments accept both names; outputs and
# generate()'s model kwargs use the installed version's.
CACHE_NAME = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


def _cache_argument(cache, past_key_values):
    """The decoding state passed under either name (`cache` since transformers 5.24, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the decoding state once, as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Skips the call entirely in eval, where decoding makes thousands of them.
    return F.dropout(x, p, training) if training and p > 0 else x


def _autocast_off(x: torch.Tensor):
    """A context that turns autocast off on x's device: EMA kernels and recurrences and VQ distances must be computed
    in float32 under bf16/fp16 autocast (a matmul there would otherwise run in half precision)."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()  # entering an autocast context costs ~10 us, per layer of every decode step
    return torch.autocast(x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------------


class LongVQScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar, 2019): `g * x / rms(x)` with a single learned scalar `g`."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


class LongVQSequenceNorm(nn.Module):
    """The normalisation chosen by `config.normalization_type`, applied to `(B, T, D)` sequences.

    BatchNorm takes its statistics from non-padded tokens only, so padding never shifts them.
    """

    def __init__(self, config: LongVQConfig, affine: bool = True):
        super().__init__()
        dim, eps, kind = config.hidden_size, config.norm_eps, config.normalization_type
        self.is_batch_norm = kind == "batchnorm"
        if kind == "layernorm":
            self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        elif kind == "rmsnorm":
            self.norm = nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
        elif kind == "scalenorm":
            self.norm = LongVQScaleNorm(eps)
        else:
            self.norm = nn.BatchNorm1d(dim, eps=eps, affine=affine)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); mask: (B, T) bool, True on real tokens."""
        if isinstance(self.norm, nn.LayerNorm):  # the common case, without a second module call
            return F.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        if not self.is_batch_norm:
            return self.norm(x)
        if mask is None:
            return self.norm(x.reshape(-1, x.shape[-1])).view_as(x)
        out = torch.zeros_like(x)
        out[mask] = self.norm(x[mask])
        return out


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


class LongVQMultiDimensionalEma(nn.Module):
    r"""MEGA's multi-dimensional damped EMA with the gated residual `SiLU(EMA(x) + omega * x)`.

    Per channel d and expansion n: `h_t = (p * beta) x_t + (1 - p * delta) h_{t-1}`, `y_t = sum_n eta h_t / sqrt(N)`,
    with `p = sigmoid(damping_logit)`, `delta = sigmoid(decay_logit)`, so every mode decays (stable by construction).
    For whole sequences this is the convolution with `K[t] = sum_n eta p beta q^t / sqrt(N)`, `q = 1 - p delta`,
    computed in float32 by a block scan of matmuls (`scan`), or by FFT for a truncated kernel.

    Bidirectional: a second set of D channels runs over the reversed sequence, and its output is shifted by one
    position (`y_t = fwd_t + bwd_{t+1}`), so the current token is counted once, by the forward direction.
    """

    def __init__(self, config: LongVQConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.bidirectional = config.bidirectional
        self.truncation = config.truncation
        channels = config.hidden_size * (2 if config.bidirectional else 1)
        n = config.ema_projection_size
        self.damping_logit = nn.Parameter(torch.empty(channels, n))
        self.decay_logit = nn.Parameter(torch.empty(channels, n))
        self.expansion = nn.Parameter(torch.empty(channels, n))
        self.projection = nn.Parameter(torch.empty(channels, n))
        self.residual_weight = nn.Parameter(torch.empty(config.hidden_size))

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Input gain `p * beta` and decay `q = 1 - p * delta`, both (channels, N) float32."""

        p = torch.sigmoid(self.damping_logit.float())
        return p * self.expansion.float(), 1.0 - p * torch.sigmoid(self.decay_logit.float())

    def readout(self) -> torch.Tensor:
        """`eta / sqrt(N)` (channels, N) float32."""
        return self.projection.float() / math.sqrt(self.projection.shape[-1])

    def kernel(self, length: int) -> torch.Tensor:
        """Convolution kernel (channels, length) float32."""
        gain, q = self.coefficients()
        return _power_sum(gain * self.readout(), q, 0, length)

    def convolve(self, x: torch.Tensor, initial_state: torch.Tensor | None = None):
        """The raw EMA. x: (B, T, D) with padded positions already zeroed; initial_state: (B, D, N) state before x
        (causal only). Returns (B, T, D) float32 and, for a causal EMA, the state after all T steps (B, D, N) (None
        when bidirectional). A truncated kernel has no recurrence, so it is applied by FFT."""
        length = x.shape[1]
        if self.truncation is not None and self.truncation < length:  # bidirectional only (config validation)
            both = torch.cat([x, x.flip(1)], dim=-1).transpose(1, 2)
            both = fft_causal_convolution(both, self.kernel(self.truncation)).transpose(1, 2)
        elif not self.bidirectional:
            return self.scan(x, initial_state)
        else:
            both, _ = self.scan(torch.cat([x, x.flip(1)], dim=-1))
        forward, backward = both.split(self.hidden_size, dim=-1)
        backward = F.pad(backward.flip(1)[:, 1:], (0, 0, 0, 1))  # bwd_{t+1}, zero after the last token
        return forward + backward, None

    def scan(self, x: torch.Tensor, initial_state: torch.Tensor | None = None):
        """The causal EMA of x (B, T, C) over all C EMA channels (pads zeroed) in blocks of P steps, as matmuls.

        Within a block, each channel applies the (P x P) lower-triangular Toeplitz matrix of the kernel's first P
        taps. Across blocks, the recurrence is carried by the (B, C, N) states between blocks: each block's own end
        state `u_a` is a (P x N) matmul, the states `h_a = q^P h_(a-1) + u_a` (from `h_(-1)` = initial_state) follow
        from an inclusive scan by doubling (log2 of the number of blocks vectorised steps), and a block's outputs
        add `eta q^(p+1) h_(a-1)`. Returns the output (B, T, C) and the state after step T (B, C, N), float32; the
        state is None when T is not a multiple of P (the zero-padded tail would have decayed it).
        """
        gain, q = self.coefficients()
        readout = self.readout()
        batch, length, channels = x.shape
        period = min(_SCAN_PERIOD, length)
        pad = -length % period
        blocks = (length + pad) // period
        x = _Transpose.apply(F.pad(x.float(), (0, 0, 0, pad)).view(-1, channels)).view(channels, batch * blocks, period)
        powers = _powers(q, torch.arange(period + 1, device=x.device))  # (C, N, P + 1): q^0 .. q^P
        taps = torch.linalg.vecdot(powers[..., :period], (gain * readout).unsqueeze(-1), dim=1)  # (C, P): K[0..P-1]
        # (C, P, P) with [r, p] = K[p - r] (zero for p < r): windows of the zero-padded taps, newest first.
        toeplitz = F.pad(taps, (period - 1, 0)).unfold(-1, period, 1).flip(1)
        out = torch.bmm(x, toeplitz)  # (C, BA, P)
        ends = torch.bmm(x, (gain.unsqueeze(-1) * powers[..., :period].flip(-1)).transpose(1, 2))  # (C, BA, N)
        # The initial state enters as a block of its own in front: states[0] = h_(-1), states[a + 1] = h_a.
        if initial_state is None:
            initial_state = ends.new_zeros(batch, channels, q.shape[1])
        first = initial_state.transpose(0, 1)
        states = torch.cat([first.unsqueeze(2), ends.view(channels, batch, blocks, -1)], dim=2)  # (C, B, A + 1, N)
        span, decay = 1, powers[..., period]  # q^(P span)
        while span <= blocks:  # after this step, states[a] sums the blocks (a - 2 span, a]
            states = states + decay.view(channels, 1, 1, -1) * F.pad(states[:, :, :-span], (0, 0, span, 0))
            span, decay = 2 * span, (decay * decay).clamp(min=math.exp(_SMALLEST_LOG_POWER))
        starts = states[:, :, :-1].reshape(channels, batch * blocks, -1)  # the state before each block
        out = torch.baddbmm(out, starts, readout.unsqueeze(-1) * powers[..., 1:])  # + (C, N, P)
        out = _Transpose.apply(out.view(channels, -1)).view(batch, blocks * period, channels)[:, :length]
        return out, (states[:, :, -1].transpose(0, 1) if pad == 0 else None)

    def final_state(self, x: torch.Tensor, lengths: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
        """Recurrent state (B, D, N) float32 after the first `lengths[b]` steps of row b of x (B, T, D), pads zeroed:
        `h = sum_t p beta q^(len-1-t) x_t + q^len h_init`, without materialising a (D, N, T) tensor: with
        `len-1-t = a P + r`, the sum is `sum_a q^(a P) sum_r q^r x`, two batched matmuls over the channels."""
        gain, q = self.coefficients()
        batch, length, channels = x.shape
        # Newest step first, each row starting from its own last step (steps before a row's start are zeros).
        index = (lengths[:, None] - 1 - torch.arange(length, device=x.device)[None, :]) % length
        steps_back = x.float().gather(1, index.unsqueeze(-1).expand_as(x))
        steps_back = steps_back * (torch.arange(length, device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        period = min(_POWER_PERIOD, length)
        periods = -(-length // period)
        steps_back = F.pad(steps_back, (0, 0, 0, periods * period - length))
        steps_back = steps_back.view(batch * periods, period, channels).permute(2, 0, 1).contiguous()  # (D, B A, P)
        within = torch.bmm(steps_back, _powers(q, torch.arange(period, device=x.device)).transpose(1, 2))  # (D, B A, N)
        outer = _powers(q, period * torch.arange(periods, device=x.device)).transpose(1, 2)  # (D, A, N)
        state = (within.view(channels, batch, periods, -1) * outer[:, None]).sum(2).transpose(0, 1)  # (B, D, N)
        state = state * gain
        if initial_state is not None:
            state = state + initial_state * _powers(q, lengths.float()).permute(2, 0, 1)
        return state

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One recurrence step for decoding. x: (B, D); state: (B, D, N) float32. Returns y (B, D) float32 and the
        new state."""
        gain, q = self.coefficients()
        state = torch.addcmul(gain * x.float().unsqueeze(-1), q, state)
        return torch.linalg.vecdot(state, self.readout()), state

    def forward(self, x, mask, state=None, lengths=None, plan=None) -> torch.Tensor:
        """`SiLU(EMA(x) + omega * x)` (B, T, D) for x (B, T, D) with mask (B, T) bool.

        With a `state` (a `LongVQLayerState` or a segment carry) the new EMA state is stored in it: one recurrence
        step when a single-token step `plan` is given, otherwise the convolution continuing `state.ema` (if the state
        has seen tokens) and the state after each row's `lengths[b]` steps (after all T steps when `lengths` is None).
        """
        if plan is not None:
            with _autocast_off(x):
                ema, new_state = self.step(x[:, 0], state.ema)
            state.ema = new_state if plan.all_real else torch.where(plan.real[:, None, None], new_state, state.ema)
            return F.silu(ema.unsqueeze(1).to(x.dtype) + x * self.residual_weight)  # padded rows: output unused
        x = x * mask.unsqueeze(-1).to(x.dtype)
        with _autocast_off(x):
            initial = None if state is None else state.ema  # None before the state's first tokens
            ema, final = self.convolve(x, initial)
            if state is not None and lengths is None and final is not None:
                state.ema = final
            elif state is not None:  # rows that end early (padding) need the state at their own last step
                if lengths is None:
                    lengths = torch.full(x.shape[:1], x.shape[1], device=x.device)
                state.ema = self.final_state(x, lengths, initial)
        return F.silu(ema.to(x.dtype) + x * self.residual_weight)


_SMALLEST_LOG_POWER = -40.0  # q^e is floored at e^-40 ~ 4e-18: products of two such powers stay normal floats


def _powers(q: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """q^e for q (channels, N) and exponents (L,): (channels, N, L), as exp(e log q) in float32.

    Powers that would be below e^-40 are raised to it: an absolute change < 4e-18 per kernel tap, far below float32
    resolution of the outputs, which keeps every power and product of two powers out of the subnormal range where
    CPU arithmetic is tens of times slower.
    """
    return torch.exp((exponents.float()[None, None, :] * torch.log(q)[:, :, None]).clamp(min=_SMALLEST_LOG_POWER))


class _Transpose(torch.autograd.Function):
    """The transpose of a matrix as a contiguous tensor, in forward and backward: PyTorch's 2-D transposing copy is
    several times faster than a permuting copy of the same data, and a contiguous gradient spares `bmm` a copy per
    batch matrix."""

    @staticmethod
    def forward(ctx, x):
        return x.t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.t().contiguous()


_SCAN_PERIOD = 64  # block length P of `LongVQMultiDimensionalEma.scan`
_POWER_PERIOD = 64  # period P of the factorised power sums: (D, N, P) and (D, N, T / P) powers instead of (D, N, T)


def _power_sum(weights: torch.Tensor, q: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """`y[..., c, t] = sum_n weights[..., c, n] q[c, n]^(start + t)` for t < length: (..., channels, length) float32.

    With `t = a P + r`, `q^(start + t) = q^(start + a P) q^r`: one batched matmul over the channels of
    (..., A, N) x (N, P), so no (channels, N, length) tensor of powers is built (nor exponentiated).
    """
    period = min(_POWER_PERIOD, length)
    periods = -(-length // period)
    lead, (channels, n) = weights.shape[:-2], weights.shape[-2:]
    outer = weights.reshape(-1, channels, n, 1) * _powers(q, start + period * torch.arange(periods, device=q.device))
    rows = outer.shape[0]
    outer = outer.permute(1, 0, 3, 2).reshape(channels, rows * periods, n)  # (c, M A, N)
    out = torch.bmm(outer, _powers(q, torch.arange(period, device=q.device)))  # (c, M A, P)
    out = out.view(channels, rows, periods * period)[..., :length].transpose(0, 1)
    return out.reshape(*lead, channels, length)


# ---------------------------------------------------------------------------------------------------------------------
# Relative positional bias inside the attention window
# ---------------------------------------------------------------------------------------------------------------------


def window_offsets(chunk_size: int, bidirectional: bool, device=None) -> torch.Tensor:
    """Offsets `i - j` between query slot i of block n and the window's key slots j (blocks n-1, n[, n+1]).

    Returns (C, W) long with W = 2C (causal) or 3C (bidirectional).
    """
    width = (3 if bidirectional else 2) * chunk_size
    queries = torch.arange(chunk_size, device=device)[:, None] + chunk_size
    return queries - torch.arange(width, device=device)[None, :]


class LongVQRelativePositionalBias(nn.Module):
    """Base class: a learned bias for every offset that can occur inside the window, |i - j| < 2C.

    Subclasses implement `table()`, the bias for offsets `-max_offset .. max_offset` (causal models only use the
    non-negative half, but a shared layout keeps one lookup).
    """

    def __init__(self, config: LongVQConfig):
        super().__init__()
        self.max_offset = 2 * config.chunk_size - 1

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        """offsets: long tensor of any shape; out-of-window offsets are clamped (callers mask them)."""
        index = offsets.clamp(-self.max_offset, self.max_offset) + self.max_offset
        return self.table()[index]


class LongVQSimpleRelativePositionalBias(LongVQRelativePositionalBias):
    """One learned scalar per offset (MEGA `simple`)."""

    def __init__(self, config: LongVQConfig):
        super().__init__(config)
        self.weight = nn.Parameter(torch.empty(2 * self.max_offset + 1))

    def table(self) -> torch.Tensor:
        return self.weight


class LongVQRotaryRelativePositionalBias(LongVQRelativePositionalBias):
    """MEGA's rotary bias: `b(i - j) = rot(a, i) . rot(b, j) = rot(a, i - j) . b` with learned a, b (Z,)."""

    def __init__(self, config: LongVQConfig):
        super().__init__(config)
        self.alpha = nn.Parameter(torch.empty(config.shared_representation_size))
        self.beta = nn.Parameter(torch.empty(config.shared_representation_size))

    def table(self) -> torch.Tensor:
        half = self.alpha.shape[0] // 2
        inv_freq = 10000.0 ** (-torch.arange(half, device=self.alpha.device, dtype=torch.float32) / half)
        offsets = torch.arange(-self.max_offset, self.max_offset + 1, device=self.alpha.device, dtype=torch.float32)
        angles = offsets[:, None] * inv_freq[None, :]
        a1, a2 = self.alpha.float().split(half)
        b1, b2 = self.beta.float().split(half)
        table = angles.cos() @ (a1 * b1 + a2 * b2) + angles.sin() @ (a1 * b2 - a2 * b1)
        return table.to(self.alpha.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Vector quantizer with an EMA k-means codebook
# ---------------------------------------------------------------------------------------------------------------------


class LongVQVectorQuantizer(nn.Module):
    """Nearest-codeword quantizer whose codebook is learned by exponential-moving-average k-means (no gradient).

    The codebook is stored as running sums and counts (Transformer-VQ): `codebook = codebook_sum / codebook_count`, so
    an unused code keeps its vector while both decay. The buffers are persistent (saved with the weights).

    The EMA update is *not* done here: `quantize` returns per-code statistics and `LongVQModel` applies them once per
    training forward (see `LongVQModel._update_codebooks` for why).
    """

    def __init__(self, config: LongVQConfig, layer_idx: int = 0):
        super().__init__()
        self.decay = config.codebook_ema_decay
        self.layer_idx = layer_idx
        codebook_sum, codebook_count = self.initial_buffers(config.codebook_size, config.shared_representation_size)
        self.register_buffer("codebook_sum", codebook_sum)
        self.register_buffer("codebook_count", codebook_count)

    def initial_buffers(self, codebook_size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial codebook as running sums (S, Z) and counts (S,): codewords at unit RMS per dimension, like the
        normalised keys, each counted once. They are drawn from a generator seeded by the layer index, so that
        `__init__` and `_init_weights` (which re-initialises buffers after a meta-device construction) give the same
        buffers, and every layer starts from its own codebook."""
        generator = torch.Generator().manual_seed(self.layer_idx)
        codewords = torch.randn(codebook_size, dim, generator=generator, device="cpu")  # the generator's device
        return codewords.to(torch.get_default_device()), torch.ones(codebook_size)

    def codebook(self) -> torch.Tensor:
        """(S, Z) float32; never modified in place (an EMA update of the buffers yields a new tensor next time)."""
        return self.codebook_sum.float() / self.codebook_count.float().clamp(min=1e-6)[:, None]

    def quantize(self, keys: torch.Tensor, codebook: torch.Tensor):
        """keys: (B, T, Z); codebook: (S, Z) float32.

        Returns codes (B, T) long, quantized keys (B, T, Z) (forward value = codeword, straight-through gradient to
        the keys) and the squared quantization error `||k - sg(C_code)||^2` (B, T) float32 with gradient to the keys.
        """
        keys_f = keys.float()
        shifted_error, codes = self._shifted_distances(keys_f, codebook).min(-1)
        codes = codes.view(keys.shape[:-1])
        squared_error = (keys_f.pow(2).sum(-1) + shifted_error.view(keys.shape[:-1])).clamp(min=0)
        quantized = F.embedding(codes, codebook).to(keys.dtype)
        if keys.requires_grad:
            quantized = quantized + (keys - keys.detach())
        return codes, quantized, squared_error

    def nearest(self, keys: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Codes only (B, T), for decoding steps."""
        return self._shifted_distances(keys.float(), codebook).argmin(-1).view(keys.shape[:-1])

    def _shifted_distances(self, keys: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """(B*T, S) `||k - C_s||^2 - ||k||^2` in float32 (even under autocast); the argmin is the nearest code."""
        codeword_norms = codebook.pow(2).sum(-1)
        with _autocast_off(keys):
            return torch.addmm(codeword_norms, keys.flatten(0, -2), codebook.t(), alpha=-2)

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float, candidates: torch.Tensor):
        """Re-seed every code whose EMA count is below `threshold` with the candidate key of the same index
        (candidates: (S, Z) random keys of the current batch), as if it had just been assigned that one key."""
        dead = self.codebook_count < threshold
        self.codebook_sum.copy_(torch.where(dead[:, None], candidates.to(self.codebook_sum.dtype), self.codebook_sum))
        self.codebook_count.copy_(torch.where(dead, torch.ones_like(self.codebook_count), self.codebook_count))

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor):
        """counts: (S,), sums: (S, Z): this step's per-code token counts and key sums (real tokens only)."""
        self.codebook_count.mul_(self.decay).add_(counts.to(self.codebook_count.dtype), alpha=1 - self.decay)
        self.codebook_sum.mul_(self.decay).add_(sums.to(self.codebook_sum.dtype), alpha=1 - self.decay)


def code_statistics(codes: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, codebook_size: int, with_sums: bool):
    """Per-code count (S,) and, if `with_sums`, key sum (S, Z) (else None) over the real tokens of the whole batch;
    float32, no gradient."""
    if not with_sums:
        return torch.zeros(codebook_size, device=codes.device).index_add_(0, codes.flatten(), mask.flatten().float()), None
    keys = keys.detach().reshape(1, -1, keys.shape[-1])
    counts, sums = _code_value_sums(codes.reshape(1, -1), keys, mask.reshape(1, -1), codebook_size)
    return counts[0], sums[0]


# ---------------------------------------------------------------------------------------------------------------------
# Block-wise VQ-attention (the fast path; its dense O(T^2) oracle lives in tests/)
# ---------------------------------------------------------------------------------------------------------------------


def vq_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    key_mask: torch.Tensor,
    position_bias: nn.Module,
    chunk_size: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
    initial_memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory: bool = True,
) -> torch.Tensor:
    r"""Exact softmax attention over vector-quantized keys in O(T (2C + S) (Z + H)).

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
    batch, length, z_dim = query.shape
    h_dim, s_dim = value.shape[-1], codebook.shape[0]
    num_blocks = -(-length // chunk_size)
    pad = num_blocks * chunk_size - length
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        codes, key_mask = F.pad(codes, (0, pad)), F.pad(key_mask, (0, pad), value=False)
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
        window_logits = torch.baddbmm((bias + key_bias[:, None, :]).to(q.dtype), q, k_window.transpose(1, 2))
        weights = torch.softmax(window_logits.to(softmax_dtype), dim=-1).to(v.dtype)
        if dropout > 0 and training:
            weights = F.dropout(weights, p=dropout)
        out = window_output(*weights.split(chunk_size, dim=-1))
        return out.reshape(batch, num_blocks * chunk_size, h_dim)[:, :length]

    # Memory: every key outside the window, grouped by code. Per-block code counts and value sums are scattered
    # straight into their place in a (B, n + 2, S, ...) grid of block totals (no one-hot); a cumulative sum over
    # blocks then gives, for causal block n, the totals of blocks <= n - 2.
    real = key_mask.reshape(batch, num_blocks, chunk_size)
    grid_rows = torch.arange(num_blocks, device=query.device)[:, None] + 2
    grid_index = (grid_rows * s_dim + codes.view(batch, num_blocks, chunk_size)).view(batch, -1)
    counts = torch.zeros(batch, (num_blocks + 2) * s_dim, device=query.device, dtype=softmax_dtype)
    counts = counts.scatter_add_(1, grid_index, real.view(batch, -1).to(softmax_dtype))
    masked_values = value * key_mask.unsqueeze(-1).to(value.dtype)
    sums = torch.zeros(batch, (num_blocks + 2) * s_dim, h_dim, device=query.device, dtype=softmax_dtype)
    sums = sums.scatter_add_(1, grid_index.unsqueeze(-1).expand(-1, -1, h_dim), masked_values.to(softmax_dtype))
    counts, sums = counts.view(batch, num_blocks + 2, s_dim), sums.view(batch, num_blocks + 2, s_dim, h_dim)
    if bidirectional:  # the whole sequence minus the window blocks n - 1, n, n + 1 (grid rows n + 1 .. n + 3)
        padded_counts, padded_sums = F.pad(counts, (0, 0, 0, 1)), F.pad(sums, (0, 0, 0, 0, 0, 1))
        memory_counts = counts.sum(1, keepdim=True) - sum(padded_counts[:, 1 + i : 1 + i + num_blocks] for i in range(3))
        memory_sums = sums.sum(1, keepdim=True) - sum(padded_sums[:, 1 + i : 1 + i + num_blocks] for i in range(3))
        memory_counts = memory_counts.round()  # exact integers despite the float subtraction
    else:
        memory_counts = _prefix_sums(counts)[:, :num_blocks]
        memory_sums = _prefix_sums(sums)[:, :num_blocks]
        if initial_memory is not None:
            memory_counts = memory_counts + initial_memory[0].unsqueeze(1).to(memory_counts.dtype)
            memory_sums = memory_sums + initial_memory[1].unsqueeze(1).to(memory_sums.dtype)
    memory_counts = memory_counts.reshape(batch * num_blocks, 1, s_dim)
    memory_sums = memory_sums.reshape(batch * num_blocks, s_dim, h_dim).to(v.dtype)
    # Memory logit q.C_s / sqrt(Z) + log N_s (never where N_s = 0); its value M_s = sums_s / N_s enters as w_s / N_s.
    # Window and memory logits come out of one bmm against [window keys | codewords], the additive terms
    # (position bias and causal mask per query slot; key mask and log counts per block) summed into its input.
    log_counts = torch.where(memory_counts > 0, memory_counts.clamp(min=1).log(), never)
    keys = torch.cat([k_window, codebook.to(k_window.dtype).expand(k_window.shape[0], -1, -1)], dim=1)
    per_slot = F.pad(bias, (0, s_dim))  # (C, W + S)
    per_block = torch.cat([key_bias, log_counts.view(-1, s_dim)], dim=-1)  # (Bn, W + S)
    logits = torch.baddbmm((per_slot + per_block[:, None, :]).to(q.dtype), q, keys.transpose(1, 2))
    weights = torch.softmax(logits.to(softmax_dtype), dim=-1).to(v.dtype)
    if dropout > 0 and training:
        weights = F.dropout(weights, p=dropout)
    *window_weights, memory_weights = weights.split([chunk_size] * len(neighbours) + [s_dim], dim=-1)
    memory_weights = memory_weights / memory_counts.clamp(min=1).to(v.dtype)
    out = torch.baddbmm(window_output(*window_weights), memory_weights, memory_sums)
    return out.reshape(batch, num_blocks * chunk_size, h_dim)[:, :length]


def _prefix_sums(grid: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum over dim 1 of (B, n, ...). For the few blocks of a segment a product with a
    triangular matrix of ones is several times faster on CPU than `cumsum` over that strided dim."""
    blocks = grid.shape[1]
    if blocks > 64:
        return grid.cumsum(1)
    ones = torch.ones(blocks, blocks, device=grid.device, dtype=grid.dtype).tril()
    with _autocast_off(grid):  # counts and sums stay float32
        return (ones @ grid.reshape(grid.shape[0], blocks, -1)).view(grid.shape)


def _code_value_sums(codes, values, mask, codebook_size):
    """Per-row count (B, S) and value sum (B, S, H) of the real tokens. codes (B, L), values (B, L, H), mask (B, L)."""
    # Sums in >= float32, like vq_attention's memory statistics (bf16/fp16 values under autocast).
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    weight = mask.to(values.dtype)
    counts = torch.zeros(codes.shape[0], codebook_size, device=codes.device).scatter_add_(1, codes, weight.float())
    sums = torch.zeros(codes.shape[0], codebook_size, values.shape[-1], device=values.device, dtype=values.dtype)
    sums = sums.scatter_add(1, codes.unsqueeze(-1).expand_as(values), values * weight.unsqueeze(-1))
    return counts, sums


def vq_attention_with_state(
    query, key, value, codes, codebook, key_mask, position_bias, chunk_size, state, positions, lengths, fresh,
    memory=True,
):
    """Causal VQ-attention of T new tokens that continue a decoding state, block-parallel (prefill, chunked prefill).

    A state that has seen tokens puts its window (the previous and the current block, 2C slots) in front of the new
    tokens so that each row's new tokens land at their own block phase: row b's first new token has grid position
    `positions[b]` and goes to index `positions[b] - (last_block - 1) C` of the extended sequence, where
    `last_block` is the block of its last seen token; the extended sequence runs through `vq_attention` with the
    state's memory as initial memory. A fresh state runs `vq_attention` on the tokens alone. Either way the new
    window and memory are then read off the sequence, and `state` is updated in place. `memory=False`: window-only
    attention (the memory is still kept, so the state layout does not depend on the flag).

    query/key (B, T, Z), value (B, T, H), codes (B, T), key_mask (B, T); positions, lengths (B,) long; fresh: the
    state has seen no token. Returns (B, T, H).
    """
    batch, length = codes.shape
    window = 2 * chunk_size
    memory_counts, memory_means = state.memory()
    # Counts and sums in >= float32: bf16 holds integers exactly only up to 256.
    memory_sums = memory_means.to(torch.promote_types(memory_means.dtype, torch.float32)) * memory_counts.unsqueeze(-1)

    def extend(old, new, before):
        """[old (before slots) | new at `index` | zeros], with one spare block at the end so that the new window can
        always be read as 2C slots."""
        out = torch.zeros(batch, before + length + chunk_size, *new.shape[2:], device=new.device, dtype=new.dtype)
        if old is not None:
            out[:, :before] = old.to(new.dtype)
        scatter_index = index.view(batch, length, *([1] * (new.dim() - 2))).expand_as(new)
        return out.scatter(1, scatter_index, new)

    if fresh:
        out = vq_attention(
            query, key, value, codes, codebook, key_mask, position_bias, chunk_size, bidirectional=False, memory=memory
        )
        start = torch.full_like(positions, window)  # read the state off [2C empty slots | tokens | spare block]
        index = start[:, None] + torch.arange(length, device=codes.device)
        ext_codes, ext_values, ext_mask = (extend(None, t, window) for t in (codes, value, key_mask))
    else:
        last_block = (positions + chunk_size - 1) // chunk_size - 1  # block of the last seen token
        start = positions - (last_block - 1) * chunk_size  # in (C, 2C]
        index = start[:, None] + torch.arange(length, device=codes.device)  # (B, T) into the extended sequence
        window_codes, window_values, window_mask = state.window()
        ext_codes, ext_values, ext_mask = (
            extend(old, new, window) for old, new in ((window_codes, codes), (window_values, value), (window_mask, key_mask))
        )
        ext_keys = extend(F.embedding(window_codes, codebook), key, window)
        ext_query = extend(None, query, window)
        used = slice(0, window + length)
        out = vq_attention(
            ext_query[:, used], ext_keys[:, used], ext_values[:, used], ext_codes[:, used], codebook,
            ext_mask[:, used], position_bias, chunk_size, bidirectional=False, initial_memory=(memory_counts, memory_sums),
            memory=memory,
        )  # fmt: skip
        out = out.gather(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

    # New window: the blocks of each row's last token and the one before; everything earlier joins the memory.
    last_index = start + lengths - 1  # = start - 1 (the last old token) when a row adds nothing
    first_kept = (last_index // chunk_size - 1) * chunk_size
    before_window = torch.arange(ext_codes.shape[1], device=codes.device)[None, :] < first_kept[:, None]
    counts, sums = _code_value_sums(ext_codes, ext_values, ext_mask & before_window, memory_counts.shape[-1])
    total = memory_counts + counts
    state.set_memory(total, (memory_sums + sums) / total.clamp(min=1).unsqueeze(-1).to(sums.dtype))
    kept = first_kept[:, None] + torch.arange(window, device=codes.device)
    kept_values = ext_values.gather(1, kept.unsqueeze(-1).expand(-1, -1, ext_values.shape[-1]))
    state.set_window(ext_codes.gather(1, kept), kept_values, ext_mask.gather(1, kept))
    return out


@dataclass
class LongVQSegmentCarry:
    """What one layer carries from one piece of a long causal input to the next (`LongVQModel._forward_in_segments`).

    Pieces are whole blocks, so the window of a piece's first block is the previous piece's last block and itself:
    that block is carried whole (its keys keep their straight-through gradient), and every block before it as the
    memory's per-code counts and value sums. Everything keeps its autograd history, so gradients cross pieces.
    """

    ema: torch.Tensor | None = None  # (B, D, N) float32 EMA state
    keys: torch.Tensor | None = None  # (B, C, Z) quantized keys of the last block
    values: torch.Tensor | None = None  # (B, C, H)
    codes: torch.Tensor | None = None  # (B, C) long
    mask: torch.Tensor | None = None  # (B, C) bool
    memory_counts: torch.Tensor | None = None  # (B, S) float32
    memory_sums: torch.Tensor | None = None  # (B, S, H) float32


def vq_attention_carried(query, key, value, codes, codebook, key_mask, position_bias, chunk_size, carry, memory=True):
    """Causal VQ-attention of one piece of a long input (whole blocks, except for the last piece), continuing and
    then updating `carry`: the carried block is put in front of the piece and the carried memory is every block's
    initial memory. Arguments as for `vq_attention`; returns (B, T, H)."""
    initial_memory = None
    if carry.keys is not None:
        query = F.pad(query, (0, 0, chunk_size, 0))  # the carried block's own outputs are not needed
        key, value = torch.cat([carry.keys, key], dim=1), torch.cat([carry.values, value], dim=1)
        codes, key_mask = torch.cat([carry.codes, codes], dim=1), torch.cat([carry.mask, key_mask], dim=1)
        initial_memory = (carry.memory_counts, carry.memory_sums)
    out = vq_attention(
        query, key, value, codes, codebook, key_mask, position_bias, chunk_size, bidirectional=False,
        initial_memory=initial_memory, memory=memory,
    )  # fmt: skip
    if carry.keys is not None:
        out = out[:, chunk_size:]
    # The next piece sees this piece's last block in its window; everything before that block joins the memory.
    folded = key.shape[1] - chunk_size
    counts, sums = _code_value_sums(codes[:, :folded], value[:, :folded], key_mask[:, :folded], codebook.shape[0])
    if carry.memory_counts is not None:
        counts, sums = counts + carry.memory_counts, sums + carry.memory_sums
    carry.keys, carry.values = key[:, folded:], value[:, folded:]
    carry.codes, carry.mask = codes[:, folded:], key_mask[:, folded:]
    carry.memory_counts, carry.memory_sums = counts, sums
    return out


@dataclass
class LongVQDecodePlan:
    """What every layer of one single-token decoding step shares, computed once per step by `LongVQCache.plan`."""

    rows: torch.Tensor  # (B,) 0..B-1
    slot: torch.Tensor  # (B,) position of the new token inside its block
    real: torch.Tensor  # (B,) bool, the new token is not padding
    all_real: bool
    starts_block: torch.Tensor  # (B,) bool, a real token at slot 0: the window moves on by one block
    any_starts_block: bool


def vq_attention_step(
    query, value, codes, codebook, position_bias, chunk_size, state, plan: LongVQDecodePlan, memory: bool = True
):
    """Causal VQ-attention for one new token per row against a decoding state, in O(2C + S) per token.

    When a row's token starts a new block, the oldest block of its window is folded into the memory and the current
    block becomes the previous one; then the token is written into its slot and attends to window + memory with one
    gather, one softmax and one matmul over the state's joint layout (see `LongVQLayerState`).
    query (B, 1, Z), value (B, 1, H), codes (B, 1). Updates `state`; returns (B, 1, H). `memory=False` attends to the
    window slots only.
    """
    if plan.any_starts_block:
        window_codes, window_values, window_mask = state.window()
        old = window_mask[:, :chunk_size] & plan.starts_block[:, None]
        counts, sums = _code_value_sums(window_codes[:, :chunk_size], window_values[:, :chunk_size], old, codebook.shape[0])
        memory_counts, memory_means = state.memory()
        total = memory_counts + counts
        means = (memory_means * memory_counts.unsqueeze(-1) + sums) / total.clamp(min=1).unsqueeze(-1)
        state.set_memory(total, means.to(memory_means.dtype))
        shift = plan.starts_block[:, None]
        shifted_mask = window_mask.roll(-chunk_size, 1)
        shifted_mask[:, chunk_size:] = False
        state.set_window(
            torch.where(shift, window_codes.roll(-chunk_size, 1), window_codes),
            torch.where(shift[..., None], window_values.roll(-chunk_size, 1), window_values),
            torch.where(shift, shifted_mask, window_mask),
        )
    # Write the token into its slot in place (the state owns its tensors); a padded row's slot stays empty.
    rows, write, new_values = plan.rows, chunk_size + plan.slot, value[:, 0].to(state.values.dtype)
    if plan.all_real:
        state.keys[rows, write] = codes[:, 0]
        state.values[rows, write] = new_values
        state.logit_offsets[rows, write] = 0.0
    else:
        real = plan.real
        state.keys[rows, write] = torch.where(real, codes[:, 0], state.keys[rows, write])
        state.values[rows, write] = torch.where(real[:, None], new_values, state.values[rows, write])
        state.logit_offsets[rows, write] = torch.where(real, 0.0, state.logit_offsets[rows, write])

    # logits = q.C_code / sqrt(Z) + [bias(i - j) | log N_s] (+ the empty-slot mask), one softmax over 2C + S.
    scores = (query[:, 0] * query.shape[-1] ** -0.5).float() @ codebook.t()  # (B, S), every key is a codeword
    window = 2 * chunk_size
    # Window slot j of a query in slot s of the current block is at offset C + s - j; memory entries have no bias.
    bias = position_bias(chunk_size + plan.slot[:, None] - torch.arange(window, device=plan.slot.device)).float()
    codes, offsets, values = state.keys, state.logit_offsets, state.values
    if memory:
        bias = F.pad(bias, (0, codes.shape[1] - window))
    else:  # the window slots only
        codes, offsets, values = codes[:, :window], offsets[:, :window], values[:, :window]
    logits = scores.gather(1, codes) + offsets + bias
    weights = torch.softmax(logits, dim=-1).to(values.dtype)
    return (weights.unsqueeze(1) @ values).to(value.dtype)


_EMPTY = torch.finfo(torch.float32).min  # logit offset of an empty slot: exp underflows to exactly 0


# The config fields that fix the shapes of a `LongVQCache`; a cache must agree with the model on all of them.
_CACHE_SHAPE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "ema_projection_size", "codebook_size", "chunk_size",
    "codebook_memory",
)  # fmt: skip

_NO_ROLLBACK = (
    "LongVQCache is a recurrent state: it cannot be cropped or rolled back, so assisted, prompt-lookup and "
    "speculative decoding are not supported."
)


class LongVQLayerState(CacheLayerMixin):
    """One layer's decoding state, a transformers cache layer whose size depends on the batch and the config only,
    never on the number of tokens seen.

    Stored in the joint layout the decode step attends over, 2C window slots followed by S memory entries:
      - keys (B, 2C + S) long: the key of every slot as its code (a quantized key is the codeword it names): the
        previous block's tokens (slots [0, C)), the current block's (slots [C, 2C)), then the memory's codes 0..S-1;
      - values (B, 2C + S, H): the window's values, then the memory's per-code value means;
      - logit_offsets (B, 2C + S) float32: 0 for a filled window slot, log N_s for a memory code with N_s > 0,
        and a huge negative number for empty entries;
      - memory_counts (B, S) float32: per-code token counts N_s of all blocks before the window;
      - ema (B, D, N) float32: the EMA recurrence state (None until the first tokens set it).

    The VQ-attention ops read and write these tensors (`window`, `memory`, `set_window`, `set_memory`); transformers'
    key/value `update` protocol, which returns the whole key/value history, does not apply to a constant-size state.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False  # the shapes come from the config, not from key/value states
    state_names = ("keys", "values", "logit_offsets", "memory_counts", "ema")

    def __init__(self, config):
        super().__init__()
        self.window_size = 2 * config.chunk_size
        self.codebook_size = config.codebook_size
        self.value_size = config.intermediate_size
        self.logit_offsets = self.memory_counts = self.ema = None
        self.device = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """An empty window and memory for the batch, device and dtype of the first tokens' codes (B, T) and values
        (B, T, H); `ema` stays None until the first tokens set it."""
        batch, device = key_states.shape[0], key_states.device
        size = self.window_size + self.codebook_size
        self.keys = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.keys[:, self.window_size :] = torch.arange(self.codebook_size, device=device)
        self.values = torch.zeros(batch, size, self.value_size, device=device, dtype=value_states.dtype)
        self.logit_offsets = torch.full((batch, size), _EMPTY, device=device)
        self.memory_counts = torch.zeros(batch, self.codebook_size, device=device)
        self.device = device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "A LongVQ layer state is updated by the VQ-attention ops, not by `update`: it keeps a constant-size window "
            "and codebook memory, never the key/value history that `update` returns."
        )

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.13, abstract there

    def window(self):
        """codes (B, 2C), values (B, 2C, H), mask (B, 2C) bool."""
        w = self.window_size
        return self.keys[:, :w], self.values[:, :w], self.logit_offsets[:, :w] >= 0

    def memory(self):
        """counts (B, S) float32, value means (B, S, H)."""
        return self.memory_counts, self.values[:, self.window_size :]

    def set_window(self, codes, values, mask):
        w = self.window_size
        self.keys = torch.cat([codes, self.keys[:, w:]], dim=1)
        self.values = torch.cat([values.to(self.values.dtype), self.values[:, w:]], dim=1)
        window_offsets_ = torch.where(mask, 0.0, _EMPTY)
        self.logit_offsets = torch.cat([window_offsets_, self.logit_offsets[:, w:]], dim=1)

    def set_memory(self, counts, means):
        w = self.window_size
        self.memory_counts = counts
        self.values = torch.cat([self.values[:, :w], means.to(self.values.dtype)], dim=1)
        memory_offsets = torch.where(counts > 0, counts.clamp(min=1).log(), _EMPTY)
        self.logit_offsets = torch.cat([self.logit_offsets[:, :w], memory_offsets], dim=1)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.state_names if getattr(self, name) is not None]

    def _map(self, fn):
        for name in self.state_names:
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices.to(t.device)])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self):
        for name in self.state_names:
            setattr(self, name, None)
        self.is_initialized = False
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int):
        raise ValueError(_NO_ROLLBACK)


class LongVQCache(Cache):
    """Constant-size decoding state of a causal LongVQ model, returned as the model output's cache.

    Holds one `LongVQLayerState` per layer plus, per row, the block-grid position of the next token (`positions`,
    counted over the row's real tokens only, so padding anywhere is invisible). `get_seq_length()` is the number of
    input columns consumed (padding included), which is what `generate()` slices inputs by.

    The state cannot roll back: `crop` raises, and strategies that need it (assisted / prompt-lookup decoding)
    are refused by `generate()`.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config=None, **kwargs):
        if config is None:
            raise TypeError("LongVQCache(config): pass the model's LongVQConfig.")
        super().__init__(layers=[LongVQLayerState(config) for _ in range(config.num_hidden_layers)])
        self.config = config
        self.positions = None

    @property
    def is_initialized(self) -> bool:
        return self.positions is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.positions is None else self.positions.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (constant in the number of tokens seen)."""
        tensors = [t for layer in self.layers for t in layer.tensors()]
        if self.positions is not None:
            tensors.append(self.positions)
        return sum(t.numel() * t.element_size() for t in tensors)

    def initialize(self, batch_size: int, device):
        """Start the per-row block positions; each layer initialises its own tensors on its own device."""
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)

    def plan(self, mask: torch.Tensor) -> LongVQDecodePlan:
        """The shared bookkeeping of a single-token decoding step; mask: (B,) bool, True for a real token."""
        slot = self.positions.to(mask.device) % self.config.chunk_size
        starts_block = mask & (slot == 0)
        return LongVQDecodePlan(
            rows=torch.arange(mask.shape[0], device=mask.device), slot=slot, real=mask, all_real=bool(mask.all()),
            starts_block=starts_block, any_starts_block=bool(starts_block.any()),
        )  # fmt: skip

    def advance(self, lengths: torch.Tensor, columns: int):
        """Record that row b moved `lengths[b]` block positions (its real tokens) and the input had `columns`
        columns."""
        self.positions = self.positions + lengths.to(self.positions.device)
        for layer in self.layers:
            layer.seen_tokens += columns

    def reset(self):
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int):
        raise ValueError(_NO_ROLLBACK)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices.to(self.positions.device)]


# ---------------------------------------------------------------------------------------------------------------------
# The LongVQ block
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LongVQLayerStatistics:
    """What a layer reports besides its hidden states (all without gradient except `squared_error_sum`)."""

    squared_error_sum: torch.Tensor  # () sum over real tokens of ||k - sg(C_code)||^2
    code_counts: torch.Tensor  # (S,) tokens per code
    code_key_sums: torch.Tensor | None  # (S, Z) sum of the keys assigned to each code (training only)
    restart_keys: torch.Tensor | None  # (S, Z) random real keys to re-seed dead codes (training with restarts only)


class LongVQGatedAttention(nn.Module):
    """EMA + gated single-head VQ-attention (MEGA's moving-average gated attention with VQ keys).

    `x' = SiLU(EMA(x) + w x)`; `[u|z|r|h] = x' W_m`; `q, k = z-affines`; `k` normalised then quantized;
    `o = VQAttention(q, k_hat, v)`; `y = x + sigmoid(u) * (SiLU(h + (o * SiLU(r)) W_h) - x)`.
    """

    def __init__(self, config: LongVQConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        # Plain attributes: config attribute access is slow, and decoding runs this forward once per token.
        self.chunk_size, self.bidirectional, self.normalize_before = (
            config.chunk_size, config.bidirectional, config.normalize_before,
        )  # fmt: skip
        self.dropout, self.hidden_dropout, self.attention_dropout = (
            config.dropout, config.hidden_dropout, config.attention_dropout,
        )  # fmt: skip
        self.norm_eps, self.codebook_size, self.codebook_memory = config.norm_eps, config.codebook_size, config.codebook_memory
        d, h, z = config.hidden_size, config.intermediate_size, config.shared_representation_size
        self.split_sizes = (d, z, h, d)
        self.norm = LongVQSequenceNorm(config)
        self.value_proj = nn.Linear(d, h)
        self.ema = LongVQMultiDimensionalEma(config)
        self.mix_proj = nn.Linear(d, sum(self.split_sizes))
        self.query_key_scale = nn.Parameter(torch.empty(2, z))
        self.query_key_offset = nn.Parameter(torch.empty(2, z))
        self.quantizer = LongVQVectorQuantizer(config, layer_idx)
        bias_class = {
            "simple": LongVQSimpleRelativePositionalBias,
            "rotary": LongVQRotaryRelativePositionalBias,
        }[config.relative_positional_bias]
        self.position_bias = bias_class(config)
        self.out_proj = nn.Linear(h, d)

    def forward(self, hidden_states, mask, codebook, cache=None, lengths=None, plan=None, carry=None):
        """hidden_states: (B, T, D); mask: (B, T) bool; codebook: (S, Z).

        With `cache` (a `LongVQCache`) this layer continues its decoding state and updates it: block-
        parallel for several new tokens, where `lengths` (B,) are the block positions each row advances (its real
        tokens, which the model has moved in front of the padding), or one step with the shared `plan` of a single-token step. With `carry` (a
        `LongVQSegmentCarry`) the input is one piece of a long causal input, continuing and updating the carry.
        Returns (B, T, D) and the layer statistics (None for a single-token step in eval mode, where they would only
        cost time).
        """
        residual = hidden_states
        x = self.norm(hidden_states, mask) if self.normalize_before else hidden_states
        value = _dropout(F.silu(self.value_proj(x)), self.hidden_dropout, self.training)
        state = None
        if cache is not None:
            state = cache.layers[self.layer_idx]
            fresh = state.ema is None  # read before the EMA below sets it
        if carry is not None:  # every row runs through the whole piece (padding only trails: nothing real follows)
            state = carry
        mixed = _dropout(self.ema(x, mask, state, lengths, plan), self.dropout, self.training)
        update, shared, reset, hidden = self.mix_proj(mixed).split(self.split_sizes, dim=-1)
        shared = F.silu(shared)
        query, key = torch.addcmul(self.query_key_offset, shared.unsqueeze(-2), self.query_key_scale).unbind(-2)
        # Keys are centred and scaled to the sphere of radius sqrt(Z), where the codewords live (uncentred keys of
        # the positive SiLU features crowd into one cap and collapse the codebook); the query keeps its scale, which
        # acts as the attention temperature.
        key = F.layer_norm(key, (key.shape[-1],), eps=self.norm_eps)
        statistics_needed = plan is None or self.training
        if statistics_needed:
            codes, key_quantized, squared_error = self.quantizer.quantize(key, codebook)
        else:
            codes = self.quantizer.nearest(key, codebook)
        if cache is not None and not state.is_initialized:  # created here, on this layer's device
            state.lazy_initialization(codes, value)
        if carry is not None:
            attention = vq_attention_carried(
                query, key_quantized, value, codes, codebook, mask, self.position_bias, self.chunk_size, carry,
                self.codebook_memory,
            )  # fmt: skip
        elif state is None:
            attention = vq_attention(
                query, key_quantized, value, codes, codebook, mask, self.position_bias, self.chunk_size,
                bidirectional=self.bidirectional, dropout=self.attention_dropout, training=self.training,
                memory=self.codebook_memory,
            )  # fmt: skip
        elif plan is not None:
            attention = vq_attention_step(
                query, value, codes, codebook, self.position_bias, self.chunk_size, state, plan, self.codebook_memory
            )
        else:
            attention = vq_attention_with_state(
                query, key_quantized, value, codes, codebook, mask, self.position_bias, self.chunk_size, state,
                cache.positions.to(x.device), lengths.to(x.device), fresh, self.codebook_memory,
            )  # fmt: skip
        gated = _dropout(F.silu(hidden + self.out_proj(attention * F.silu(reset))), self.dropout, self.training)
        # residual + sigmoid(u) (gated - residual), fused; the residual stream keeps its dtype under autocast
        out = torch.lerp(residual, gated.to(residual.dtype), torch.sigmoid(update).to(residual.dtype))
        if not self.normalize_before:
            out = self.norm(out, mask)
        if not statistics_needed:
            return out, None
        # Key sums feed the codebook update only, so eval forwards skip them.
        counts, sums = code_statistics(codes, key, mask, self.codebook_size, with_sums=self.training)
        restart_keys = None
        if self.training and self.config.codebook_restart_threshold > 0:  # zeros when the batch has no real token
            real_keys = key.detach().float()[mask]
            picks = torch.randint(max(real_keys.shape[0], 1), (self.codebook_size,), device=key.device)
            restart_keys = real_keys[picks] if real_keys.shape[0] else key.new_zeros(self.codebook_size, key.shape[-1]).float()
        return out, LongVQLayerStatistics((squared_error * mask).sum(), counts, sums, restart_keys)


class LongVQNormalizedFeedForward(nn.Module):
    """MEGA's normalized FFN: `y = x + W_2 SiLU(W_1 Norm(x))` (pre-norm) or `Norm(x + ...)` (post-norm)."""

    def __init__(self, config: LongVQConfig):
        super().__init__()
        self.normalize_before = config.normalize_before
        width = config.ffn_hidden_size or config.intermediate_size
        self.norm = LongVQSequenceNorm(config)
        self.fc1 = nn.Linear(config.hidden_size, width)
        self.fc2 = nn.Linear(width, config.hidden_size)
        self.hidden_dropout, self.dropout = config.hidden_dropout, config.dropout

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden_states, mask) if self.normalize_before else hidden_states
        hidden = _dropout(F.silu(self.fc1(x)), self.hidden_dropout, self.training)
        out = hidden_states + _dropout(self.fc2(hidden), self.dropout, self.training)
        return out if self.normalize_before else self.norm(out, mask)


class LongVQBlock(GradientCheckpointingLayer):
    """One LongVQ layer: gated VQ-attention followed by the normalized FFN."""

    def __init__(self, config: LongVQConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = LongVQGatedAttention(config, layer_idx)
        self.feed_forward = LongVQNormalizedFeedForward(config)

    def forward(self, hidden_states, mask, codebook, cache=None, lengths=None, plan=None, carry=None):
        """Returns hidden states (B, T, D), the summed squared quantization error (), code counts (S,), key sums
        (S, Z) and restart keys (S, Z) as a flat tuple (gradient checkpointing handles tensors only); the statistics
        are None for an eval decoding step, the key sums outside training, the restart keys unless restarts are on."""
        hidden_states, stats = self.attention(hidden_states, mask, codebook, cache, lengths, plan, carry)
        hidden_states = self.feed_forward(hidden_states, mask)
        if stats is None:
            return hidden_states, None, None, None, None
        return hidden_states, stats.squared_error_sum, stats.code_counts, stats.code_key_sums, stats.restart_keys


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LongVQOutputFields:
    r"""
    The VQ fields every LongVQ output adds to its transformers counterpart (listed first among the bases, so they
    come after the standard fields and `to_tuple()` keeps the standard order):

    commitment_loss (`torch.FloatTensor` of shape `()`):
        Unweighted commitment loss `sum_layers mean_{real tokens} ||k - sg(C_code)||^2`.
    codebook_usage (`torch.FloatTensor` of shape `(num_hidden_layers,)`):
        Fraction of each layer's codes used by the real tokens of this batch.
    codebook_perplexity (`torch.FloatTensor` of shape `(num_hidden_layers,)`):
        `exp(entropy)` of each layer's code distribution over this batch (S when all codes are equally used).

    The three are None for single-token decoding steps in eval mode (one token says nothing about usage).
    """

    commitment_loss: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None


@dataclass
class LongVQModelOutput(LongVQOutputFields, BaseModelOutputWithPast):
    r"""`BaseModelOutputWithPast` plus the VQ fields; the cache field is a `LongVQCache`."""


@dataclass
class LongVQCausalLMOutput(LongVQOutputFields, CausalLMOutputWithPast):
    r"""`CausalLMOutputWithPast` plus the VQ fields; `loss` includes the weighted commitment loss."""


@dataclass
class LongVQSequenceClassifierOutput(LongVQOutputFields, SequenceClassifierOutputWithPast):
    r"""`SequenceClassifierOutputWithPast` plus the VQ fields; `loss` includes the weighted commitment loss."""


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained model base
# ---------------------------------------------------------------------------------------------------------------------

class LongVQPreTrainedModel(PreTrainedModel):
    """Base class of the LongVQ models.

    Every concrete LongVQ class is registered for its Auto class (`_auto_class`, as `register_for_auto_class` does),
    so `save_pretrained`, `push_to_hub` and `Trainer` checkpoints copy `configuration_longvq.py` and
    `modeling_longvq.py` next to the weights, and `config.json` carries an `auto_map` for every head: the checkpoint
    loads with the package installed (`import longvq`) and, without it, with `trust_remote_code=True`.
    """

    config_class = LongVQConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LongVQBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # the decoding state's name before / since 5.24
    _is_stateful = True
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    model_tags = ["longvq"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, nn.Embedding):
            # N(0, D^-1/2): unit-norm token vectors, which with tied embeddings also gives O(1) logits.
            init.normal_(module.weight, mean=0.0, std=config.hidden_size**-0.5)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, LongVQScaleNorm):
            init.ones_(module.scale)
        elif isinstance(module, LongVQMultiDimensionalEma):
            init.normal_(module.damping_logit, mean=0.0, std=0.2)
            init.normal_(module.decay_logit, mean=0.0, std=0.2)
            # beta ~ N(0, 0.02) around an alternating +1/-1 pattern (MEGA), so modes start with both signs.
            signs = torch.ones(module.expansion.shape[-1])
            signs[1::2] = -1.0
            init.copy_(module.expansion, signs.expand_as(module.expansion) + 0.02 * torch.randn_like(module.expansion))
            init.normal_(module.projection, mean=0.0, std=1.0)
            init.normal_(module.residual_weight, mean=0.0, std=1.0)
        elif isinstance(module, LongVQSimpleRelativePositionalBias):
            init.zeros_(module.weight)
        elif isinstance(module, LongVQRotaryRelativePositionalBias):
            init.normal_(module.alpha, mean=0.0, std=config.initializer_range)
            init.normal_(module.beta, mean=0.0, std=config.initializer_range)
        elif isinstance(module, LongVQVectorQuantizer):
            codebook_sum, codebook_count = module.initial_buffers(*module.codebook_sum.shape)
            init.copy_(module.codebook_sum, codebook_sum)
            init.copy_(module.codebook_count, codebook_count)
        elif isinstance(module, LongVQGatedAttention):
            # q/k start as identity affines of SiLU(z) (a zero scale would give uniform attention for many steps).
            init.normal_(module.query_key_scale, mean=1.0, std=config.initializer_range)
            init.zeros_(module.query_key_offset)
            # Gates start open: sigmoid(1) ~ 0.73 of the new value passes the update gate, SiLU(1) ~ 0.73 the reset.
            d, z, h, _ = module.split_sizes
            bias = torch.zeros_like(module.mix_proj.bias)
            bias[:d] = 1.0
            bias[d + z : d + z + h] = 1.0
            init.copy_(module.mix_proj.bias, bias)

    @property
    def uses_activation_checkpointing(self) -> bool:
        """Whether activation checkpointing is on (`is_activation_checkpointing` since transformers 5.23, when it was
        renamed from `is_gradient_checkpointing`)."""
        on = getattr(self, "is_activation_checkpointing", None)
        return self.is_gradient_checkpointing if on is None else on

    def freeze_codebooks(self, frozen: bool = True):
        """Stop (or, with `frozen=False`, resume) the EMA codebook updates of training-mode forwards, e.g. for LoRA
        fine-tuning, where an adapter file cannot carry a codebook that moved. Not saved with the model."""
        for module in self.modules():
            if hasattr(module, "codebook_updates"):
                module.codebook_updates = not frozen
        return self

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoding state is a LongVQ-specific recurrent state, never a key/value DynamicCache.
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""`PreTrainedModel.from_pretrained`, reading weights only from safetensors: a checkpoint with only pickled
        (`pytorch_model.bin`) or GGUF weights, `use_safetensors=False` and `gguf_file` are refused, and a truncated
        file or a corrupt header raises ValueError naming the file (`checkpoint_longvq.check_weight_files`).
        Everything else is transformers' behaviour: missing tensors are initialised and unexpected ones ignored, with
        a warning; a tensor whose shape differs from the model's raises RuntimeError unless
        `ignore_mismatched_sizes=True` re-initialises it."""
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            check_weight_files(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **{**kwargs, "use_safetensors": True})

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, safetensors only (what `from_pretrained` reads)."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("LongVQ saves weights only as safetensors; `safe_serialization=False` is not supported.")
        return super().save_pretrained(save_directory, *args, **kwargs)


def _validate_inputs(config, input_ids, inputs_embeds, attention_mask):
    """Raise a clear error for malformed public inputs; returns `inputs_embeds` with a feature axis if it lacked one.

    Types and shapes are always checked. Value checks (ids in range, finite embeddings, a 0/1 mask) synchronise with
    the host and branch on data, so they run in eager mode only, not inside `torch.compile` / `torch.export`."""
    checking_values = not torch.compiler.is_compiling()
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"`input_ids` must be a torch.Tensor, got {type(input_ids).__name__}.")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"`input_ids` must be an integer tensor, got dtype {input_ids.dtype}.")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
        low, high = torch.aminmax(input_ids) if checking_values and input_ids.numel() else (0, 0)
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"`input_ids` must be in [0, vocab_size={config.vocab_size}), got values in [{int(low)}, {int(high)}]."
            )
        batch, length = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError("`inputs_embeds` must be a floating-point torch.Tensor.")
        width = config.input_dim or config.hidden_size
        if inputs_embeds.dim() == 2 and config.input_dim == 1:
            inputs_embeds = inputs_embeds.unsqueeze(-1)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, length, {width}) "
                f"({'input_dim' if config.input_dim else 'hidden_size'}), got {tuple(inputs_embeds.shape)}."
            )
        if checking_values and not torch.isfinite(inputs_embeds).all():
            raise ValueError("`inputs_embeds` contains NaN or infinite values.")
        batch, length = inputs_embeds.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"Empty input: got batch size {batch} and length {length}.")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}.")
        if attention_mask.shape != (batch, length):
            raise ValueError(
                f"`attention_mask` must have shape (batch, length) = {(batch, length)}, got {tuple(attention_mask.shape)}."
            )
        if attention_mask.is_complex():
            raise ValueError("`attention_mask` must contain only 0 (padding) and 1 (real token).")
        if checking_values and not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("`attention_mask` must contain only 0 (padding) and 1 (real token).")
    return inputs_embeds


# ---------------------------------------------------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------------------------------------------------


class LongVQModel(LongVQPreTrainedModel):
    """The LongVQ stack: token embedding (or a linear encoder of continuous inputs) -> blocks -> final norm."""

    _auto_class = "AutoModel"  # see `LongVQPreTrainedModel`: saved checkpoints carry this file as remote code

    def __init__(self, config: LongVQConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.input_projection = nn.Linear(config.input_dim, config.hidden_size) if config.input_dim else None
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(LongVQBlock(config, i) for i in range(config.num_hidden_layers))
        # Pre-norm stacks end with a norm; post-norm blocks already end normalised.
        self.norm = LongVQSequenceNorm(config) if config.normalize_before else None
        self.codebook_updates = True  # see `LongVQPreTrainedModel.freeze_codebooks`
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: LongVQCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: LongVQCache | None = None,
        **kwargs,
    ) -> LongVQModelOutput | tuple:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, length)`): token ids in `[0, vocab_size)`.
        attention_mask (`torch.Tensor` of shape `(batch, length)` or `(batch, past + length)`, *optional*): 1 for real
            tokens, 0 for padding (with a cache, the mask may cover the whole history as `generate()` passes it).
            Padding may be anywhere: each row computes exactly what its real tokens compute alone (for causal models,
            blocks are counted over the real tokens only).
        inputs_embeds (`torch.FloatTensor` of shape `(batch, length, hidden_size)`, or `(batch, length, input_dim)`
            when `config.input_dim` is set): continuous inputs instead of token ids.
        cache / past_key_values (`LongVQCache`, *optional*): decoding state to continue (causal models only), under
            either name (transformers 5.24 renamed `past_key_values` to `cache`); updated in place and returned in
            the output field of the installed transformers version. An empty `Cache` of another type is replaced by
            a `LongVQCache`.
        use_cache (`bool`, *optional*): return the decoding state; defaults to `config.use_cache` in eval mode.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = self._prepare_cache(_cache_argument(cache, past_key_values), use_cache)
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and past_length and attention_mask.dim() == 2:
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if attention_mask.shape[1] == past_length + length:  # generate() passes the mask of the whole history
                attention_mask = attention_mask[:, -length:]
        inputs_embeds = _validate_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        if input_ids is not None:
            hidden_states = self.embed_tokens(input_ids)
        elif self.input_projection is not None:
            hidden_states = self.input_projection(inputs_embeds)
        else:
            hidden_states = inputs_embeds
        hidden_states = self.embed_dropout(hidden_states)
        batch, length = hidden_states.shape[:2]
        if attention_mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
        else:
            mask = attention_mask.to(device=hidden_states.device).bool()

        # Move padding out of the way: each row's real tokens, in order, go in front of its padding. Blocks are then
        # counted over the real tokens only, and the padding trails where no real token sees it.
        compacted = length > 1 and attention_mask is not None and (torch.compiler.is_compiling() or not bool(mask.all()))
        if compacted:
            order, inverse = _real_tokens_first(mask)
            hidden_states, mask = _gather_rows(hidden_states, order), mask.gather(1, order)
        lengths = plan = None
        if cache is not None:
            if cache.batch_size not in (-1, batch):
                raise ValueError(f"The cache holds {cache.batch_size} rows but the input has {batch}.")
            if not cache.is_initialized:
                cache.initialize(batch, hidden_states.device)
            lengths = mask.sum(-1)  # each row's real tokens
            if length == 1 and past_length > 0:  # a decoding step: O(1) recurrence in every layer
                plan = cache.plan(mask[:, 0])

        # The codebooks are read here, outside the (possibly checkpointed) layers: a recompute in backward sees the
        # same codewords as the forward, although the EMA update below has been applied in between.
        codebooks = [layer.attention.quantizer.codebook() for layer in self.layers]
        segment = self._segment_length(length, cache)
        if segment:
            hidden_states, (squared_errors, counts, sums, restart_keys), all_hidden_states = self._forward_in_segments(
                hidden_states, mask, codebooks, segment, output_hidden_states
            )
        else:
            hidden_states, (squared_errors, counts, sums, restart_keys), all_hidden_states = self._run_layers(
                hidden_states, mask, codebooks, cache, lengths, plan, output_hidden_states
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states, mask)
            if output_hidden_states:
                all_hidden_states[-1] = hidden_states
        if cache is not None:
            cache.advance(lengths, length)

        vq_fields = {}
        if counts[0] is not None:
            counts = torch.stack(counts)  # (L, S)
            if self.training and self.codebook_updates:
                self._update_codebooks(counts, torch.stack(sums), restart_keys)
            probabilities = counts / counts.sum(-1, keepdim=True).clamp(min=1)
            entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(-1)
            vq_fields = dict(
                commitment_loss=torch.stack(squared_errors).sum() / mask.sum().clamp(min=1),
                codebook_usage=(counts > 0).float().mean(-1),
                codebook_perplexity=entropy.exp(),
            )

        if compacted:
            hidden_states = _gather_rows(hidden_states, inverse)
            if output_hidden_states:
                all_hidden_states = [_gather_rows(h, inverse) for h in all_hidden_states]
        output = LongVQModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **{CACHE_NAME: cache},
            **vq_fields,
        )
        return output if return_dict else output.to_tuple()

    def _run_layers(self, hidden_states, mask, codebooks, cache, lengths, plan, output_hidden_states):
        """Every block over one input. Returns the hidden states (B, T, D), the per-layer statistics as four lists
        (summed squared quantization errors, code counts, key sums, restart keys; see `LongVQBlock`) and the hidden
        states before and after each block (None unless `output_hidden_states`)."""
        all_hidden_states = [hidden_states] if output_hidden_states else None
        statistics = ([], [], [], [])
        for layer, codebook in zip(self.layers, codebooks):
            hidden_states, *layer_statistics = layer(
                hidden_states, mask, codebook=codebook, cache=cache, lengths=lengths, plan=plan
            )
            for collected, value in zip(statistics, layer_statistics):
                collected.append(value)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        return hidden_states, statistics, all_hidden_states

    def _segment_length(self, length: int, cache) -> int | None:
        """Piece length for `_forward_in_segments` (a multiple of chunk_size), or None to run the input whole."""
        if self.config.segment_length is None or self.config.bidirectional or cache is not None:
            return None
        chunk_size = self.config.chunk_size
        segment = max(self.config.segment_length // chunk_size, 1) * chunk_size
        return segment if length > segment else None

    def _forward_in_segments(self, hidden_states, mask, codebooks, segment, output_hidden_states):
        """A causal forward without a cache, of an input longer than `segment`, as consecutive pieces of `segment`
        tokens through every layer: each layer carries its EMA state, last block and memory from one piece to the
        next (`LongVQSegmentCarry`), so the result equals the whole-input forward to float rounding while no
        tensor grows with the input length (tens of MiB tensors cost fresh pages from the OS at every step). With
        gradient checkpointing on, each (piece, layer) is one checkpoint: training keeps the carries and the layer
        inputs, and recomputes one piece of one layer at a time, so its memory stops growing with the length.
        Returns what `_run_layers` returns, over the whole input."""
        carries = [LongVQSegmentCarry() for _ in self.layers]
        checkpointing = self.training and self.uses_activation_checkpointing
        outputs, hidden_per_piece = [], []
        statistics = [([], [], [], []) for _ in self.layers]  # per layer, per piece
        for start in range(0, mask.shape[1], segment):
            piece, piece_mask = hidden_states[:, start : start + segment], mask[:, start : start + segment]
            piece_hidden = [piece] if output_hidden_states else None
            for index, (layer, codebook) in enumerate(zip(self.layers, codebooks)):
                arguments = (layer, piece, piece_mask, codebook, carries[index])
                if checkpointing:
                    result = checkpoint(self._run_layer_on_piece, *arguments, use_reentrant=False)
                else:
                    result = self._run_layer_on_piece(*arguments)
                piece, *layer_statistics, carries[index] = result
                for collected, value in zip(statistics[index], layer_statistics):
                    collected.append(value)
                if output_hidden_states:
                    piece_hidden.append(piece)
            outputs.append(piece)
            hidden_per_piece.append(piece_hidden)
        squared_errors, counts, sums, restart_keys = ([], [], [], [])
        for errors, layer_counts, layer_sums, layer_restart_keys in statistics:
            squared_errors.append(torch.stack(errors).sum(0))
            counts.append(torch.stack(layer_counts).sum(0))
            sums.append(None if layer_sums[0] is None else torch.stack(layer_sums).sum(0))
            restart_keys.append(_pick_per_code(layer_restart_keys))
        all_hidden_states = None
        if output_hidden_states:
            all_hidden_states = [torch.cat(per_piece, dim=1) for per_piece in zip(*hidden_per_piece)]
        return torch.cat(outputs, dim=1), (squared_errors, counts, sums, restart_keys), all_hidden_states

    @staticmethod
    def _run_layer_on_piece(layer, hidden_states, mask, codebook, carry):
        """One layer over one piece, continuing `carry` without modifying it (a checkpoint recompute replays this
        from the same carry): returns the layer's outputs and the carry after the piece."""
        carry = replace(carry)
        enabled = layer.gradient_checkpointing
        layer.gradient_checkpointing = False  # the (piece, layer) call is the checkpoint; the layer's own would
        try:  # replay it with a carry already advanced
            outputs = layer(hidden_states, mask, codebook=codebook, carry=carry)
        finally:
            layer.gradient_checkpointing = enabled
        return (*outputs, carry)

    def _prepare_cache(self, cache, use_cache):
        """The `LongVQCache` to continue (or a new one), or None when no state is wanted."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        use_cache = use_cache or cache is not None
        if not use_cache:
            return None
        if self.config.bidirectional:
            if cache is not None:
                raise ValueError(f"A bidirectional LongVQ model has no decoding state: do not pass `{CACHE_NAME}`.")
            return None  # the default use_cache=True simply does not apply to encoders
        if self.training and self.uses_activation_checkpointing:
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing; not returning a cache.")
            return None
        if cache is None:
            return LongVQCache(self.config)
        if isinstance(cache, Cache) and type(cache).__name__ == "LongVQCache":
            # A state built for another architecture would fail deep inside a layer (or silently skip layers).
            theirs = getattr(cache, "config", None)
            for name in _CACHE_SHAPE_FIELDS:
                if getattr(theirs, name, None) != getattr(self.config, name):
                    raise ValueError(
                        f"`{CACHE_NAME}` was built for a different LongVQ configuration: its {name} is "
                        f"{getattr(theirs, name, None)}, this model's is {getattr(self.config, name)}."
                    )
            return cache
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            return LongVQCache(self.config)  # an empty foreign cache (e.g. DynamicCache()) carries nothing to keep
        raise TypeError(
            f"`{CACHE_NAME}` must be a LongVQCache (got {type(cache).__name__}); LongVQ's decoding state is recurrent "
            "and cannot be built from key/value caches."
        )

    @torch.no_grad()
    def _update_codebooks(self, counts: torch.Tensor, sums: torch.Tensor, restart_keys: list):
        """Apply one EMA k-means step to every layer's codebook. counts: (L, S); sums: (L, S, Z); restart_keys: per
        layer None or (S, Z) random keys of this batch, used to re-seed dead codes.

        Design: layers only *report* per-code statistics; this method, called once at the end of each training
        forward of `LongVQModel` (never inside a layer), applies them. Hence
          - gradient checkpointing cannot update twice: the recompute in backward runs the layers, not this method,
            and it reads the codebook tensor captured before the update, so its codes match the forward's;
          - gradient accumulation gets one update per micro-batch forward, like any other forward;
          - eval mode never updates;
          - with torch.distributed initialised, the statistics are summed over all processes first, so every replica
            applies the same update and the codebooks stay identical (a step counts the tokens of the global batch);
            restart keys come from process 0's batch, broadcast to all.
        Restarts happen between forwards, so within a forward the block-wise attention still equals the dense oracle.
        """
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            flat = torch.cat([counts.unsqueeze(-1), sums], dim=-1)
            dist.all_reduce(flat)
            counts, sums = flat[..., 0], flat[..., 1:]
        for layer, layer_counts, layer_sums in zip(self.layers, counts, sums):
            layer.attention.quantizer.ema_update(layer_counts, layer_sums)
        if restart_keys[0] is None or counts.sum() == 0:
            return  # restarts are off, or no process saw a real token
        candidates = torch.stack(restart_keys)
        if distributed:
            dist.broadcast(candidates, src=0)
        for layer, layer_candidates in zip(self.layers, candidates):
            layer.attention.quantizer.restart_dead_codes(self.config.codebook_restart_threshold, layer_candidates)


def _check_label_ids(labels: torch.Tensor, size: int, name: str):
    """Class/token ids must lie in [0, size) or be -100 (ignored); cross-entropy would otherwise fail with an index
    error on CPU and a device-side assert on GPU."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer tensor of ids, got dtype {labels.dtype}.")
    if torch.compiler.is_compiling():
        return  # a value check syncs with the host and branches on data: eager mode only
    real = labels[labels != -100]
    if real.numel() and (real.min() < 0 or real.max() >= size):
        raise ValueError(
            f"`labels` must be in [0, {name}={size}) or -100 (ignored), got values in [{int(real.min())}, "
            f"{int(real.max())}]."
        )


def _pick_per_code(candidates):
    """Restart keys of a forward run in pieces: each code takes the candidate of a random piece. candidates: per
    piece None or (S, Z)."""
    if candidates[0] is None:
        return None
    stacked = torch.stack(candidates)  # (pieces, S, Z)
    piece = torch.randint(stacked.shape[0], (stacked.shape[1],), device=stacked.device)
    return stacked[piece, torch.arange(stacked.shape[1], device=stacked.device)]


def _real_tokens_first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For mask (B, T) bool: the (B, T) permutation that puts each row's real tokens, in order, in front of its
    padding, and its inverse."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    return order, torch.argsort(order, dim=1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, T, D); index: (B, T). Returns x[b, index[b, t]]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _vq_output_fields(outputs: LongVQModelOutput) -> dict:
    """The VQ fields of a model output, to pass on to a head's output."""
    return {name: getattr(outputs, name) for name in ("commitment_loss", "codebook_usage", "codebook_perplexity")}


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


class LongVQForCausalLM(LongVQPreTrainedModel, GenerationMixin):
    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LongVQConfig):
        if config.bidirectional:
            raise ValueError(
                "LongVQForCausalLM needs `bidirectional=False`: a bidirectional EMA and attention see future tokens."
            )
        if config.normalization_type == "batchnorm":
            raise ValueError(
                "LongVQForCausalLM cannot use normalization_type='batchnorm': batch statistics mix future tokens into "
                "past positions during training. Use 'layernorm', 'rmsnorm' or 'scalenorm'."
            )
        super().__init__(config)
        self.model = LongVQModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() builds no cache for a model without DynamicCache support; hand it an empty LongVQCache up front
        # so that features needing a cache before the first forward (chunked prefill) work as for attention models.
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation is not None:
                logger.warning_once(
                    f"LongVQ always decodes with its constant-size LongVQCache; cache_implementation="
                    f"{generation_config.cache_implementation!r} is ignored."
                )
            model_kwargs[CACHE_NAME] = LongVQCache(self.config)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: LongVQCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: LongVQCache | None = None,
        **kwargs,
    ) -> LongVQCausalLMOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*): next-token targets, unshifted (the loss
            shifts them); -100 is ignored. The loss is the causal-LM cross-entropy plus
            `vq_commitment_weight * commitment_loss`. With `num_items_in_batch` (Trainer under gradient accumulation)
            both terms are normalised by it, so accumulated micro-batches add up to the full-batch loss.
        logits_to_keep (`int` or `torch.Tensor`): compute logits for the last `logits_to_keep` positions only (0 = all),
            or for the given indices.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None:
            reference = input_ids if input_ids is not None else inputs_embeds
            if reference is not None and labels.shape != reference.shape[:2]:
                raise ValueError(
                    f"`labels` must have shape (batch, length) = {tuple(reference.shape[:2])}, got {tuple(labels.shape)}."
                )
            _check_label_ids(labels, self.config.vocab_size, "vocab_size")
        outputs = self.model(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            cache=_cache_argument(cache, past_key_values), use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True,
        )  # fmt: skip
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            commitment = outputs.commitment_loss
            num_items_in_batch = kwargs.get("num_items_in_batch")
            if commitment is not None and num_items_in_batch is not None:
                real_tokens = attention_mask[:, -labels.shape[1] :].sum() if attention_mask is not None else labels.numel()
                commitment = commitment * real_tokens / num_items_in_batch
            if commitment is not None:
                loss = loss + self.config.vq_commitment_weight * commitment
        output = LongVQCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            **_vq_output_fields(outputs),
        )
        return output if return_dict else output.to_tuple()


class LongVQForSequenceClassification(LongVQPreTrainedModel):
    """LongVQ with a linear classifier (`score`) on the pooled hidden states: mean over real tokens or the last real
    token (`config.classifier_pooling`). `problem_type` single-label / multi-label / regression as in transformers."""

    _auto_class = "AutoModelForSequenceClassification"

    def __init__(self, config: LongVQConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LongVQModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.dropout
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LongVQSequenceClassifierOutput | tuple:
        r"""
        labels (`torch.Tensor`, *optional*): `(batch,)` class ids (single-label), `(batch, num_labels)` multi-hot
            floats (multi-label) or `(batch,)` / `(batch, num_labels)` floats (regression).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states, return_dict=True,
        )  # fmt: skip
        hidden_states = outputs.last_hidden_state
        batch, length = hidden_states.shape[:2]
        if attention_mask is None:
            mask = torch.ones(batch, length, device=hidden_states.device)
        else:
            mask = attention_mask.to(hidden_states.device, hidden_states.dtype)
        if self.config.classifier_pooling == "mean":
            pooled = (hidden_states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            last = (mask * torch.arange(length, device=mask.device)).argmax(-1)
            pooled = hidden_states[torch.arange(batch, device=hidden_states.device), last]
        logits = self.score(self.dropout(pooled))

        loss = None
        if labels is not None:
            if labels.shape[0] != batch:
                raise ValueError(f"`labels` must have batch size {batch}, got shape {tuple(labels.shape)}.")
            if labels.dim() > 2 or (labels.dim() == 2 and labels.shape[1] not in (1, self.num_labels)):
                raise ValueError(
                    f"`labels` must have shape (batch,) or (batch, num_labels={self.num_labels}), got {tuple(labels.shape)}."
                )
            single_label = self.config.problem_type in (None, "single_label_classification") and self.num_labels > 1
            if single_label and not labels.is_floating_point() and (labels.dim() == 1 or labels.shape[1] == 1):
                _check_label_ids(labels, self.num_labels, "num_labels")
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
            loss = loss + self.config.vq_commitment_weight * outputs.commitment_loss
        output = LongVQSequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **_vq_output_fields(outputs)
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "LongVQCache",
    "LongVQPreTrainedModel",
    "LongVQModel",
    "LongVQForCausalLM",
    "LongVQForSequenceClassification",
]
