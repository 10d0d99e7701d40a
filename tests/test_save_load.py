"""save_pretrained / from_pretrained, `_init_weights` coverage, tied embeddings and gradient flow to every parameter."""

from unittest.mock import patch

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    set_seed,
)

from longvq import LongVQForCausalLM, LongVQForSequenceClassification, LongVQModel

VOCAB = 50


def _batch(batch=2, length=13):
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :3] = 0  # one left-padded row
    return ids, mask


def _loss(model, ids, mask):
    if isinstance(model, LongVQForCausalLM):
        return model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    if isinstance(model, LongVQForSequenceClassification):
        return model(ids, attention_mask=mask, labels=torch.arange(ids.shape[0]) % model.num_labels).loss
    out = model(ids, attention_mask=mask)
    return out.last_hidden_state.pow(2).mean() + out.commitment_loss


def _train(model, steps=2):
    """A few optimizer steps in training mode, so weights, codebooks and norm statistics all move away from init."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids, mask = _batch()
        optimizer.zero_grad()
        _loss(model, ids, mask).backward()
        optimizer.step()
    return model.eval()


def _outputs(model, ids, mask):
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    return out.last_hidden_state if isinstance(model, LongVQModel) else out.logits


def _codebook_buffers(model):
    return {k: v for k, v in model.state_dict().items() if "codebook_sum" in k or "codebook_count" in k}


# (id, model class, config overrides)
SETUPS = [
    ("causal_lm_tied", LongVQForCausalLM, dict(tie_word_embeddings=True)),
    ("causal_lm_untied", LongVQForCausalLM, dict(tie_word_embeddings=False)),
    ("causal_lm_rotary_postnorm", LongVQForCausalLM, dict(relative_positional_bias="rotary", normalize_before=False)),
    ("classifier_causal", LongVQForSequenceClassification, dict(num_labels=3)),
    (
        "classifier_bidirectional_batchnorm",
        LongVQForSequenceClassification,
        dict(num_labels=3, bidirectional=True, normalization_type="batchnorm", truncation=6),
    ),
    ("base_model", LongVQModel, dict()),
]


@pytest.fixture(params=SETUPS, ids=[s[0] for s in SETUPS])
def trained(request, tiny_config):
    _, model_class, overrides = request.param
    return _train(model_class(tiny_config(**overrides)))


def test_save_pretrained_writes_safetensors_only(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith(".bin")]
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) <= set(trained.state_dict())


def test_from_pretrained_restores_every_tensor_and_the_outputs(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = type(trained).from_pretrained(tmp_path).eval()
    original_state, loaded_state = trained.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(original_state)
    for name, tensor in original_state.items():
        assert torch.equal(loaded_state[name], tensor), name
        if tensor.is_floating_point():
            assert torch.isfinite(loaded_state[name]).all(), name
    ids, mask = _batch(3, 17)
    torch.testing.assert_close(_outputs(loaded, ids, mask), _outputs(trained, ids, mask), rtol=0, atol=1e-6)


def test_codebook_buffers_are_persistent_saved_and_restored(tiny_config, tmp_path):
    fresh = LongVQForCausalLM(tiny_config())
    initial = {k: v.clone() for k, v in _codebook_buffers(fresh).items()}
    assert len(initial) == 2 * 2  # sum and count, two layers
    model = _train(fresh)
    trained = _codebook_buffers(model)
    for name, tensor in trained.items():
        assert not torch.equal(tensor, initial[name]), f"{name} did not move during training"
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for name, tensor in trained.items():
        assert name in saved, f"{name} is not in the checkpoint"
        assert torch.equal(saved[name], tensor)
    restored = _codebook_buffers(LongVQForCausalLM.from_pretrained(tmp_path))
    for name, tensor in trained.items():
        assert torch.equal(restored[name], tensor), name


def test_codebooks_are_buffers_not_parameters(tiny_config):
    model = LongVQForCausalLM(tiny_config())
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for layer in range(2):
        for kind in ("codebook_sum", "codebook_count"):
            name = f"model.layers.{layer}.attention.quantizer.{kind}"
            assert name in buffers and name not in parameters
            assert name in model.state_dict()  # persistent
    assert not [n for n in parameters if "codebook" in n]


@pytest.mark.parametrize(
    "auto_class, model_class, overrides",
    [
        (AutoModelForCausalLM, LongVQForCausalLM, dict(tie_word_embeddings=False)),
        (AutoModelForSequenceClassification, LongVQForSequenceClassification, dict(num_labels=2, bidirectional=True)),
        (AutoModel, LongVQModel, dict()),
    ],
)
def test_auto_from_pretrained(tiny_config, tmp_path, auto_class, model_class, overrides):
    model = _train(model_class(tiny_config(**overrides)))
    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_class
    ids, mask = _batch()
    torch.testing.assert_close(_outputs(loaded, ids, mask), _outputs(model, ids, mask), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# _init_weights covers every tensor
# ---------------------------------------------------------------------------------------------------------------------

INIT_SETUPS = [
    (LongVQForCausalLM, dict(tie_word_embeddings=False)),
    (LongVQForCausalLM, dict(relative_positional_bias="rotary", normalization_type="scalenorm", pad_token_id=0)),
    (LongVQForSequenceClassification, dict(bidirectional=True, normalization_type="batchnorm", num_labels=3)),
    (LongVQModel, dict(normalization_type="rmsnorm", normalize_before=False, input_dim=3)),
]
INIT_IDS = ["causal_untied", "causal_rotary_scalenorm_pad", "classifier_batchnorm", "base_rmsnorm_postnorm_input_dim"]


def _seeded_initialize_weights():
    """Re-seed before every module's init so that the init values do not depend on the order modules are visited."""
    original = PreTrainedModel._initialize_weights

    def seeded(self, module, *args, **kwargs):
        set_seed(0)
        return original(self, module, *args, **kwargs)

    return patch.object(PreTrainedModel, "_initialize_weights", seeded)


