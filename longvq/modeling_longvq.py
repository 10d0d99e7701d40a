# Copyright 2026 The LongVQ Authors. Licensed under the Apache License, Version 2.0.
"""PyTorch LongVQ: MEGA-style blocks with vector-quantized, linear-time exact softmax attention.

Reads top to bottom: small modules (norms, EMA, positional bias, quantizer, gated VQ-attention, FFN) -> the block ->
outputs -> `LongVQPreTrainedModel` -> `LongVQModel` -> heads. The operations are plain functions in `ops_longvq.py`
(each with its slow twin), the decoding state is `cache_longvq.LongVQCache`, and `checkpoint_longvq.py` checks weight
files. This file and those siblings are copied into Hub checkpoints as remote code, so they import only the standard
library, torch, transformers and each other.

Shapes: B batch, T length, D hidden_size, H intermediate_size (value width), Z shared_representation_size,
N ema_projection_size, S codebook_size, C chunk_size.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import logging

from .cache_longvq import _CACHE_SHAPE_FIELDS, CACHE_NAME, LongVQCache, LongVQLayerCarry, _cache_argument
from .checkpoint_longvq import check_weight_files
from .configuration_longvq import LongVQConfig
from .ops_longvq import (
    autocast_off,
    code_statistics,
    ema_final_state,
    ema_scan,
    ema_step,
    fft_causal_convolution,
    gated_residual,
    power_sum,
    silu_gated_linear,
    vq_attention,
    vq_attention_step,
)

# ops_longvq imports the fused kernels; importing their module here too makes it a relative import of the modeling
# file itself, which is all that transformers 5.0 copies into its module cache when loading remote code from a local
# folder (it does not follow ops_longvq's own imports there).
from .triton_longvq import TRITON_AVAILABLE  # noqa: F401

logger = logging.get_logger(__name__)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Skips the call entirely in eval, where decoding makes thousands of them.
    return F.dropout(x, p, training) if training and p > 0 else x


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


class LongVQMultiDimensionalEma(nn.Module):
    r"""MEGA's multi-dimensional damped EMA with the gated residual `SiLU(EMA(x) + omega * x)`.

    Per channel d and expansion n: `h_t = (p * beta) x_t + (1 - p * delta) h_{t-1}`, `y_t = sum_n eta h_t / sqrt(N)`,
    with `p = sigmoid(damping_logit)`, `delta = sigmoid(decay_logit)`, so every mode decays (stable by construction).
    For whole sequences this is the convolution with `K[t] = sum_n eta p beta q^t / sqrt(N)`, `q = 1 - p delta`,
    computed in float32 by a block scan of matmuls (`ops_longvq.ema_scan`), or by FFT for a truncated kernel.

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
        return power_sum(gain * self.readout(), q, 0, length)

    def convolve(self, x: torch.Tensor, initial_state: torch.Tensor | None = None):
        """The raw EMA. x: (B, T, D) with padded positions already zeroed; initial_state: (B, D, N) state before x
        (causal only). Returns (B, T, D) float32 and, for a causal EMA, the state after all T steps (B, D, N) (None
        when bidirectional). A truncated kernel has no recurrence, so it is applied by FFT."""
        length = x.shape[1]
        if self.truncation is not None and self.truncation < length:  # bidirectional only (config validation)
            both = torch.cat([x, x.flip(1)], dim=-1).transpose(1, 2)
            both = fft_causal_convolution(both, self.kernel(self.truncation)).transpose(1, 2)
        elif not self.bidirectional:
            return ema_scan(x, *self.coefficients(), self.readout(), initial_state)
        else:
            both, _ = ema_scan(torch.cat([x, x.flip(1)], dim=-1), *self.coefficients(), self.readout())
        forward, backward = both.split(self.hidden_size, dim=-1)
        backward = F.pad(backward.flip(1)[:, 1:], (0, 0, 0, 1))  # bwd_{t+1}, zero after the last token
        return forward + backward, None

    def forward(self, x, mask, initial_state=None, lengths=None, output_final_state=False):
        """`SiLU(EMA(x) + omega * x)` (B, T, D) for x (B, T, D) with mask (B, T) bool; padded positions are zeroed.

        Causal only: `initial_state` (B, D, N) continues a state; `output_final_state` also returns the state after
        each row's `lengths[b]` steps (all T steps when `lengths` is None), else None.
        """
        x = x * mask.unsqueeze(-1).to(x.dtype)
        with autocast_off(x):
            ema, final = self.convolve(x, initial_state)
            if output_final_state and (lengths is not None or final is None):  # rows that end early, or a ragged tail
                if lengths is None:
                    lengths = torch.full(x.shape[:1], x.shape[1], device=x.device)
                final = ema_final_state(x, lengths, *self.coefficients(), initial_state)
        return F.silu(ema.to(x.dtype) + x * self.residual_weight), final if output_final_state else None

    def step(self, x, state, real):
        """One decoding step: x (B, 1, D), state (B, D, N) float32, real (B,) bool (a padded row keeps its state).
        Returns `SiLU(EMA + omega * x)` (B, 1, D) and the new state."""
        with autocast_off(x):
            ema, new_state = ema_step(x[:, 0], state, *self.coefficients(), self.readout())
        new_state = torch.where(real[:, None, None], new_state, state)
        return F.silu(ema.unsqueeze(1).to(x.dtype) + x * self.residual_weight), new_state  # padded rows: output unused


