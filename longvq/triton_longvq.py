# Copyright 2026 The LongVQ Authors. Licensed under the Apache License, Version 2.0.
"""Block-wise VQ-attention as fused Triton kernels, forward and backward (flash-attention style).

`ops_longvq._blockwise_attention` calls `blockwise_attention_triton` for CUDA tensors when Triton is installed
(`kernel_supports`) and no attention dropout is active in training (dropout falls back to the PyTorch path, which
drops attention weights the kernel never materialises). PyTorch computes the memory statistics first (per-block
counts and prefix-summed value sums, `ops_longvq._block_memory`); the kernels do the rest.

Layout: B*n flat blocks of C queries; query, key (B*n, C, Z); value (B*n, C, H); key_mask (B*n, C); the window bias
(C, W), W = 2C causal, 3C bidirectional, its column j being key slot j of blocks n-1, n[, n+1]; codebook (S, Z);
memory counts (B*n, S) and value sums (B*n, S, H). For query i of block n the logits are
`[q.k_j / sqrt(Z) + bias(i, j) (window key j visible) | q.c_s / sqrt(Z) + log N_s (N_s > 0)]` under one softmax over
W + S entries, and `out_i = sum_j w_ij v_j + sum_s (w_is / N_s) sums_s`.

- Forward: one program per (block, tile of queries, tile of H); an online softmax over the window's key tiles, then
  the codeword tiles; it writes the output and each query's logsumexp.
- Backward (recomputing the probabilities from the logsumexp, `delta_i = sum_h dO_ih O_ih` from PyTorch):
  queries (and the window bias, per block, summed by PyTorch), window keys, values, memory sums, each by the program
  that owns its rows, so no atomics: the keys and values of block n collect from the query blocks that see them
  (n + 1, n, and bidirectionally n - 1). The codebook gets no gradient (the memory reads it as a constant).

Copied into Hub checkpoints beside `ops_longvq.py`, which imports it: torch, and Triton only if it is installed.
"""

import re
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
    jit = triton.jit
except ImportError:  # the PyTorch path runs instead; the kernels below stay plain, never-called functions
    TRITON_AVAILABLE = False
    tl = SimpleNamespace(constexpr=None)  # what the kernels' signatures name

    def jit(fn):
        return fn


