"""LongVQConfig: defaults, serialisation round trips, validation errors that name the field, Auto* registration."""

import json

import pytest
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

import longvq  # noqa: F401  (registers the Auto* classes)
from longvq import (
    LongVQConfig,
    LongVQForCausalLM,
    LongVQForSequenceClassification,
    LongVQModel,
)


def _comparable(config):
    values = config.to_dict()
    values.pop("transformers_version", None)
    values.pop("_name_or_path", None)  # records where it was loaded from
    return values


# A config far from the defaults, so a field that is dropped or renamed on the way would show.
NON_DEFAULT = dict(
    relative_positional_bias="rotary",
    normalization_type="rmsnorm",
    normalize_before=False,
    bidirectional=True,
    truncation=7,
    hidden_dropout=0.1,
    attention_dropout=0.2,
    dropout=0.05,
    vq_commitment_weight=0.25,
    codebook_ema_decay=0.9,
    initializer_range=0.03,
    norm_eps=1e-6,
    ffn_hidden_size=48,
    input_dim=3,
    use_cache=False,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    classifier_pooling="last",
    classifier_dropout=0.3,
    num_labels=3,
)


def test_defaults_construct_and_match_the_documentation():
    config = LongVQConfig()
    assert config.model_type == "longvq"
    expected = dict(
        vocab_size=32000, hidden_size=512, num_hidden_layers=8, intermediate_size=1024, shared_representation_size=128,
        ema_projection_size=16, codebook_size=256, chunk_size=256, bidirectional=False, normalization_type="layernorm",
        normalize_before=True, relative_positional_bias="simple", truncation=None, use_cache=True,
        tie_word_embeddings=True, pad_token_id=None, classifier_pooling="mean", classifier_dropout=None,
    )  # fmt: skip
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_tiny_config_fixture_applies_overrides(tiny_config):
    config = tiny_config(chunk_size=8)
    assert config.hidden_size == 32 and config.chunk_size == 8 and config.codebook_size == 8


def test_json_string_round_trip_is_lossless(tiny_config):
    config = tiny_config(**NON_DEFAULT)
    restored = LongVQConfig.from_dict(json.loads(config.to_json_string()))
    assert _comparable(restored) == _comparable(config)


def test_json_file_round_trip_is_lossless(tiny_config, tmp_path):
    config = tiny_config(**NON_DEFAULT)
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert _comparable(LongVQConfig.from_json_file(path)) == _comparable(config)


@pytest.mark.parametrize("overrides", [{}, NON_DEFAULT], ids=["tiny", "non_default"])
def test_save_pretrained_round_trip_is_lossless(tiny_config, tmp_path, overrides):
    config = tiny_config(**overrides)
    config.save_pretrained(tmp_path)
    restored = LongVQConfig.from_pretrained(tmp_path)
    assert isinstance(restored, LongVQConfig)
    assert _comparable(restored) == _comparable(config)
    via_auto = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(via_auto, LongVQConfig)
    assert _comparable(via_auto) == _comparable(config)


@pytest.mark.parametrize(
    "name, value",
    [
        ("use_cache", False),
        ("use_cache", True),
        ("tie_word_embeddings", False),
        ("tie_word_embeddings", True),
        ("pad_token_id", 0),
        ("pad_token_id", 7),
        ("pad_token_id", None),
    ],
)
def test_generation_and_tying_fields_survive_the_round_trip(tiny_config, tmp_path, name, value):
    """transformers 5 treats these specially (generation parameters / tying); they must not be dropped or reset."""
    config = tiny_config(**{name: value})
    assert getattr(config, name) == value
    assert getattr(LongVQConfig.from_dict(json.loads(config.to_json_string())), name) == value
    config.save_pretrained(tmp_path)
    assert getattr(LongVQConfig.from_pretrained(tmp_path), name) == value
    with open(tmp_path / "config.json") as f:
        assert json.load(f).get(name) == value


def test_fields_survive_a_model_round_trip(tiny_config, tmp_path):
    config = tiny_config(use_cache=False, tie_word_embeddings=False, pad_token_id=3, relative_positional_bias="rotary")
    LongVQForCausalLM(config).save_pretrained(tmp_path)
    loaded = LongVQForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.use_cache is False
    assert loaded.config.tie_word_embeddings is False
    assert loaded.config.pad_token_id == 3
    assert loaded.config.relative_positional_bias == "rotary"
    assert loaded.model.embed_tokens.padding_idx == 3