# ---------------------------------------------------------------------------------------------------------------------
# Relative positional bias inside the attention window
# ---------------------------------------------------------------------------------------------------------------------


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
        with autocast_off(keys):
            return torch.addmm(codeword_norms, keys.flatten(0, -2), codebook.t(), alpha=-2)

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float, candidates: torch.Tensor, enabled: torch.Tensor):
        """Re-seed every code whose EMA count is below `threshold` with the candidate key of the same index
        (candidates: (S, Z) random keys of the current batch), as if it had just been assigned that one key; nothing
        where the () bool tensor `enabled` is False (a tensor, not a Python bool: no host sync, no graph break)."""
        dead = (self.codebook_count < threshold) & enabled
        self.codebook_sum.copy_(torch.where(dead[:, None], candidates.to(self.codebook_sum.dtype), self.codebook_sum))
        self.codebook_count.copy_(torch.where(dead, torch.ones_like(self.codebook_count), self.codebook_count))

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor):
        """counts: (S,), sums: (S, Z): this step's per-code token counts and key sums (real tokens only)."""
        self.codebook_count.mul_(self.decay).add_(counts.to(self.codebook_count.dtype), alpha=1 - self.decay)
        self.codebook_sum.mul_(self.decay).add_(sums.to(self.codebook_sum.dtype), alpha=1 - self.decay)


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

    def forward(self, hidden_states, mask, codebook, state=None, lengths=None, plan=None):
        """hidden_states: (B, T, D); mask: (B, T) bool, each row's real tokens first; codebook: (S, Z).

        `state` selects the mode: None, a plain forward; a `LongVQLayerCarry`, a causal block-parallel continuation
        whose carry after each row's `lengths[b]` tokens is returned: a prefill, or, with `lengths` None, one piece of
        a long input (every row runs all T tokens from a block boundary); with a single-token decoding `plan`, the
        layer's `LongVQLayerState`, updated in place.
        Returns (B, T, D), the layer statistics (None for a decoding step in eval mode, where they would only cost
        time) and the carry after the tokens (None unless a carry was given).
        """
        residual = hidden_states
        x = self.norm(hidden_states, mask) if self.config.normalize_before else hidden_states
        value = _dropout(F.silu(self.value_proj(x)), self.config.hidden_dropout, self.training)
        if plan is not None:
            mixed, ema = self.ema.step(x, state.ema, plan.real)
            state.ema.copy_(ema)  # in place: a compiled step updates the state where it is
        else:
            initial_ema = None if state is None else state.ema
            mixed, final_ema = self.ema(x, mask, initial_ema, lengths, output_final_state=state is not None)
        mixed = _dropout(mixed, self.config.dropout, self.training)
        update, shared, reset, hidden = self.mix_proj(mixed).split(self.split_sizes, dim=-1)
        shared = F.silu(shared)
        query, key = torch.addcmul(self.query_key_offset, shared.unsqueeze(-2), self.query_key_scale).unbind(-2)
        # Keys are centred and scaled to the sphere of radius sqrt(Z), where the codewords live (uncentred keys of
        # the positive SiLU features crowd into one cap and collapse the codebook); the query keeps its scale, which
        # acts as the attention temperature.
        key = F.layer_norm(key, (key.shape[-1],), eps=self.config.norm_eps)
        statistics_needed = plan is None or self.training
        if statistics_needed:
            codes, key_quantized, squared_error = self.quantizer.quantize(key, codebook)
        else:
            codes = self.quantizer.nearest(key, codebook)
        final = None
        if plan is not None:
            attention = vq_attention_step(
                query, value, codes, codebook, self.position_bias, self.config.chunk_size, state, plan,
                self.config.codebook_memory,
            )  # fmt: skip
        else:
            attention, final_attention = vq_attention(
                query, key_quantized, value, codes, codebook, mask, self.position_bias, self.config.chunk_size,
                bidirectional=self.config.bidirectional, dropout=self.config.attention_dropout, training=self.training,
                memory=self.config.codebook_memory, initial_state=None if state is None else state.attention,
                lengths=lengths, output_final_state=state is not None, block_aligned=lengths is None,
            )  # fmt: skip
            if state is not None:
                final = LongVQLayerCarry(final_ema, final_attention)
        # out_proj(o * SiLU(r)) keeping o and r only for backward (not SiLU(r) and the product as well)
        pre = hidden + silu_gated_linear(attention, reset, self.out_proj)
        # residual + sigmoid(u) (SiLU(pre) - residual); the residual stream keeps its dtype under autocast
        if self.training and self.config.dropout > 0:
            gated = F.dropout(F.silu(pre), self.config.dropout)
            out = torch.lerp(residual, gated.to(residual.dtype), torch.sigmoid(update).to(residual.dtype))
        else:  # saving the inputs only, not SiLU(pre) and sigmoid(u) as well
            out = gated_residual(residual, update, pre)
        if not self.config.normalize_before:
            out = self.norm(out, mask)
        if not statistics_needed:
            return out, None, final
        # Key sums feed the codebook update only, so eval forwards skip them.
        counts, sums = code_statistics(codes, key, mask, self.config.codebook_size, with_sums=self.training)
        restart_keys = None
        if self.training and self.config.codebook_restart_threshold > 0:
            restart_keys = _random_real_rows(key.detach().float(), mask, self.config.codebook_size)
        return out, LongVQLayerStatistics((squared_error * mask).sum(), counts, sums, restart_keys), final