@pytest.mark.parametrize("model_class, overrides", INIT_SETUPS, ids=INIT_IDS)
def test_meta_construction_then_init_weights_sets_every_tensor(tiny_config, model_class, overrides):
    with torch.device("meta"):
        model = model_class(tiny_config(**overrides))
    tensors = list(model.state_dict().values())
    assert all(t.is_meta for t in tensors)
    model.to_empty(device="cpu")
    with torch.no_grad():  # poison: whatever `_init_weights` leaves alone stays recognisably wrong
        for tensor in model.state_dict().values():
            tensor.fill_(float("nan") if tensor.is_floating_point() else 12345)
    for module in model.modules():
        module._is_hf_initialized = False
    model.init_weights()
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"{name} was not initialised by _init_weights"
        else:
            assert (tensor != 12345).all(), f"{name} was not initialised by _init_weights"
    ids, mask = _batch()
    if model_class is LongVQModel and overrides.get("input_dim"):
        out = model(inputs_embeds=torch.randn(2, 13, 3), attention_mask=mask).last_hidden_state
    else:
        out = _outputs(model, ids, mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("model_class, overrides", INIT_SETUPS, ids=INIT_IDS)
def test_from_pretrained_with_every_weight_missing_equals_fresh_init(tiny_config, model_class, overrides):
    """`from_pretrained` builds on the meta device and `_init_weights` must then produce every tensor (HF's
    `test_can_init_all_missing_weights`)."""
    config = tiny_config(**overrides)
    with _seeded_initialize_weights():
        fresh = model_class(config)
        loaded = model_class.from_pretrained(None, config=config, state_dict={})
    fresh_state, loaded_state = fresh.state_dict(), loaded.state_dict()
    assert list(fresh_state) == list(loaded_state)
    for name, tensor in loaded_state.items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, fresh_state[name]), f"{name} differs between __init__ and from_pretrained init"


