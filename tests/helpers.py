"""Small shared builders for the tests."""

from longvq import LongVQConfig


def tiny_config(**overrides) -> LongVQConfig:
    """A tiny `LongVQConfig` (D=32, 2 layers, H=64, Z=16, N=4, S=8, C=4, vocab 50) with `overrides` applied."""
    values = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, intermediate_size=64, shared_representation_size=16,
        ema_projection_size=4, codebook_size=8, chunk_size=4,
    )  # fmt: skip
    values.update(overrides)
    return LongVQConfig(**values)
