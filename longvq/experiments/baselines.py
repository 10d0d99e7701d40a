"""The models LongVQ is compared with, in one registry (`BASELINES`) that the experiments (`longvq-train`,
`longvq-compare`) and the benchmark (`longvq-benchmark`) both build from.

A baseline is built from the LongVQ model it is compared with, its `Reference` (the LongVQ config, the head and the
longest sequence), freshly initialised (seed first, e.g. with `transformers.set_seed`):

- `llama`: a Hugging Face Llama (`LlamaForCausalLM` / `LlamaForSequenceClassification`, SDPA attention) with the
  reference's depth, vocabulary, padding id and labels, its width and FFN size chosen so that its parameter count
  matches the reference LongVQ's (`llama_config`). Continuous inputs (`inputs_embeds` of shape (B, T, input_dim),
  `config.input_dim` set) go through the same linear input encoder as LongVQ's
  (`LlamaForSequenceClassificationWithInputEncoder`), so both models read the same numbers. Llama pools the last
  real token for classification (its own convention, it is causal); LongVQ mean-pools like MEGA.
- `mega_chunk`: the reference with `codebook_memory=False`: attention sees the current and neighbouring chunk only
  (the MEGA-chunk ablation); the EMA still carries information across chunks. Same parameters as the reference.
- `mamba`: a Hugging Face Mamba (`MambaForCausalLM`, state 16, expansion 2) with the reference's width, depth and
  vocabulary; causal LM only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MambaConfig,
    MambaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from ..configuration_longvq import LongVQConfig
from ..modeling_longvq import LongVQForCausalLM, LongVQForSequenceClassification

LONGVQ_CLASSES = {"causal_lm": LongVQForCausalLM, "sequence_classification": LongVQForSequenceClassification}
HEADS = tuple(LONGVQ_CLASSES)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once; codebook buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Reference:
    """The LongVQ model a baseline is compared with: its config, its head (`causal_lm` or `sequence_classification`)
    and the longest sequence the models will see."""

    config: LongVQConfig
    head: str
    max_length: int

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"Unknown head {self.head!r}; choose one of {', '.join(HEADS)}.")

    def longvq(self) -> PreTrainedModel:
        """The reference LongVQ model itself, freshly initialised."""
        return LONGVQ_CLASSES[self.head](self.config)


def longvq_class(head: str, input_dim: int | None) -> type[PreTrainedModel]:
    """The LongVQ class of `head`; every LongVQ head reads token ids and continuous inputs alike."""
    return LONGVQ_CLASSES[head]


def mega_chunk_config(reference: Reference) -> LongVQConfig:
    """The reference config without codebook memory (the MEGA-chunk ablation)."""
    config = copy.deepcopy(reference.config)
    config.codebook_memory = False
    return config


class LlamaForSequenceClassificationWithInputEncoder(LlamaForSequenceClassification):
    """`LlamaForSequenceClassification` reading continuous inputs through LongVQ's linear input encoder:
    `inputs_embeds` of shape (B, T, input_dim) (or (B, T) when input_dim is 1) go through `input_projection`
    (input_dim -> hidden_size) before the decoder, exactly as `LongVQModel` encodes them. `config.input_dim` must be
    set."""

    def __init__(self, config):
        super().__init__(config)
        self.input_projection = nn.Linear(config.input_dim, config.hidden_size)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        if inputs_embeds is not None:
            if inputs_embeds.dim() == 2:
                inputs_embeds = inputs_embeds.unsqueeze(-1)
            inputs_embeds = self.input_projection(inputs_embeds.to(self.input_projection.weight.dtype))
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, **kwargs)  # fmt: skip


def llama_class(head: str, input_dim: int | None) -> type[PreTrainedModel]:
    """The Llama class of `head`, with the input encoder for continuous inputs (classification only)."""
    if head == "sequence_classification":
        return LlamaForSequenceClassificationWithInputEncoder if input_dim else LlamaForSequenceClassification
    if input_dim:
        raise ValueError("The Llama baseline reads continuous inputs for classification only.")
    return LlamaForCausalLM


def _llama_fields(reference: Reference, hidden: int, intermediate: int) -> dict:
    config = reference.config
    head_dim = 16 if hidden < 256 else 64
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": hidden // head_dim,
        "head_dim": head_dim,
        "max_position_embeddings": max(4096, 2 * reference.max_length),
        "attention_dropout": float(config.attention_dropout),
        "tie_word_embeddings": True,
        "pad_token_id": config.pad_token_id,
        "num_labels": config.num_labels,
        "input_dim": config.input_dim,
        "use_cache": False,
        "bos_token_id": None,  # no special tokens in these tasks (and none exist for continuous inputs)
        "eos_token_id": None,
    }


def llama_config(reference: Reference) -> LlamaConfig:
    """A `LlamaConfig` with the reference's depth whose parameter count is as close as possible to the reference
    LongVQ's.

    The width is the multiple of 16 (heads of 16 dims; 64 from width 256) whose standard SwiGLU FFN (8/3 x width)
    lands nearest the target; the FFN width is then adjusted in steps of 8 to close the remaining gap."""
    model_class = llama_class(reference.head, reference.config.input_dim)
    with torch.device("meta"):
        target = count_parameters(reference.longvq())

    def count(hidden, intermediate):
        with torch.device("meta"):
            return count_parameters(model_class(LlamaConfig(**_llama_fields(reference, hidden, intermediate))))

    def round8(x):
        return max(8, round(x / 8.0) * 8)

    best = None
    for hidden in range(16, 2049, 16):
        if hidden >= 256 and hidden % 64:
            continue
        n = count(hidden, round8(8 * hidden / 3))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (hidden, n)
        if n > 2 * target:
            break
    hidden = best[0]
    # Each FFN unit costs 3 x hidden x layers parameters: solve for the FFN width, then take the best neighbour.
    layers = reference.config.num_hidden_layers
    ideal = round8(8 + (target - count(hidden, 8)) / (3 * hidden * layers))
    intermediate = min((max(8, ideal + delta) for delta in (-8, 0, 8)), key=lambda m: abs(count(hidden, m) - target))
    config = LlamaConfig(**_llama_fields(reference, hidden, intermediate))
    config._attn_implementation = "sdpa"
    return config


def mamba_class(head: str, input_dim: int | None) -> type[PreTrainedModel]:
    """`MambaForCausalLM`: the Mamba baseline is a causal LM on token ids only."""
    if head != "causal_lm" or input_dim:
        raise ValueError("The Mamba baseline is a causal LM on token ids only.")
    return MambaForCausalLM


def mamba_config(reference: Reference) -> MambaConfig:
    """A `MambaConfig` with the reference's width, depth and vocabulary, state size 16 (expansion 2, the default)."""
    config = reference.config
    return MambaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       num_hidden_layers=config.num_hidden_layers, state_size=16)  # fmt: skip