def test_partial_checkpoint_initialises_missing_tensors_and_keeps_loaded_ones(tiny_config, tmp_path):
    """Missing custom tensors are initialised; tensors that were loaded are not overwritten by `_init_weights`, even
    when a sibling in the same module was missing (EMA, gated attention with its mix_proj bias, quantizer)."""
    config = tiny_config(tie_word_embeddings=False)
    model = _train(LongVQForCausalLM(config))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    saved = load_file(path)
    dropped = {
        f"model.layers.0.{name}"
        for name in (
            "attention.ema.projection", "attention.query_key_scale", "attention.quantizer.codebook_count",
            "attention.mix_proj.weight", "attention.out_proj.weight", "feed_forward.fc1.weight",
        )
    }  # fmt: skip
    assert dropped <= set(saved)
    save_file({k: v for k, v in saved.items() if k not in dropped}, path, metadata={"format": "pt"})
    loaded, info = LongVQForCausalLM.from_pretrained(tmp_path, output_loading_info=True)  # transformers: initialise
    assert info["missing_keys"] == dropped
    state = loaded.state_dict()
    for name, tensor in state.items():
        assert torch.isfinite(tensor).all(), name
        if name in dropped:
            assert not torch.equal(tensor, saved[name]), f"{name} was missing but equals the saved value"
        elif name in saved:
            assert torch.equal(tensor, saved[name]), f"{name} was loaded but then overwritten"
    # The partially loaded modules still hold the trained values for what was present.
    kept = (
        "ema.damping_logit", "ema.decay_logit", "ema.expansion", "ema.residual_weight", "query_key_offset",
        "mix_proj.bias", "quantizer.codebook_sum", "position_bias.weight",
    )  # fmt: skip
    for name in kept:
        full = f"model.layers.0.attention.{name}"
        assert torch.equal(state[full], saved[full]), full


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_causal_lm_from_base_model_checkpoint_initialises_the_head(tiny_config, tmp_path, tie):
    base = _train(LongVQModel(tiny_config(tie_word_embeddings=tie)))
    base.save_pretrained(tmp_path)
    lm = LongVQForCausalLM.from_pretrained(tmp_path)
    for name, tensor in base.state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], tensor), name
    head = lm.lm_head.weight
    assert torch.isfinite(head).all()
    if tie:
        assert head is lm.model.embed_tokens.weight
    else:
        assert head is not lm.model.embed_tokens.weight
        assert head.abs().sum() > 0
        assert not torch.equal(head, lm.model.embed_tokens.weight)
        assert 0.5 * lm.config.initializer_range < head.std() < 2 * lm.config.initializer_range
    ids, mask = _batch()
    assert torch.isfinite(_outputs(lm.eval(), ids, mask)).all()


def test_classifier_from_base_model_checkpoint_initialises_the_score(tiny_config, tmp_path):
    base = _train(LongVQModel(tiny_config(bidirectional=True)))
    base.save_pretrained(tmp_path)
    classifier = LongVQForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    for name, tensor in base.state_dict().items():
        assert torch.equal(classifier.model.state_dict()[name], tensor), name
    assert torch.isfinite(classifier.score.weight).all() and classifier.score.weight.abs().sum() > 0
    assert torch.equal(classifier.score.bias, torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------------
# Tied embeddings
# ---------------------------------------------------------------------------------------------------------------------


def test_tied_embeddings_share_one_parameter(tiny_config, tmp_path):
    model = LongVQForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = LongVQForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        loaded.model.embed_tokens.weight[3].fill_(0.5)
    assert torch.equal(loaded.lm_head.weight[3], torch.full((32,), 0.5))


def test_untied_embeddings_are_separate(tiny_config, tmp_path):
    model = _train(LongVQForCausalLM(tiny_config(tie_word_embeddings=False)))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" in saved and "model.embed_tokens.weight" in saved
    loaded = LongVQForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------------------------------
# Every parameter learns
# ---------------------------------------------------------------------------------------------------------------------


def _assert_every_parameter_has_a_gradient(model):
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad, name
        assert parameter.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


CAUSAL_GRADIENT_SETUPS = [
    dict(relative_positional_bias=bias, normalization_type=norm, normalize_before=before)
    for bias in ("simple", "rotary")
    for norm in ("layernorm", "rmsnorm", "scalenorm")
    for before in (True, False)
] + [dict(tie_word_embeddings=False, pad_token_id=0)]


@pytest.mark.parametrize(
    "overrides", CAUSAL_GRADIENT_SETUPS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_every_causal_lm_parameter_receives_gradient(tiny_config, overrides):
    model = LongVQForCausalLM(tiny_config(**overrides)).train()
    length = 3 * model.config.chunk_size + 2  # every window offset occurs
    ids = torch.randint(1, VOCAB, (2, length))
    out = model(ids, labels=ids)
    out.loss.backward()
    _assert_every_parameter_has_a_gradient(model)
    for name, buffer in model.named_buffers():
        assert not buffer.requires_grad, name


@pytest.mark.parametrize("normalize_before", [True, False], ids=["prenorm", "postnorm"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_every_bidirectional_batchnorm_classifier_parameter_receives_gradient(tiny_config, normalize_before, pooling):
    config = tiny_config(
        bidirectional=True, normalization_type="batchnorm", normalize_before=normalize_before, num_labels=3,
        classifier_pooling=pooling,
    )  # fmt: skip
    model = LongVQForSequenceClassification(config).train()
    length = 3 * config.chunk_size + 2
    ids = torch.randint(1, VOCAB, (3, length))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    _assert_every_parameter_has_a_gradient(model)
    codebook_names = [n for n, _ in model.named_buffers() if "codebook" in n]
    assert len(codebook_names) == 2 * config.num_hidden_layers
    assert not [n for n, _ in model.named_parameters() if "codebook" in n]