def _random_real_rows(x: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows of x (B, T, F) drawn uniformly, with replacement, from the positions where mask (B, T) is True:
    the k-th real token is found by its rank (a cumulative sum of the mask), so every shape is static and a compiled
    training step stays one graph. Rows are arbitrary when no token is real (the codebook update ignores them)."""
    flat = x.flatten(0, 1)
    ranks = mask.flatten().cumsum(0)  # ranks[i]: how many real tokens up to and including position i
    wanted = (torch.rand(count, device=x.device) * ranks[-1]).long() + 1  # ranks 1..n (1 when n = 0)
    return flat[torch.searchsorted(ranks, wanted).clamp(max=flat.shape[0] - 1)]


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
        if self.training and self.hidden_dropout > 0:
            projected = self.fc2(F.dropout(F.silu(self.fc1(x)), self.hidden_dropout))
        else:  # fc2(SiLU(h)) keeping h only for backward (not SiLU(h) as well)
            projected = silu_gated_linear(None, self.fc1(x), self.fc2)
        out = hidden_states + _dropout(projected, self.dropout, self.training)
        return out if self.normalize_before else self.norm(out, mask)


class LongVQBlock(GradientCheckpointingLayer):
    """One LongVQ layer: gated VQ-attention followed by the normalized FFN."""

    def __init__(self, config: LongVQConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = LongVQGatedAttention(config, layer_idx)
        self.feed_forward = LongVQNormalizedFeedForward(config)

    def forward(self, hidden_states, mask, codebook, state=None, lengths=None, plan=None):
        """Returns hidden states (B, T, D), the summed squared quantization error (), code counts (S,), key sums
        (S, Z), restart keys (S, Z) and the carry after the tokens (see `LongVQGatedAttention.forward` for `state`,
        `lengths` and `plan`) as a flat tuple (gradient checkpointing handles tensors only); the statistics are None
        for an eval decoding step, the key sums outside training, the restart keys unless restarts are on."""
        hidden_states, stats, final = self.attention(hidden_states, mask, codebook, state, lengths, plan)
        hidden_states = self.feed_forward(hidden_states, mask)
        if stats is None:
            return hidden_states, None, None, None, None, final
        return hidden_states, stats.squared_error_sum, stats.code_counts, stats.code_key_sums, stats.restart_keys, final


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
        continuing = cache is not None and cache.is_initialized  # the cache has seen tokens
        if continuing and attention_mask is not None and attention_mask.dim() == 2:
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            # generate() passes the mask of the whole history (a longer mask only: reading the number of tokens seen
            # synchronises with the device)
            if attention_mask.shape[1] > length and attention_mask.shape[1] == cache.get_seq_length() + length:
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
            if length == 1 and continuing:  # a decoding step: O(1) recurrence in every layer
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
            state = None
            if cache is not None:  # a decoding step updates the layer's state; a prefill continues and replaces it
                layer_state = cache.layers[layer.layer_idx]
                state = layer_state if plan is not None else layer_state.carry(codebook, cache.positions)
            hidden_states, *layer_statistics, final = layer(
                hidden_states, mask, codebook=codebook, state=state, lengths=lengths, plan=plan
            )
            if final is not None:
                layer_state.store(final.ema, final.attention)
            for collected, value in zip(statistics, layer_statistics):
                collected.append(value)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        return hidden_states, statistics, all_hidden_states

    def _segment_length(self, length: int, cache) -> int | None:
        """Piece length for `_forward_in_segments` (a multiple of chunk_size), or None to run the input whole.

        Under `torch.compile` the pieces are unrolled into the graph, so compile time grows with their number; there
        the input runs whole unless activation checkpointing is on (where the pieces bound the memory). Pieces and the
        whole input give the same result."""
        if self.config.segment_length is None or self.config.bidirectional or cache is not None:
            return None
        if torch.compiler.is_compiling() and not (self.training and self.uses_activation_checkpointing):
            return None
        chunk_size = self.config.chunk_size
        segment = max(self.config.segment_length // chunk_size, 1) * chunk_size
        return segment if length > segment else None

    def _forward_in_segments(self, hidden_states, mask, codebooks, segment, output_hidden_states):
        """A causal forward without a cache, of an input longer than `segment`, as consecutive pieces of `segment`
        tokens through every layer: each layer carries its EMA state, last block and memory from one piece to the
        next (`LongVQLayerCarry`), so the result equals the whole-input forward to float rounding while no
        tensor grows with the input length (tens of MiB tensors cost fresh pages from the OS at every step). With
        gradient checkpointing on, each (piece, layer) is one checkpoint: training keeps the carries and the layer
        inputs, and recomputes one piece of one layer at a time, so its memory stops growing with the length.
        Returns what `_run_layers` returns, over the whole input."""
        carries = [LongVQLayerCarry() for _ in self.layers]
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
        """One layer over one piece, continuing `carry` (which it does not modify, so a checkpoint recompute replays
        it exactly): returns the layer's outputs, the carry after the piece last."""
        enabled = layer.gradient_checkpointing
        layer.gradient_checkpointing = False  # the (piece, layer) call is the checkpoint; the layer's own would nest
        try:
            return layer(hidden_states, mask, codebook=codebook, state=carry)
        finally:
            layer.gradient_checkpointing = enabled

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
        if restart_keys[0] is None:
            return  # restarts are off
        candidates = torch.stack(restart_keys)
        if distributed:
            dist.broadcast(candidates, src=0)
        any_real = counts.sum() > 0  # no process saw a real token: no candidate is a key, restart nothing
        for layer, layer_candidates in zip(self.layers, candidates):
            layer.attention.quantizer.restart_dead_codes(
                self.config.codebook_restart_threshold, layer_candidates, any_real
            )  # fmt: skip


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

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """The attention mask generate() passes with a compileable cache: LongVQ's state has no key/value history to
        mask, so it is the 2-D padding mask of the input's columns only, and a compiled decoding step sees inputs of
        one fixed shape at every step. generate() describes the input's shape by a placeholder `inputs_embeds`
        (`input_embeds` before transformers 5.x renamed it)."""
        placeholder = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))
        # contiguous: a view of the growing mask changes strides at every step, a recompile on the older 5.x releases
        # (5.0) whose generate() does not make the mask contiguous itself
        return None if attention_mask is None else attention_mask[:, -placeholder.shape[1] :].contiguous()

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
