# Copyright 2026 The LongVQ Authors. Licensed under the Apache License, Version 2.0.
"""LongVQ's decoding state: `LongVQCache`, a transformers `Cache` of one `LongVQLayerState` (a `CacheLayerMixin`) per
layer, whose size depends on the batch and the config only, never on the number of tokens seen.

Copied into Hub checkpoints beside `modeling_longvq.py` (which imports it): standard library, torch and transformers
only.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .ops_longvq import EMPTY_LOGIT, VQAttentionState, code_value_sums, memory_logit_offsets

# The name of the decoding state in forward()/generate() arguments and in model outputs: transformers 5.24 renamed it
# from `past_key_values` to `cache` (outputs keep a deprecated alias). Arguments accept both names; outputs and
# generate()'s model kwargs use the installed version's.
CACHE_NAME = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


def _cache_argument(cache, past_key_values):
    """The decoding state passed under either name (`cache` since transformers 5.24, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the decoding state once, as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


@dataclass
class LongVQLayerCarry:
    """What a layer carries from one block-parallel call to the next (a prefill continued by a later one, or one
    piece of a long input by the next): its EMA state (B, D, N) float32 and its VQ-attention state, both None before
    the first tokens. Tensors keep their autograd history, so gradients cross pieces."""

    ema: torch.Tensor | None = None
    attention: VQAttentionState | None = None


@dataclass
class LongVQDecodePlan:
    """What every layer of one single-token decoding step shares, computed once per step by `LongVQCache.plan`:
    tensors only, so a step neither synchronises with the host nor branches on values (it can be compiled whole or
    captured as a CUDA graph).

    The window's 2C slots are a ring of two halves: block n lives in half n % 2, so a new block overwrites the block
    before the previous one, one slot per step, instead of shifting the window."""

    rows: torch.Tensor  # (B,) 0..B-1
    real: torch.Tensor  # (B,) bool, the new token is not padding
    write: torch.Tensor  # (B,) the window slot of the new token: C * (its block % 2) + its position in the block
    offsets: torch.Tensor  # (B, 2C) long, i - j from the new token to each window slot's token (0 outside the window)
    in_window: torch.Tensor  # (B, 2C) bool, the slot's token is in the new token's window (see `LongVQLayerState`)


def _last_block_is_even(positions: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B,) bool: the block of each row's last token (of `positions[b]` tokens seen) is even, so in the ring of
    window halves it is the first half."""
    return (positions - 1).clamp(min=0) // chunk_size % 2 == 0


def _swap_halves_where(t: torch.Tensor, swap: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """t (B, 2C, ...) with its two halves of C slots swapped in the rows where `swap` (B,) bool is True."""
    return torch.where(swap.view(-1, *([1] * (t.dim() - 1))), t.roll(chunk_size, 1), t)


# The config fields that fix the shapes of a `LongVQCache`; a cache must agree with the model on all of them.
_CACHE_SHAPE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "ema_projection_size", "codebook_size", "chunk_size",
    "codebook_memory",
)  # fmt: skip

_NO_ROLLBACK = (
    "LongVQCache is a recurrent state: it cannot be cropped or rolled back, so assisted, prompt-lookup and "
    "speculative decoding are not supported."
)


def _static_address(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a state tensor that decoding steps update in place as living at a fixed address, so that a compiled step
    captured as a CUDA graph reads and writes it where it is (as transformers' StaticCache does); eager mode only."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


class LongVQLayerState(CacheLayerMixin):
    """One layer's decoding state, a transformers cache layer whose size depends on the batch and the config only,
    never on the number of tokens seen.

    A decoding step attends over it as it is stored and updates it in place (`ops_longvq.vq_attention_step`); a
    block-parallel call (prefill) takes it as a `LongVQLayerCarry` (`carry`) and gives back the state after its
    tokens (`store`). The joint layout is kept for the steps, which are most of decoding: building it from the carry's
    window and memory at every step would copy the 2C + S value rows of every layer once per token (measured for
    C = S = 256, H = 512, one thread: 0.32 ms per layer per step, about a quarter of a 4-layer model's ~5.5 ms decoding
    step).

    Stored in the joint layout the decode step attends over, 2C window slots followed by S memory entries:
      - keys (B, 2C + S) long: the key of every slot as its code (a quantized key is the codeword it names), then the
        memory's codes 0..S-1;
      - values (B, 2C + S, H): the window slots' values, then the memory's per-code value means;
      - logit_offsets (B, 2C + S) float32: 0 for a filled window slot, log N_s for a memory code with N_s > 0,
        and a huge negative number for empty entries;
      - memory_counts (B, S) float32: per-code token counts N_s of the tokens folded into the memory;
      - ema (B, D, N) float32: the EMA recurrence state.
    The window slots are a ring of two halves of C slots: block n's tokens live in half n % 2. The token at position
    s of block n overwrites slot s of its half, which held the token at position s of block n - 2; that token is
    folded into its code's count and mean in the same step. So after the step the half holds block n up to the token,
    and in its later slots the rest of block n - 2, which belongs to the memory: the step attends to those slots like
    memory entries (no positional bias; `LongVQDecodePlan.in_window` is False there). One token is folded per step, so
    every step does the same work, and no block is ever shifted.

    Every tensor is allocated once, on the first tokens, and only written in place afterwards (also `seen_tokens`, a
    tensor), which is what lets a compiled decoding step run as a CUDA graph.
    """

    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False  # the shapes come from the config, not from key/value states
    state_names = ("keys", "values", "logit_offsets", "memory_counts", "ema")

    def __init__(self, config):
        super().__init__()
        self.chunk_size = config.chunk_size
        self.window_size = 2 * config.chunk_size
        self.codebook_size = config.codebook_size
        self.value_size = config.intermediate_size
        self.ema_shape = (config.hidden_size, config.ema_projection_size)
        self.logit_offsets = self.memory_counts = self.ema = self.seen_tokens = None
        self.device = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """An empty state for the batch, device and dtype of the first tokens' codes (B, T) and values (B, T, H)."""
        batch, device = key_states.shape[0], key_states.device
        size = self.window_size + self.codebook_size
        self.keys = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.keys[:, self.window_size :] = torch.arange(self.codebook_size, device=device)
        self.values = torch.zeros(batch, size, self.value_size, device=device, dtype=value_states.dtype)
        self.logit_offsets = torch.full((batch, size), EMPTY_LOGIT, device=device)
        self.memory_counts = torch.zeros(batch, self.codebook_size, device=device)
        self.ema = torch.zeros(batch, *self.ema_shape, device=device)
        self.seen_tokens = torch.zeros((), dtype=torch.long, device=device)
        for tensor in (*self.tensors(), self.seen_tokens):
            _static_address(tensor)
        self.device = device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "A LongVQ layer state is updated by the VQ-attention ops, not by `update`: it keeps a constant-size window "
            "and codebook memory, never the key/value history that `update` returns."
        )

    def get_seq_length(self) -> int:
        return int(self.seen_tokens) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.13, abstract there

    def _window_in_block_order(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ring's two halves as [block before the last token's | the last token's block] (a swap of the halves
        where that block is even): codes (B, 2C), values (B, 2C, H), filled (B, 2C) bool. Swapping is its own
        inverse, so `store` uses it the other way round."""
        w = self.window_size
        return tuple(
            _swap_halves_where(t, _last_block_is_even(positions, self.chunk_size), self.chunk_size)
            for t in (self.keys[:, :w], self.values[:, :w], self.logit_offsets[:, :w] >= 0)
        )

    def carry(self, codebook: torch.Tensor, positions: torch.Tensor):
        """The state as a block-parallel call continues it after each row's `positions[b]` tokens, a
        `LongVQLayerCarry` (both parts None before the first tokens): the window's keys are the codewords of its codes;
        the memory adds the ring's unfolded slots to the stored counts and means, as sums in >= float32 (bf16 holds
        integers exactly only up to 256)."""
        if not self.is_initialized:
            return LongVQLayerCarry()
        codes, values, filled = self._window_in_block_order(positions)
        last_slot = self.chunk_size + (positions - 1) % self.chunk_size  # in the window, in block order
        unfolded = filled & (torch.arange(self.window_size, device=codes.device) > last_slot[:, None])
        counts, sums = code_value_sums(codes, values, unfolded, self.codebook_size)
        means = self.values[:, self.window_size :]
        sums = sums + means.to(sums.dtype) * self.memory_counts.unsqueeze(-1)
        attention = VQAttentionState(
            F.embedding(codes, codebook), codes, values, filled & ~unfolded, self.memory_counts + counts, sums,
            positions,
        )  # fmt: skip
        return LongVQLayerCarry(self.ema, attention)

    def store(self, ema: torch.Tensor, attention: VQAttentionState):
        """Take the state after a block-parallel call, written in place (allocated on the first call, on the
        state's device): the EMA state, and the window and memory of the VQ-attention state into the joint layout."""
        if not self.is_initialized:
            self.lazy_initialization(attention.codes, attention.values)
        w = self.window_size
        swap = _last_block_is_even(attention.positions, self.chunk_size)
        self.ema.copy_(ema)
        self.keys[:, :w] = _swap_halves_where(attention.codes, swap, self.chunk_size)
        self.values[:, :w] = _swap_halves_where(attention.values, swap, self.chunk_size)
        self.logit_offsets[:, :w] = torch.where(_swap_halves_where(attention.mask, swap, self.chunk_size), 0.0, EMPTY_LOGIT)
        counts = attention.memory_counts
        self.memory_counts.copy_(counts)
        self.values[:, w:] = attention.memory_sums / counts.clamp(min=1).unsqueeze(-1).to(attention.memory_sums.dtype)
        self.logit_offsets[:, w:] = memory_logit_offsets(counts)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.state_names if getattr(self, name) is not None]

    def _map(self, fn):
        for name in self.state_names:
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for tensor in self.tensors():  # in place: the tensors keep their addresses
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

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
        for name in (*self.state_names, "seen_tokens"):
            setattr(self, name, None)
        self.is_initialized = False

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

    is_compileable = True
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
        self.positions = _static_address(torch.zeros(batch_size, dtype=torch.long, device=device))

    def plan(self, mask: torch.Tensor) -> LongVQDecodePlan:
        """The shared bookkeeping of a single-token decoding step; mask: (B,) bool, True for a real token."""
        chunk_size, device = self.config.chunk_size, mask.device
        positions = self.positions.to(device)
        slot, half = (positions % chunk_size)[:, None], (positions // chunk_size % 2)[:, None]
        window_slots = torch.arange(2 * chunk_size, device=device)
        slot_half, slot_position = window_slots // chunk_size, window_slots % chunk_size
        same_half = slot_half == half  # the new token's block, and after its position the block before the previous
        in_window = ~same_half | (slot_position <= slot)
        offsets = torch.where(same_half, slot - slot_position, chunk_size + slot - slot_position)
        return LongVQDecodePlan(
            rows=torch.arange(mask.shape[0], device=device), real=mask, write=(half * chunk_size + slot)[:, 0],
            offsets=offsets.clamp(min=0), in_window=in_window,
        )  # fmt: skip

    def advance(self, lengths: torch.Tensor, columns: int):
        """Record, in place, that row b moved `lengths[b]` block positions (its real tokens) and the input had
        `columns` columns."""
        self.positions.add_(lengths.to(self.positions.device))
        for layer in self.layers:
            layer.seen_tokens.add_(columns)

    def reset(self):
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int):
        raise ValueError(_NO_ROLLBACK)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions.copy_(self.positions.index_select(0, beam_idx.to(self.positions.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices.to(self.positions.device)]