_LARGEST_Z = 256  # a (tile, Z) block of queries, keys and query gradients lives in registers
# Tiles of 64 queries and H columns, 32 keys or codewords, 8 warps: with Z = 128 the kernels compile for sm_90
# (Triton 3.9) without register spills in the forward and with at most 112 bytes of spills per thread in the backward
# (`cuobjdump -res-usage`); 64 keys or 4 warps spill kilobytes. Not timed on a GPU yet.
_ROW_TILE, _KEY_TILE, _NUM_WARPS = 64, 32, 8
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_supports(query: torch.Tensor) -> bool:
    """Whether `blockwise_attention_triton` runs on this query (B*n, C, Z) or (B, T, Z): Triton installed, a CUDA
    tensor, half, bfloat16 or float32, Z <= 256."""
    return (
        TRITON_AVAILABLE and query.is_cuda and query.dtype in _KERNEL_DTYPES and query.shape[-1] <= _LARGEST_Z
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


@jit
def _load_rows(tensor, rows, in_rows, columns, width):
    """tensor[rows, columns] of a row-major (., width) tensor, zeros outside `in_rows` and `columns < width`."""
    inside = in_rows[:, None] & (columns[None, :] < width)
    return tl.load(tensor + rows[:, None] * width + columns[None, :], mask=inside, other=0.0)


@jit
def _store_rows(tensor, rows, in_rows, columns, width, values):
    """tensor[rows, columns] = values in a row-major (., width) tensor, inside `in_rows` and `columns < width`."""
    inside = in_rows[:, None] & (columns[None, :] < width)
    tl.store(tensor + rows[:, None] * width + columns[None, :], values, mask=inside)


@jit
def _masked(logits, seen):
    """The logits where `seen`, else -1e30: finite, so that a row that sees nothing stays finite (uniform weights)."""
    return tl.where(seen, logits, -1.0e30)


@jit
def _window_logits(
    q, key, key_mask, bias, block, rows, cols, num_blocks, chunk_size, width, z_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_Z: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits (rows, cols) of the queries q (rows, BLOCK_Z) in slots `rows` of flat block `block` against window
    columns `cols`, with what produced them: the keys (cols, BLOCK_Z), their flat token indices and whether the
    block sees each (inside the window, in the same batch row, a real token)."""
    neighbour = block % num_blocks + cols // chunk_size - 1  # position of the key's block in its batch row
    tokens = block * chunk_size - chunk_size + cols
    valid = (cols < width) & (neighbour >= 0) & (neighbour < num_blocks)
    valid = valid & (tl.load(key_mask + tokens, mask=valid, other=0) != 0)
    k = _load_rows(key, tokens, valid, tl.arange(0, BLOCK_Z), z_dim)
    window_bias = _load_rows(bias, rows, rows < chunk_size, cols, width)
    logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + window_bias
    seen = valid[None, :] & (rows[:, None] < chunk_size)
    if CAUSAL:
        seen = seen & (cols[None, :] <= rows[:, None] + chunk_size)
    return _masked(logits, seen), k, tokens, valid


@jit
def _memory_logits(
    q, codebook, memory_counts, block, codes, codebook_size, z_dim, scale,
    BLOCK_Z: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits (rows, codes) `q.c_s / sqrt(Z) + log N_s` of the queries q against codewords `codes` of block `block`'s
    memory (never where N_s = 0), with the codewords (codes, BLOCK_Z) and their counts N_s."""
    in_book = codes < codebook_size
    c = _load_rows(codebook, codes, in_book, tl.arange(0, BLOCK_Z), z_dim)
    counts = tl.load(memory_counts + block * codebook_size + codes, mask=in_book, other=0.0)
    logits = tl.dot(q, tl.trans(c), input_precision=PRECISION) * scale + tl.log(tl.maximum(counts, 1.0))[None, :]
    return _masked(logits, (counts > 0)[None, :]), c, counts


@jit
def _memory_means(memory_sums, block, codes, counts, codebook_size, h, h_dim, dtype: tl.constexpr):
    """The memory's values `sums_s / N_s` (codes, h) of block `block`, in `dtype` (0 where N_s = 0)."""
    sums = _load_rows(memory_sums, block * codebook_size + codes, codes < codebook_size, h, h_dim)
    return (sums / tl.maximum(counts, 1.0)[:, None]).to(dtype)


@jit
def _query_rows(query, block, rows, chunk_size, z_dim, BLOCK_Z: tl.constexpr):
    """Query slots `rows` of flat block `block`: their flat indices, which of them exist (none when the block lies
    outside the batch) and the queries (rows, BLOCK_Z)."""
    queries = block * chunk_size + rows
    in_rows = (rows < chunk_size) & (queries >= 0) & (queries < tl.num_programs(0) * chunk_size)
    return queries, in_rows, _load_rows(query, queries, in_rows, tl.arange(0, BLOCK_Z), z_dim)


@jit
def _softmax_step(m_i, l_i, acc, logits, values, PRECISION: tl.constexpr):
    """One online-softmax update with a tile of logits (rows, cols) and their values (cols, h)."""
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(logits - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@jit
def _window_end(row_tile, chunk_size, width, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last window column a causal tile of queries can see (query slot i sees columns <= C + i)."""
    end = width
    if CAUSAL:
        end = tl.minimum(width, chunk_size + (row_tile + 1) * BLOCK_M)
    return end


@jit
def _forward_kernel(
    query, key, value, key_mask, bias, codebook, memory_counts, memory_sums, out, lse,
    num_blocks, chunk_size, width, codebook_size, z_dim, h_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_Z: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (block, query tile, H tile): out[block, rows, h] and the rows' logsumexp."""
    block = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    queries, in_rows, q = _query_rows(query, block, rows, chunk_size, z_dim, BLOCK_Z)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    for start in range(0, _window_end(tl.program_id(1), chunk_size, width, CAUSAL, BLOCK_M), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        logits, _, tokens, valid = _window_logits(
            q, key, key_mask, bias, block, rows, cols, num_blocks, chunk_size, width, z_dim, scale, CAUSAL, BLOCK_Z,
            PRECISION,
        )  # fmt: skip
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, logits, _load_rows(value, tokens, valid, h, h_dim), PRECISION)
    for start in range(0, codebook_size, BLOCK_S):
        codes = start + tl.arange(0, BLOCK_S)
        logits, _, counts = _memory_logits(
            q, codebook, memory_counts, block, codes, codebook_size, z_dim, scale, BLOCK_Z, PRECISION
        )  # fmt: skip
        means = _memory_means(memory_sums, block, codes, counts, codebook_size, h, h_dim, value.dtype.element_ty)
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, logits, means, PRECISION)
    _store_rows(out, queries, in_rows, h, h_dim, acc / l_i[:, None])
    tl.store(lse + queries, m_i + tl.log(l_i), mask=in_rows)


@jit
def _probabilities(logits, lse, queries, in_rows):
    """Softmax probabilities of a tile of logits recomputed from the rows' logsumexp (0 on rows outside `in_rows`)."""
    row_lse = tl.load(lse + queries, mask=in_rows, other=0.0)
    return tl.where(in_rows[:, None], tl.exp(logits - row_lse[:, None]), 0.0)


@jit
def _output_grad_dot(
    grad_out, queries, in_rows, values, value_rows, in_values, h_dim, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr
):  # fmt: skip
    """dP = dO V^T for a tile: (rows, value rows) dot products over all of H, H tile by H tile."""
    dp = tl.zeros([queries.shape[0], value_rows.shape[0]], tl.float32)
    for h_start in range(0, h_dim, BLOCK_H):
        h = h_start + tl.arange(0, BLOCK_H)
        d_out = _load_rows(grad_out, queries, in_rows, h, h_dim)
        v = _load_rows(values, value_rows, in_values, h, h_dim).to(d_out.dtype)
        dp += tl.dot(d_out, tl.trans(v), input_precision=PRECISION)
    return dp


@jit
def _query_grad_kernel(
    query, key, value, key_mask, bias, codebook, memory_counts, memory_sums, grad_out, lse, delta,
    grad_query, grad_bias, num_blocks, chunk_size, width, codebook_size, z_dim, h_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_Z: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (block, query tile): dq of the rows, and dS of the window (the bias gradient of this block)."""
    block = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    queries, in_rows, q = _query_rows(query, block, rows, chunk_size, z_dim, BLOCK_Z)
    row_delta = tl.load(delta + queries, mask=in_rows, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_Z], tl.float32)
    for start in range(0, _window_end(tl.program_id(1), chunk_size, width, CAUSAL, BLOCK_M), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        logits, k, tokens, valid = _window_logits(
            q, key, key_mask, bias, block, rows, cols, num_blocks, chunk_size, width, z_dim, scale, CAUSAL, BLOCK_Z,
            PRECISION,
        )  # fmt: skip
        p = _probabilities(logits, lse, queries, in_rows)
        dp = _output_grad_dot(grad_out, queries, in_rows, value, tokens, valid, h_dim, BLOCK_H, PRECISION)
        ds = p * (dp - row_delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        _store_rows(grad_bias, queries, in_rows, cols, width, ds)
    for start in range(0, codebook_size, BLOCK_S):
        codes = start + tl.arange(0, BLOCK_S)
        logits, c, counts = _memory_logits(
            q, codebook, memory_counts, block, codes, codebook_size, z_dim, scale, BLOCK_Z, PRECISION
        )  # fmt: skip
        p = _probabilities(logits, lse, queries, in_rows)
        in_book = codes < codebook_size
        sum_rows = block * codebook_size + codes
        dp = _output_grad_dot(grad_out, queries, in_rows, memory_sums, sum_rows, in_book, h_dim, BLOCK_H, PRECISION)
        ds = p * (dp / tl.maximum(counts, 1.0)[None, :] - row_delta[:, None])
        dq += tl.dot(ds.to(c.dtype), c, input_precision=PRECISION)
    _store_rows(grad_query, queries, in_rows, tl.arange(0, BLOCK_Z), z_dim, dq * scale)


@jit
def _reader_tile(
    query, key, key_mask, bias, lse, block, reader, rows, slots, num_blocks, chunk_size, width, z_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_Z: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """For key slots `slots` of flat block `block` and query slots `rows` of the block that has them as its window
    block `reader` (0: previous, so block + 1; 1: its own; 2: next, so block - 1): the probabilities (rows, slots), the
    queries (rows, BLOCK_Z), their flat indices and which rows exist."""
    query_block = block + 1 - reader
    queries, in_rows, q = _query_rows(query, query_block, rows, chunk_size, z_dim, BLOCK_Z)
    logits, _, _, _ = _window_logits(
        q, key, key_mask, bias, query_block, rows, reader * chunk_size + slots, num_blocks, chunk_size, width, z_dim,
        scale, CAUSAL, BLOCK_Z, PRECISION,
    )  # fmt: skip
    return _probabilities(logits, lse, queries, in_rows), q, queries, in_rows


@jit
def _key_value_grad_kernel(
    query, key, value, key_mask, bias, grad_out, lse, delta, grad, num_blocks, chunk_size, width, z_dim, h_dim, scale,
    KEYS: tl.constexpr, READERS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (block, key tile) with KEYS: dk = dS^T q of the keys, into grad (B*n, C, Z); program (block, key tile,
    H tile) without: dv = P^T dO of the values, into grad (B*n, C, H); both from every query block that sees the keys
    in its window."""
    block = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keys = block * chunk_size + slots
    in_slots = slots < chunk_size
    if KEYS:
        columns, grad_width = tl.arange(0, BLOCK_Z), z_dim
    else:
        columns, grad_width = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H), h_dim
    acc = tl.zeros([BLOCK_N, columns.shape[0]], tl.float32)
    for reader in range(READERS):
        for row_start in range(0, chunk_size, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            p, q, queries, in_rows = _reader_tile(
                query, key, key_mask, bias, lse, block, reader, rows, slots, num_blocks, chunk_size, width, z_dim,
                scale, CAUSAL, BLOCK_Z, PRECISION,
            )  # fmt: skip
            if KEYS:  # dS = P (dP - delta)
                dp = _output_grad_dot(grad_out, queries, in_rows, value, keys, in_slots, h_dim, BLOCK_H, PRECISION)
                row_delta = tl.load(delta + queries, mask=in_rows, other=0.0)
                ds = p * (dp - row_delta[:, None])
                acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
            else:
                d_out = _load_rows(grad_out, queries, in_rows, columns, h_dim)
                acc += tl.dot(tl.trans(p.to(d_out.dtype)), d_out, input_precision=PRECISION)
    _store_rows(grad, keys, in_slots, columns, grad_width, acc)


@jit
def _memory_grad_kernel(
    query, codebook, memory_counts, grad_out, lse, grad_sums, chunk_size, codebook_size, z_dim, h_dim, scale,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (block, codeword tile, H tile): d sums_s = sum_i (P_is / N_s) dO_i over the block's queries."""
    block = tl.program_id(0).to(tl.int64)
    codes = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    d_sums = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
    for row_start in range(0, chunk_size, BLOCK_M):
        queries, in_rows, q = _query_rows(query, block, row_start + tl.arange(0, BLOCK_M), chunk_size, z_dim, BLOCK_Z)
        logits, _, counts = _memory_logits(
            q, codebook, memory_counts, block, codes, codebook_size, z_dim, scale, BLOCK_Z, PRECISION
        )  # fmt: skip
        p = _probabilities(logits, lse, queries, in_rows) / tl.maximum(counts, 1.0)[None, :]
        d_out = _load_rows(grad_out, queries, in_rows, h, h_dim).to(tl.float32)
        d_sums += tl.dot(tl.trans(p), d_out, input_precision=PRECISION)
    _store_rows(grad_sums, block * codebook_size + codes, codes < codebook_size, h, h_dim, d_sums)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers, as custom operators (torch.compile traces them as opaque calls)
# ---------------------------------------------------------------------------------------------------------------------


def _tile(size: int, largest: int) -> int:
    """A tile edge for `size`: a power of two in [16, largest] (tl.dot needs >= 16)."""
    return max(16, min(largest, 1 << max(size - 1, 0).bit_length()))


def _launch_settings(query, value, codebook, causal):
    """What the launches share: the sizes, the compile-time tiles (the codeword tile apart: not every kernel takes it)
    and the number of programs along each axis. fp32 matmuls run in full precision unless torch's own do not."""
    total_blocks, chunk_size, z_dim = query.shape
    h_dim, codebook_size = value.shape[-1], codebook.shape[0]
    precision = "ieee" if query.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    tiles = dict(
        BLOCK_M=_tile(chunk_size, _ROW_TILE), BLOCK_N=_tile(chunk_size, _KEY_TILE), BLOCK_Z=_tile(z_dim, _LARGEST_Z),
        BLOCK_H=_tile(h_dim, _ROW_TILE), PRECISION=precision, num_warps=_NUM_WARPS,
    )  # fmt: skip
    codeword_tile = _tile(codebook_size, _KEY_TILE)
    shape = dict(chunk_size=chunk_size, width=(2 if causal else 3) * chunk_size, z_dim=z_dim, h_dim=h_dim)
    programs = dict(
        blocks=total_blocks, rows=triton.cdiv(chunk_size, tiles["BLOCK_M"]),
        keys=triton.cdiv(chunk_size, tiles["BLOCK_N"]), h=triton.cdiv(h_dim, tiles["BLOCK_H"]),
        codes=triton.cdiv(codebook_size, codeword_tile),
    )  # fmt: skip
    return shape, tiles, codeword_tile, programs


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """t, or one zero in its place when empty (window-only attention): Triton rejects the null pointer of an empty
    tensor; the kernels read nothing from it when the codebook is empty."""
    return t if t.numel() else t.new_zeros(1)


_OPERATOR = "longvq::" + re.sub(r"\W", "_", __name__)  # one name per copy of this file (package, remote code)


@torch.library.custom_op(_OPERATOR + "_forward", mutates_args=())
def _attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor, bias: torch.Tensor,
    codebook: torch.Tensor, memory_counts: torch.Tensor, memory_sums: torch.Tensor, num_blocks: int, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kernel's output (B*n, C, H) and per-query logsumexp (B*n, C) float32."""
    shape, tiles, codeword_tile, programs = _launch_settings(query, value, codebook, causal)
    out = torch.empty_like(value)
    lse = torch.empty(query.shape[:2], device=query.device, dtype=torch.float32)
    _forward_kernel[(programs["blocks"], programs["rows"], programs["h"])](
        query, key, value, key_mask, bias, _nonempty(codebook), _nonempty(memory_counts), _nonempty(memory_sums), out,
        lse, num_blocks, codebook_size=codebook.shape[0], scale=shape["z_dim"] ** -0.5, CAUSAL=causal,
        BLOCK_S=codeword_tile, **shape, **tiles,
    )  # fmt: skip
    return out, lse


@_attention_forward.register_fake
def _(query, key, value, key_mask, bias, codebook, memory_counts, memory_sums, num_blocks, causal):
    return torch.empty_like(value), query.new_empty(query.shape[:2], dtype=torch.float32)


@torch.library.custom_op(_OPERATOR + "_backward", mutates_args=())
def _attention_backward(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
    bias: torch.Tensor, codebook: torch.Tensor, memory_counts: torch.Tensor, memory_sums: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, num_blocks: int, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients w.r.t. query, key, value, the (C, W) bias and the memory sums."""
    shape, tiles, codeword_tile, programs = _launch_settings(query, value, codebook, causal)
    blocks, codebook_size, scale = programs["blocks"], codebook.shape[0], shape["z_dim"] ** -0.5
    delta = (grad_out.float() * out.float()).sum(-1)  # (B*n, C): rowsum(dO * O)
    grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    grad_bias = torch.zeros(blocks, shape["chunk_size"], shape["width"], device=query.device, dtype=torch.float32)
    grad_sums = torch.zeros_like(memory_sums)
    memory = (_nonempty(codebook), _nonempty(memory_counts), _nonempty(memory_sums))
    _query_grad_kernel[(blocks, programs["rows"])](
        query, key, value, key_mask, bias, *memory, grad_out, lse, delta, grad_query, grad_bias, num_blocks,
        codebook_size=codebook_size, scale=scale, CAUSAL=causal, BLOCK_S=codeword_tile, **shape, **tiles,
    )  # fmt: skip
    arguments = (query, key, value, key_mask, bias, grad_out, lse, delta)
    settings = dict(scale=scale, READERS=2 if causal else 3, CAUSAL=causal, **shape, **tiles)
    _key_value_grad_kernel[(blocks, programs["keys"])](*arguments, grad_key, num_blocks, KEYS=True, **settings)
    _key_value_grad_kernel[(blocks, programs["keys"], programs["h"])](
        *arguments, grad_value, num_blocks, KEYS=False, **settings
    )  # fmt: skip
    if codebook_size:
        _memory_grad_kernel[(blocks, programs["codes"], programs["h"])](
            query, codebook, memory_counts, grad_out, lse, grad_sums, shape["chunk_size"], codebook_size,
            shape["z_dim"], shape["h_dim"], scale, BLOCK_M=tiles["BLOCK_M"], BLOCK_S=codeword_tile,
            BLOCK_Z=tiles["BLOCK_Z"], BLOCK_H=tiles["BLOCK_H"], PRECISION=tiles["PRECISION"], num_warps=_NUM_WARPS,
        )  # fmt: skip
    return grad_query, grad_key, grad_value, grad_bias.sum(0), grad_sums


@_attention_backward.register_fake
def _(grad_out, query, key, value, key_mask, bias, codebook, memory_counts, memory_sums, out, lse, num_blocks, causal):
    grad_bias = bias.new_empty(bias.shape, dtype=torch.float32)
    grads = (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value))
    return *grads, grad_bias, torch.empty_like(memory_sums)


def _save_for_backward(ctx, inputs, output):
    query, key, value, key_mask, bias, codebook, memory_counts, memory_sums, num_blocks, causal = inputs
    ctx.save_for_backward(query, key, value, key_mask, bias, codebook, memory_counts, memory_sums, *output)
    ctx.num_blocks, ctx.causal = num_blocks, causal


def _backward(ctx, grad_out, grad_lse):
    grad_query, grad_key, grad_value, grad_bias, grad_sums = _attention_backward(
        grad_out.contiguous(), *ctx.saved_tensors, ctx.num_blocks, ctx.causal
    )  # fmt: skip
    return grad_query, grad_key, grad_value, None, grad_bias, None, None, grad_sums, None, None


_attention_forward.register_autograd(_backward, setup_context=_save_for_backward)


def blockwise_attention_triton(
    query, key, value, key_mask, bias, codebook, memory_counts, memory_sums, num_blocks, bidirectional
):  # fmt: skip
    """Block-wise VQ-attention of flat blocks through the Triton kernels, differentiable w.r.t. query, key, value, bias
    and memory_sums (the codebook is read as a constant).

    query, key (B*n, C, Z); value (B*n, C, H); key_mask (B*n, C) bool; bias (C, W) (any extra mask is the kernel's:
    causal visibility, key_mask, blocks outside a batch row of `num_blocks` blocks); codebook (S, Z); memory_counts
    (B*n, S); memory_sums (B*n, S, H) (S may be 0: the window only). Query, keys and codebook are cast to the query's
    dtype, or under autocast, like the values, to the autocast dtype (as the PyTorch path's matmuls run); softmax
    statistics, bias and memory in float32. Returns (B*n, C, H) in the values' dtype.
    """
    device = query.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else query.dtype
    out, _ = _attention_forward(
        query.to(dtype).contiguous(), key.to(dtype).contiguous(),
        value.to(dtype if autocast else value.dtype).contiguous(), key_mask.to(torch.int8).contiguous(),
        bias.float().contiguous(), codebook.detach().to(dtype).contiguous(), memory_counts.float().contiguous(),
        memory_sums.float().contiguous(), num_blocks, not bidirectional,
    )  # fmt: skip
    return out