@dataclass(frozen=True)
class Baseline:
    """An entry of `BASELINES`: its label, its class per head and input kind (`model_class(head, input_dim)`), its
    config for a `Reference`, and the attention implementation to load it with (None: the class's default)."""

    label: str
    model_class: Callable[[str, int | None], type[PreTrainedModel]]
    config: Callable[[Reference], PretrainedConfig]
    attn_implementation: str | None = None

    def build(self, reference: Reference) -> PreTrainedModel:
        """A freshly initialised baseline for `reference`."""
        return self.model_class(reference.head, reference.config.input_dim)(self.config(reference))

    def load(self, checkpoint: str, head: str, input_dim: int | None) -> PreTrainedModel:
        """The baseline saved in `checkpoint` (with `save_pretrained`)."""
        implementation = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        return self.model_class(head, input_dim).from_pretrained(checkpoint, **implementation)


BASELINES: dict[str, Baseline] = {
    "llama": Baseline("Llama", llama_class, llama_config, attn_implementation="sdpa"),
    "mega_chunk": Baseline("MEGA-chunk", longvq_class, mega_chunk_config),
    "mamba": Baseline("Mamba", mamba_class, mamba_config),
}


def build_baseline(name: str, reference: Reference) -> PreTrainedModel:
    """`BASELINES[name].build(reference)`; ValueError naming the baselines for an unknown `name`."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose one of {', '.join(BASELINES)}.")
    return BASELINES[name].build(reference)


__all__ = [
    "BASELINES", "HEADS", "LONGVQ_CLASSES", "Baseline", "LlamaForSequenceClassificationWithInputEncoder", "Reference",
    "build_baseline", "count_parameters", "llama_class", "llama_config", "longvq_class", "mamba_class",
    "mamba_config", "mega_chunk_config",
]  # fmt: skip
