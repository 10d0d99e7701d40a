"""Small shared builders for the tests."""

from longvq import LongVQConfig


def tiny_config(**overrides) -> LongVQConfig:
    values = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, intermediate_size=64, shared_representation_size=16,
        ema_projection_size=4, codebook_size=8, chunk_size=4,
    )  # fmt: skip
    values.update(overrides)
    return LongVQConfig(**values)