# (overrides, field the message must name)
INVALID = [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=-1), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(chunk_size=True), "chunk_size"),
    (dict(codebook_size=1), "codebook_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(shared_representation_size=0), "shared_representation_size"),
    (dict(ema_projection_size=0), "ema_projection_size"),
    (dict(ffn_hidden_size=0), "ffn_hidden_size"),
    (dict(input_dim=0), "input_dim"),
    (dict(normalization_type="groupnorm"), "normalization_type"),
    (dict(relative_positional_bias="alibi"), "relative_positional_bias"),
    (dict(relative_positional_bias="rotary", shared_representation_size=15), "shared_representation_size"),
    (dict(dropout=-0.1), "dropout"),
    (dict(hidden_dropout=-0.1), "hidden_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(dropout=1.0), "dropout"),
    (dict(hidden_dropout=1.5), "hidden_dropout"),
    (dict(classifier_dropout=-0.1), "classifier_dropout"),
    (dict(vq_commitment_weight=-1e-4), "vq_commitment_weight"),
    (dict(codebook_ema_decay=1.0), "codebook_ema_decay"),
    (dict(codebook_ema_decay=-0.1), "codebook_ema_decay"),
    (dict(codebook_restart_threshold=-1.0), "codebook_restart_threshold"),
    (dict(initializer_range=0), "initializer_range"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(truncation=8, bidirectional=False), "truncation"),
    (dict(truncation=0, bidirectional=True), "truncation"),
    (dict(classifier_pooling="max"), "classifier_pooling"),
    (dict(bidirectional="yes"), "bidirectional"),
    (dict(normalize_before=1), "normalize_before"),
    (dict(use_cache="no"), "use_cache"),
]


@pytest.mark.parametrize("overrides, field", INVALID, ids=[f"{f}={list(o.values())[0]!r}" for o, f in INVALID])
def test_invalid_config_raises_value_error_naming_the_field(tiny_config, overrides, field):
    with pytest.raises(ValueError) as excinfo:
        tiny_config(**overrides)
    assert field in str(excinfo.value)


def test_dropout_message_names_the_right_dropout(tiny_config):
    # "dropout" is a substring of the other names: the message must name exactly the offending one.
    with pytest.raises(ValueError, match=r"`attention_dropout`"):
        tiny_config(attention_dropout=-0.1)
    with pytest.raises(ValueError, match=r"`dropout`"):
        tiny_config(dropout=1.0)


def test_truncation_error_explains_bidirectional(tiny_config):
    with pytest.raises(ValueError) as excinfo:
        tiny_config(truncation=8)
    message = str(excinfo.value)
    assert "truncation" in message and "bidirectional" in message
    assert tiny_config(truncation=8, bidirectional=True).truncation == 8


def test_valid_edge_values_are_accepted(tiny_config):
    config = tiny_config(
        chunk_size=1, codebook_size=2, dropout=0.0, codebook_ema_decay=0.0, vq_commitment_weight=0,
        relative_positional_bias="rotary", shared_representation_size=2,
    )  # fmt: skip
    assert config.codebook_size == 2 and config.chunk_size == 1


def test_invalid_config_json_is_rejected_on_load(tiny_config, tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    values["chunk_size"] = 0
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="chunk_size"):
        LongVQConfig.from_pretrained(tmp_path)


def test_causal_lm_rejects_bidirectional(tiny_config):
    config = tiny_config(bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        LongVQForCausalLM(config)
    with pytest.raises(ValueError, match="bidirectional"):
        AutoModelForCausalLM.from_config(config)


def test_causal_lm_rejects_batchnorm(tiny_config):
    config = tiny_config(normalization_type="batchnorm")
    with pytest.raises(ValueError, match="normalization_type"):
        LongVQForCausalLM(config)


def test_bidirectional_batchnorm_encoder_and_classifier_construct(tiny_config):
    config = tiny_config(bidirectional=True, normalization_type="batchnorm")
    LongVQModel(config)
    LongVQForSequenceClassification(config)


TINY = dict(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, intermediate_size=64, shared_representation_size=16,
    ema_projection_size=4, codebook_size=8, chunk_size=4,
)  # fmt: skip


def test_auto_classes_resolve_longvq():
    config = AutoConfig.for_model("longvq", **TINY)
    assert type(config) is LongVQConfig
    assert config.hidden_size == 32
    assert type(AutoModelForCausalLM.from_config(config)) is LongVQForCausalLM
    assert type(AutoModel.from_config(config)) is LongVQModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is LongVQForSequenceClassification


def test_auto_config_for_model_validates():
    with pytest.raises(ValueError, match="codebook_size"):
        AutoConfig.for_model("longvq", **{**TINY, "codebook_size": 1})
