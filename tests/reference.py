"""Slow, obviously-right twins of the fast paths in `longvq.modeling_longvq`, used as test oracles."""

import math

import torch


def dense_vq_attention(query, key, value, key_mask, position_bias, chunk_size, bidirectional, memory=True):
    """Naive O(T^2) softmax attention over quantized keys, with the positional bias inside the window only
    (`memory=False`: keys outside the window are not seen at all, the MEGA-chunk ablation).

    query (B, T, Z); key (B, T, Z) quantized keys (straight-through to the raw keys); value (B, T, H);
    key_mask (B, T) bool. Blocks of `chunk_size` are counted from index 0; key j is in the window of query i when
    block(i) - block(j) is 0 or 1 (causal, with j <= i) or |block(i) - block(j)| <= 1 (bidirectional).
    Outside the window the key is read without gradient, as the block-wise memory reads the codebook.
    """
    positions = torch.arange(query.shape[1])
    return _attention_at(query, positions, key, value, key_mask, position_bias, chunk_size, bidirectional, memory)


def ema_recurrence(ema, x):
    """MEGA's damped EMA one step at a time. x: (B, T, D). Returns the raw EMA output (B, T, D) in float64.

    Causal: h_t = p*beta x_t + (1 - p*delta) h_{t-1}, y_t = sum_n eta h_t / sqrt(N).
    Bidirectional: the second D channels run the same recurrence over the reversed sequence, and y_t adds that
    backward output at t + 1 (the current token is counted once, by the forward direction).
    """
    p = torch.sigmoid(ema.damping_logit.double())
    gain = p * ema.expansion.double()
    decay = 1 - p * torch.sigmoid(ema.decay_logit.double())
    readout = ema.projection.double() / math.sqrt(decay.shape[-1])
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
    if not ema.bidirectional:
        return forward
    backward = run(x.flip(1), slice(dim, 2 * dim)).flip(1)  # backward[t] = sum_{s >= t} K2[s - t] x_s
    shifted = torch.cat([backward[:, 1:], torch.zeros_like(backward[:, :1])], dim=1)
    return forward + shifted


def dense_vq_attention_rows(query, key, value, key_mask, position_bias, chunk_size, bidirectional, rows, memory=True):
    """`dense_vq_attention` for the query positions `rows` only, in O(R T) instead of O(T^2) time and memory, for
    checking very long sequences at sampled positions.

    Same arguments as `dense_vq_attention` plus rows (R,) long. Returns (B, R, H): row r is the attention output at
    position rows[r].
    """
    return _attention_at(query[:, rows], rows, key, value, key_mask, position_bias, chunk_size, bidirectional, memory)


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
