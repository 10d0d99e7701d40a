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

from .ops_longvq import VQAttentionState

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
    """What every layer of one single-token decoding step shares, computed once per step by `LongVQCache.plan`."""

    rows: torch.Tensor  # (B,) 0..B-1
    slot: torch.Tensor  # (B,) position of the new token inside its block
    real: torch.Tensor  # (B,) bool, the new token is not padding
    all_real: bool
    starts_block: torch.Tensor  # (B,) bool, a real token at slot 0: the window moves on by one block
    any_starts_block: bool


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

    A decoding step attends over it as it is stored (`ops_longvq.vq_attention_step`); a block-parallel call (prefill)
    takes it as a `LongVQLayerCarry` (`carry`) and gives back the state after its tokens (`store`). The joint layout
    is kept for the steps, which are most of decoding: building it from the carry's window and memory at every step
    would copy the 2C + S value rows of every layer once per token (measured for C = S = 256, H = 512, one thread:
    0.32 ms per layer per step, about a quarter of a 4-layer model's ~5.5 ms decoding step).

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

    def carry(self, codebook: torch.Tensor, positions: torch.Tensor):
        """The state as a block-parallel call continues it, a `LongVQLayerCarry` (both parts None before the first
        tokens): the window's keys are the codewords of its codes; memory sums come from the stored means, in
        >= float32 (bf16 holds integers exactly only up to 256)."""
        if self.ema is None:
            return LongVQLayerCarry()
        codes, values, mask = self.window()
        counts, means = self.memory()
        sums = means.to(torch.promote_types(means.dtype, torch.float32)) * counts.unsqueeze(-1)
        attention = VQAttentionState(F.embedding(codes, codebook), codes, values, mask, counts, sums, positions)
        return LongVQLayerCarry(self.ema, attention)

    def store(self, ema: torch.Tensor, attention: VQAttentionState):
        """Take the state after a block-parallel call: the EMA state, and the window and memory of the VQ-attention
        state into the joint layout (created on the first call, on the state's device)."""
        if not self.is_initialized:
            self.lazy_initialization(attention.codes, attention.values)
        self.ema = ema
        self.set_window(attention.codes, attention.values, attention.mask)
        means = attention.memory_sums / attention.memory_counts.clamp(min=1).unsqueeze(-1).to(attention.memory_sums.dtype)
        self.set_memory(attention.memory_counts, means)

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
