# Copyright 2026 The LongVQ Authors. Licensed under the Apache License, Version 2.0.
"""LongVQ model configuration.

This file is copied into Hub checkpoints as remote code: it imports only the standard library and transformers.
"""

from transformers import PreTrainedConfig

NORMALIZATION_TYPES = ("layernorm", "scalenorm", "rmsnorm", "batchnorm")
RELATIVE_POSITIONAL_BIASES = ("simple", "rotary")
CLASSIFIER_POOLINGS = ("mean", "last")

# The `auto_map` every saved LongVQ config carries: the remote-code class of each Auto class, so that a checkpoint
# written by `save_pretrained` / `push_to_hub` (which copy this file and modeling_longvq.py next to the weights) loads
# with `trust_remote_code=True` where the longvq package is not installed, through any of the heads.
AUTO_MAP = {
    "AutoConfig": "configuration_longvq.LongVQConfig",
    "AutoModel": "modeling_longvq.LongVQModel",
    "AutoModelForCausalLM": "modeling_longvq.LongVQForCausalLM",
    "AutoModelForSequenceClassification": "modeling_longvq.LongVQForSequenceClassification",
}


class LongVQConfig(PreTrainedConfig):
    r"""
    Configuration of a LongVQ model: MEGA-style blocks (damped EMA + gated attention + normalized FFN) whose attention
    keys are vector-quantized, so exact softmax attention over the whole past costs O(T) and decoding carries a
    constant-size state.

    Args:
        vocab_size (`int`, defaults to 32000): number of token ids.
        hidden_size (`int`, defaults to 512): model width D.
        num_hidden_layers (`int`, defaults to 8): number of LongVQ blocks.
        intermediate_size (`int`, defaults to 1024): attention value width H (also the FFN width unless
            `ffn_hidden_size` is given).
        shared_representation_size (`int`, defaults to 128): width Z of the shared query/key representation.
        ema_projection_size (`int`, defaults to 16): EMA expansion N (state size per channel).
        codebook_size (`int`, defaults to 256): number of codewords S per layer.
        chunk_size (`int`, defaults to 256): block length C of the VQ-attention; the exact-position window is the
            current and previous block (plus the next one when bidirectional).
        bidirectional (`bool`, defaults to `False`): non-causal EMA and attention, for encoders/classifiers.
        normalization_type (`str`, defaults to `"layernorm"`): one of `layernorm`, `scalenorm`, `rmsnorm`,
            `batchnorm` (batch statistics see future tokens, so not for causal language models).
        normalize_before (`bool`, defaults to `True`): pre-norm (True) or post-norm (False) blocks.
        hidden_dropout (`float`, defaults to 0.0): dropout on attention values and the FFN hidden layer.
        attention_dropout (`float`, defaults to 0.0): dropout on attention weights.
        dropout (`float`, defaults to 0.0): dropout on embeddings, EMA output and block outputs.
        relative_positional_bias (`str`, defaults to `"simple"`): `simple` (one learned scalar per offset) or
            `rotary` (MEGA's rotary bias); applied inside the window only, so there is no maximum length.
        segment_length (`int`, *optional*, defaults to 4096): a causal forward without a decoding state (training,
            scoring) of more tokens than this runs in exact pieces of this many tokens (rounded down to a multiple of
            `chunk_size`) that carry the recurrent state from one to the next, so no activation grows with the input
            length; with activation checkpointing on, each (piece, layer) is one checkpoint, so training keeps only
            the layers' inputs and recomputes one piece of one layer at a time. `None` runs every input whole.
        codebook_memory (`bool`, defaults to `True`): attend to the codebook memory (every key outside the window,
            grouped by code). `False` keeps the chunk-local window only: the MEGA-chunk ablation of LongVQ, whose
            queries cannot see further back than the previous block.
        truncation (`int`, *optional*): cap on the EMA kernel length; only for `bidirectional=True` because a
            truncated kernel has no exact recurrence for decoding.
        vq_commitment_weight (`float`, defaults to 1e-4): weight of the commitment loss added to the training loss.
        codebook_ema_decay (`float`, defaults to 0.99): decay of the exponential-moving-average k-means that learns
            the codebooks.
        codebook_restart_threshold (`float`, defaults to 0.5): after each training update, a code whose EMA token
            count has fallen below this value is dead and is re-seeded with a random key of the current batch (the
            same on every process); 0 disables restarts. Without restarts the codebooks collapse early in training
            (byte-level LM, 4 layers, 64 codes: 8% of the codes in use and one code per layer in the top layers
            after 150 steps; 90% in use with restarts, at the same loss; docs/quality.md).
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of linear layers.
        norm_eps (`float`, defaults to 1e-5): epsilon of the normalisation layers.
        ffn_hidden_size (`int`, *optional*): width of the normalized FFN, defaults to `intermediate_size`.
        input_dim (`int`, *optional*): when set, continuous inputs of this many features per step (pixel channels,
            raw audio samples) are passed as `inputs_embeds` of shape `(batch, length, input_dim)` and encoded by a
            linear layer instead of being looked up in the token embedding.
        use_cache (`bool`, defaults to `True`): return the decoding state (`LongVQCache`).
        tie_word_embeddings (`bool`, defaults to `True`): share the token embedding with the LM head.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids.
        classifier_pooling (`str`, defaults to `"mean"`): `mean` over non-padded tokens or the `last` non-padded
            token, for `LongVQForSequenceClassification`.
        classifier_dropout (`float`, *optional*): dropout before the classifier, defaults to `dropout`.

    Example:

    ```python
    >>> from longvq import LongVQConfig, LongVQForCausalLM
    >>> config = LongVQConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, chunk_size=64)
    >>> model = LongVQForCausalLM(config)
    ```
    """

    model_type = "longvq"
    # Written with an explicit, typed `__init__` and `validate_*` methods rather than class-level dataclass fields:
    # this file runs as remote code on every supported transformers 5.x, and before 5.4 the config base class is not
    # a dataclass.
    _auto_class = "AutoConfig"  # save_pretrained copies this file next to config.json (remote code)
    # Trainer drops these output fields before gathering predictions (the decoding state is `past_key_values` before
    # transformers 5.24 and `cache` since).
    keys_to_ignore_at_inference = ["past_key_values", "cache", "commitment_loss", "codebook_usage", "codebook_perplexity"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        intermediate_size: int = 1024,
        shared_representation_size: int = 128,
        ema_projection_size: int = 16,
        codebook_size: int = 256,
        chunk_size: int = 256,
        bidirectional: bool = False,
        normalization_type: str = "layernorm",
        normalize_before: bool = True,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        relative_positional_bias: str = "simple",
        codebook_memory: bool = True,
        segment_length: int | None = 4096,
        truncation: int | None = None,
        vq_commitment_weight: float = 1e-4,
        codebook_ema_decay: float = 0.99,
        codebook_restart_threshold: float = 0.5,
        initializer_range: float = 0.02,
        norm_eps: float = 1e-5,
        ffn_hidden_size: int | None = None,
        input_dim: int | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        classifier_pooling: str = "mean",
        classifier_dropout: float | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.shared_representation_size = shared_representation_size
        self.ema_projection_size = ema_projection_size
        self.codebook_size = codebook_size
        self.chunk_size = chunk_size
        self.bidirectional = bidirectional
        self.normalization_type = normalization_type
        self.normalize_before = normalize_before
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.relative_positional_bias = relative_positional_bias
        self.codebook_memory = codebook_memory
        self.segment_length = segment_length
        self.truncation = truncation
        self.vq_commitment_weight = vq_commitment_weight
        self.codebook_ema_decay = codebook_ema_decay
        self.codebook_restart_threshold = codebook_restart_threshold
        self.initializer_range = initializer_range
        self.norm_eps = norm_eps
        self.ffn_hidden_size = ffn_hidden_size
        self.input_dim = input_dim
        # Declared explicitly: transformers 5 strips `use_cache` from **kwargs as a generation parameter.
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.classifier_pooling = classifier_pooling
        self.classifier_dropout = classifier_dropout
        self.validate_longvq()
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    def validate_longvq(self):
        """Every LongVQ check, run when the config is built; each raises `ValueError` naming the field."""
        self.validate_sizes()
        self.validate_choices()
        self.validate_rates()
        self.validate_cross_fields()

    def validate_sizes(self):
        """Widths, depths and lengths are positive integers; the codebook has at least two codes."""
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "shared_representation_size",
            "ema_projection_size", "chunk_size",
        )  # fmt: skip
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("codebook_size", self.codebook_size, minimum=2)
        for name in ("ffn_hidden_size", "input_dim", "truncation", "segment_length"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)

    def validate_choices(self):
        """Flags are bools; named options are among their allowed values."""
        for name in ("bidirectional", "codebook_memory", "normalize_before", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        _check_choice("normalization_type", self.normalization_type, NORMALIZATION_TYPES)
        _check_choice("relative_positional_bias", self.relative_positional_bias, RELATIVE_POSITIONAL_BIASES)
        _check_choice("classifier_pooling", self.classifier_pooling, CLASSIFIER_POOLINGS)

    def validate_rates(self):
        """Dropouts are probabilities, decays in [0, 1), weights and thresholds non-negative, scales positive."""
        for name in ("hidden_dropout", "attention_dropout", "dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")
        if not (isinstance(self.vq_commitment_weight, (int, float)) and self.vq_commitment_weight >= 0):
            raise ValueError(f"`vq_commitment_weight` must be >= 0, got {self.vq_commitment_weight!r}.")
        if not (isinstance(self.codebook_ema_decay, (int, float)) and 0.0 <= self.codebook_ema_decay < 1.0):
            raise ValueError(f"`codebook_ema_decay` must be in [0, 1), got {self.codebook_ema_decay!r}.")
        if not (isinstance(self.codebook_restart_threshold, (int, float)) and self.codebook_restart_threshold >= 0):
            raise ValueError(f"`codebook_restart_threshold` must be >= 0, got {self.codebook_restart_threshold!r}.")
        for name in ("initializer_range", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`{name}` must be > 0, got {value!r}.")

    def validate_cross_fields(self):
        """Fields that constrain each other."""
        if self.relative_positional_bias == "rotary" and self.shared_representation_size % 2:
            raise ValueError(
                "`shared_representation_size` must be even with relative_positional_bias='rotary', "
                f"got {self.shared_representation_size}."
            )
        if self.truncation is not None and not self.bidirectional:
            raise ValueError(
                f"`truncation` ({self.truncation}) requires bidirectional=True: a truncated EMA kernel has no exact "
                "step recurrence, so a causal model could not decode what it was trained on."
            )

def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")


__all__ = ["AUTO_MAP", "LongVQConfig"]
