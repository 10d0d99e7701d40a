"""Input validation at the model boundary, and equivalent input forms giving identical outputs."""

import pytest
import torch

from longvq import LongVQForCausalLM, LongVQForSequenceClassification, LongVQModel

MODEL_CLASSES = [LongVQModel, LongVQForCausalLM, LongVQForSequenceClassification]
B, T, VOCAB, D = 2, 6, 50, 32


def _ids(batch=B, length=T):
    return torch.randint(1, VOCAB, (batch, length))


def _output(model_class, out):
    """The tensor each model class is judged by."""
    return out.last_hidden_state if model_class is LongVQModel else out.logits


@pytest.fixture(params=MODEL_CLASSES, ids=lambda c: c.__name__)
def model_class(request):
    return request.param


@pytest.fixture
def model(model_class, tiny_config):
    return model_class(tiny_config(num_labels=3)).eval()


# name -> (forward kwargs builder, exception type, message fragment)
BAD_INPUTS = {
    "ids_equal_vocab_size": (lambda: dict(input_ids=torch.full((B, T), VOCAB)), ValueError, "vocab_size"),
    "ids_above_vocab_size": (lambda: dict(input_ids=torch.full((B, T), VOCAB + 100)), ValueError, "vocab_size"),
    "negative_ids": (lambda: dict(input_ids=torch.tensor([[1, 2, -1], [1, 2, 3]])), ValueError, "input_ids"),
    "float_ids": (lambda: dict(input_ids=_ids().float()), TypeError, "input_ids"),
    "bool_ids": (lambda: dict(input_ids=torch.ones(B, T, dtype=torch.bool)), TypeError, "input_ids"),
    "list_ids": (lambda: dict(input_ids=[[1, 2, 3]]), TypeError, "input_ids"),
    "1d_ids": (lambda: dict(input_ids=torch.tensor([1, 2, 3])), ValueError, "(batch, length)"),
    "3d_ids": (lambda: dict(input_ids=torch.ones(B, T, 1, dtype=torch.long)), ValueError, "(batch, length)"),
    "mask_wrong_length": (
        lambda: dict(input_ids=_ids(), attention_mask=torch.ones(B, T + 1, dtype=torch.long)),
        ValueError,
        "attention_mask",
    ),
    "mask_wrong_batch": (
        lambda: dict(input_ids=_ids(), attention_mask=torch.ones(B + 1, T, dtype=torch.long)),
        ValueError,
        "attention_mask",
    ),
    "mask_1d": (
        lambda: dict(input_ids=_ids(), attention_mask=torch.ones(T, dtype=torch.long)),
        ValueError,
        "attention_mask",
    ),
    "mask_value_2": (
        lambda: dict(input_ids=_ids(), attention_mask=torch.tensor([[1, 1, 2, 1, 1, 1], [1] * T])),
        ValueError,
        "attention_mask",
    ),
    "mask_value_half": (
        lambda: dict(input_ids=_ids(), attention_mask=torch.full((B, T), 0.5)),
        ValueError,
        "attention_mask",
    ),
    "mask_as_list": (lambda: dict(input_ids=_ids(), attention_mask=[[1] * T] * B), TypeError, "attention_mask"),
    "neither_ids_nor_embeds": (lambda: dict(), ValueError, "exactly one"),
    "both_ids_and_embeds": (
        lambda: dict(input_ids=_ids(), inputs_embeds=torch.randn(B, T, D)),
        ValueError,
        "exactly one",
    ),
    "embeds_wrong_width": (lambda: dict(inputs_embeds=torch.randn(B, T, D + 1)), ValueError, "inputs_embeds"),
    "embeds_2d": (lambda: dict(inputs_embeds=torch.randn(B, T)), ValueError, "inputs_embeds"),
    "embeds_integer": (lambda: dict(inputs_embeds=torch.ones(B, T, D, dtype=torch.long)), TypeError, "inputs_embeds"),
    "embeds_nan": (
        lambda: dict(inputs_embeds=torch.randn(B, T, D).index_fill_(1, torch.tensor([3]), float("nan"))),
        ValueError,
        "NaN",
    ),
    "embeds_inf": (
        lambda: dict(inputs_embeds=torch.randn(B, T, D).index_fill_(1, torch.tensor([0]), float("inf"))),
        ValueError,
        "infinite",
    ),
    "empty_batch_ids": (lambda: dict(input_ids=torch.zeros(0, T, dtype=torch.long)), ValueError, "Empty"),
    "zero_length_ids": (lambda: dict(input_ids=torch.zeros(B, 0, dtype=torch.long)), ValueError, "Empty"),
    "empty_batch_embeds": (lambda: dict(inputs_embeds=torch.zeros(0, T, D)), ValueError, "Empty"),
    "zero_length_embeds": (lambda: dict(inputs_embeds=torch.zeros(B, 0, D)), ValueError, "Empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(model, case):
    make_kwargs, error, fragment = BAD_INPUTS[case]
    with pytest.raises(error) as excinfo:
        model(**make_kwargs())
    assert fragment in str(excinfo.value)


def test_bad_inputs_raise_in_training_mode_too(tiny_config):
    model = LongVQForCausalLM(tiny_config()).train()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((B, T), VOCAB), labels=torch.zeros(B, T, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(_ids(), attention_mask=torch.full((B, T), 2))


@pytest.mark.parametrize(
    "labels",
    [
        torch.zeros(B, T + 1, dtype=torch.long),
        torch.zeros(B + 1, T, dtype=torch.long),
        torch.zeros(B * T, dtype=torch.long),
    ],
    ids=["too_long", "wrong_batch", "flat"],
)
def test_causal_lm_rejects_labels_of_the_wrong_shape(tiny_config, labels):
    model = LongVQForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="labels"):
        model(_ids(), labels=labels)
    with pytest.raises(ValueError, match="labels"):
        model(inputs_embeds=torch.randn(B, T, D), labels=labels)


@pytest.mark.parametrize(
    "problem_type, labels",
    [
        ("single_label_classification", torch.zeros(B + 1, dtype=torch.long)),
        ("single_label_classification", torch.zeros(B - 1, dtype=torch.long)),
        ("multi_label_classification", torch.zeros(B + 1, 3)),
        ("regression", torch.zeros(B + 1, 3)),
    ],
)
def test_classifier_rejects_labels_of_the_wrong_batch_size(tiny_config, problem_type, labels):
    model = LongVQForSequenceClassification(tiny_config(num_labels=3, problem_type=problem_type))
    with pytest.raises(ValueError, match="labels"):
        model(_ids(), labels=labels)


def test_attention_mask_dtypes_give_identical_outputs(model, model_class):
    ids = _ids(3, 9)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padded
    mask[1, -4:] = 0  # right padded
    with torch.no_grad():
        outputs = [
            _output(model_class, model(ids, attention_mask=mask.to(dtype)))
            for dtype in (torch.bool, torch.long, torch.int32, torch.float32)
        ]
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


def test_int32_ids_equal_int64_ids(model, model_class):
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            _output(model_class, model(ids.int())), _output(model_class, model(ids)), rtol=0, atol=0
        )


def test_all_ones_mask_equals_no_mask(model, model_class):
    ids = _ids()
    with torch.no_grad():
        without = _output(model_class, model(ids))
        with_mask = _output(model_class, model(ids, attention_mask=torch.ones(B, T, dtype=torch.bool)))
    torch.testing.assert_close(with_mask, without, rtol=0, atol=1e-6)


def test_inputs_embeds_from_the_embedding_equal_input_ids(model, model_class):
    ids = _ids(2, 11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        from_ids = _output(model_class, model(input_ids=ids, attention_mask=mask))
        embeds = model.get_input_embeddings()(ids)
        from_embeds = _output(model_class, model(inputs_embeds=embeds, attention_mask=mask))
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_input_dim_accepts_pixels_with_channels(tiny_config, model_class):
    config = tiny_config(input_dim=3, num_labels=4, bidirectional=model_class is not LongVQForCausalLM)
    model = model_class(config).eval()
    pixels = torch.rand(B, 16, 3)
    with torch.no_grad():
        out = _output(model_class, model(inputs_embeds=pixels))
        again = _output(model_class, model(inputs_embeds=pixels))
    expected = {LongVQModel: (B, 16, D), LongVQForCausalLM: (B, 16, VOCAB), LongVQForSequenceClassification: (B, 4)}
    assert out.shape == expected[model_class]
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    # The pixels really are read through the input projection.
    with torch.no_grad():
        changed = _output(model_class, model(inputs_embeds=pixels.flip(1)))
    assert not torch.allclose(changed, out)
    with pytest.raises(ValueError, match="input_dim"):
        model(inputs_embeds=torch.rand(B, 16, D))


def test_input_dim_projection_receives_gradient(tiny_config):
    model = LongVQForSequenceClassification(tiny_config(input_dim=3, num_labels=2, bidirectional=True))
    out = model(inputs_embeds=torch.rand(B, 12, 3), labels=torch.tensor([0, 1]))
    out.loss.backward()
    grad = model.model.input_projection.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_input_dim_one_accepts_raw_audio(tiny_config, model_class):
    config = tiny_config(input_dim=1, num_labels=2, bidirectional=model_class is not LongVQForCausalLM)
    model = model_class(config).eval()
    audio = torch.randn(B, 20)
    mask = torch.ones(B, 20, dtype=torch.long)
    mask[1, 15:] = 0
    with torch.no_grad():
        flat = _output(model_class, model(inputs_embeds=audio, attention_mask=mask))
        with_axis = _output(model_class, model(inputs_embeds=audio.unsqueeze(-1), attention_mask=mask))
    assert torch.isfinite(flat).all()
    assert torch.equal(flat, with_axis)
    assert flat.shape[0] == B


def test_raw_audio_2d_needs_input_dim_one(tiny_config):
    model = LongVQModel(tiny_config(input_dim=3))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(B, 20))


# name -> (model kwargs builder, exception type, message fragment), for LongVQForCausalLM
BAD_LABELS = {
    "label_id_equal_vocab_size": (lambda: torch.full((B, T), VOCAB), ValueError, "vocab_size"),
    "negative_label_id": (lambda: torch.full((B, T), -5), ValueError, "-100"),
    "float_labels": (lambda: torch.zeros(B, T), TypeError, "labels"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_causal_lm_rejects_label_ids_out_of_range(tiny_config, case):
    """Cross-entropy would raise an IndexError deep inside on CPU and a device-side assert on GPU."""
    make_labels, error, fragment = BAD_LABELS[case]
    model = LongVQForCausalLM(tiny_config())
    with pytest.raises(error, match=fragment):
        model(_ids(), labels=make_labels())
    ignored = torch.full((B, T), -100)
    ignored[:, 1] = 3  # position 0 is never a target (labels are shifted)
    assert torch.isfinite(model(_ids(), labels=ignored).loss)  # -100 stays allowed


@pytest.mark.parametrize(
    "problem_type, labels, fragment",
    [
        ("single_label_classification", torch.tensor([0, 3]), "num_labels=3"),
        ("single_label_classification", torch.tensor([-1, 0]), "num_labels=3"),
        ("multi_label_classification", torch.zeros(B, 2), r"\(batch, num_labels=3\)"),
        ("regression", torch.zeros(B, 3, 1), r"\(batch, num_labels=3\)"),
    ],
    ids=["class_id_too_large", "negative_class_id", "multi_label_wrong_width", "3d_regression_targets"],
)
def test_classifier_rejects_malformed_labels(tiny_config, problem_type, labels, fragment):
    model = LongVQForSequenceClassification(tiny_config(num_labels=3, problem_type=problem_type))
    with pytest.raises(ValueError, match=fragment):
        model(_ids(), labels=labels)


def test_cache_of_the_wrong_kind_or_configuration_is_refused(tiny_config):
    from transformers import DynamicCache

    from longvq import LongVQCache

    model = LongVQForCausalLM(tiny_config()).eval()
    for foreign in ((torch.zeros(1),), [torch.zeros(1)], "cache"):  # legacy tuples, lists, anything else
        with pytest.raises(TypeError, match="must be a LongVQCache"):
            model(_ids(), past_key_values=foreign)
    filled = DynamicCache()
    filled.update(torch.zeros(B, 1, 3, 4), torch.zeros(B, 1, 3, 4), layer_idx=0)
    with pytest.raises(TypeError, match="must be a LongVQCache"):  # a non-empty key/value cache
        model(_ids(), past_key_values=filled)
    # A LongVQCache of another model: would fail deep inside a layer, or skip layers silently.
    for field, value in (("hidden_size", 48), ("num_hidden_layers", 1), ("codebook_size", 4), ("chunk_size", 8)):
        other = LongVQForCausalLM(tiny_config(**{field: value})).eval()
        with torch.no_grad():
            cache = other(_ids(), use_cache=True).past_key_values
        with pytest.raises(ValueError, match=f"its {field} is {value}"):
            model(_ids(), past_key_values=cache)
        with pytest.raises(ValueError, match=f"its {field} is {value}"):  # also before it holds anything
            model(_ids(), past_key_values=LongVQCache(other.config))
