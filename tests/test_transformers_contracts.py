"""Contracts that transformers' own model tests (`ModelTesterMixin`, `GenerationTesterMixin`) check on every model,
restated for LongVQ: buffers defined by `__init__` and restored by `_init_weights` after a meta-device build, loading
semantics for mismatched and missing tensors, cache layers that are real `CacheLayerMixin`s, and a padded continuation
on top of a cache that equals one forward over the whole masked sequence."""

import copy
import logging

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.cache_utils import Cache, CacheLayerMixin

from helpers import tiny_config
from longvq import LongVQCache, LongVQForCausalLM, LongVQForSequenceClassification, LongVQModel
from longvq.modeling_longvq import CACHE_NAME

MODEL_CLASSES = (LongVQModel, LongVQForCausalLM, LongVQForSequenceClassification)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_buffers_from_init_equal_buffers_from_a_meta_build_and_init_weights(model_class):
    """transformers' `test_init_weights_can_init_buffers`: `from_pretrained` builds on the meta device and restores
    buffers with `_init_weights`; they must equal what `__init__` defines (not left as uninitialised memory)."""
    config = tiny_config(num_labels=3)
    from_init = model_class(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = model_class(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    buffers, restored = dict(from_init.named_buffers()), dict(from_meta.named_buffers())
    assert buffers.keys() == restored.keys() and any("codebook_sum" in name for name in buffers)
    for name, buffer in buffers.items():
        assert torch.equal(buffer, restored[name]), name
    codebooks = [m.codebook_sum for m in from_init.modules() if hasattr(m, "codebook_sum")]
    assert not torch.equal(codebooks[0], codebooks[1])  # each layer starts from its own codebook


def test_an_empty_checkpoint_initialises_every_tensor_as_init_does():
    """transformers' `test_can_init_all_missing_weights` for the buffers: a checkpoint with no tensors at all leaves
    nothing on the meta device and gives `__init__`'s buffers."""
    config = tiny_config()
    loaded = LongVQForCausalLM.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    built = LongVQForCausalLM(copy.deepcopy(config))
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    for name, buffer in built.named_buffers():
        assert torch.equal(buffer, dict(loaded.named_buffers())[name]), name


def test_mismatched_shapes_raise_runtime_error_or_reinitialise(tmp_path, caplog):
    """transformers' `test_load_with_mismatched_shapes`, through the Auto classes."""
    config = tiny_config(num_labels=2)
    LongVQForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=42)
    smaller = copy.deepcopy(config)
    smaller.vocab_size = 10
    with pytest.raises(RuntimeError):
        AutoModel.from_pretrained(tmp_path, config=smaller)
    with caplog.at_level(logging.WARNING):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True)
    assert "size mismatch" in caplog.text
    assert model(torch.randint(0, 10, (2, 8))).logits.shape == (2, 42)
    base = AutoModel.from_pretrained(tmp_path, config=smaller, ignore_mismatched_sizes=True)
    assert base(torch.randint(0, 10, (2, 8))).last_hidden_state.shape == (2, 8, 32)


def test_cache_layers_are_transformers_cache_layers():
    config = tiny_config(chunk_size=4, codebook_size=8)
    model = LongVQForCausalLM(config).eval()
    ids = torch.randint(1, 50, (2, 11))
    with torch.no_grad():
        cache = getattr(model(ids, use_cache=True), CACHE_NAME)
    assert isinstance(cache, Cache) and isinstance(cache, LongVQCache)
    window_and_memory = 2 * config.chunk_size + config.codebook_size
    for layer in cache.layers:
        assert isinstance(layer, CacheLayerMixin) and layer.is_initialized
        assert layer.keys.shape == (2, window_and_memory) and layer.keys.dtype == torch.long
        assert layer.values.shape == (2, window_and_memory, config.intermediate_size)
        assert layer.get_seq_length() == 11 and layer.get_max_length() == -1
        assert layer.get_mask_sizes(1) == (12, 0)
        with pytest.raises(NotImplementedError, match="VQ-attention"):
            layer.update(layer.keys, layer.values)
        with pytest.raises(ValueError, match="cannot be cropped"):
            layer.crop(1)
    assert cache.get_seq_length() == 11 and cache.is_compileable and not cache.is_croppable
    assert cache.get_mask_sizes(1, 0) == (12, 0)

    before = [t.clone() for layer in cache.layers for t in layer.tensors()]
    cache.offload(0)
    cache.layers[0].prefetch()
    assert all(torch.equal(a, b) for a, b in zip(before, [t for layer in cache.layers for t in layer.tensors()]))
    next_token = torch.randint(1, 50, (2, 1))
    with torch.no_grad():
        stepped = model(next_token, **{CACHE_NAME: cache}).logits
        whole = model(torch.cat([ids, next_token], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(stepped, whole, atol=1e-4, rtol=1e-4)

    cache.reset()
    assert not cache.is_initialized and all(not layer.is_initialized for layer in cache.layers)
    assert cache.get_seq_length() == 0
    with torch.no_grad():  # a reset cache decodes from scratch
        fresh = model(ids, **{CACHE_NAME: cache}).logits
    torch.testing.assert_close(fresh, model(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_padded_continuation_on_a_cache_equals_one_forward_over_the_whole_sequence():
    """transformers' `test_recurrent_layers_mask_padding_on_continued_forward`: turn 2 of a batched multi-turn
    continuation, left-padded in one row, run on top of the turn-1 cache, equals one forward over turn 1 + turn 2 with
    the padding inside the row."""
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config(chunk_size=3, codebook_size=6, pad_token_id=7)).eval()
    ids = torch.randint(8, 50, (2, 17))
    turn1, turn2 = ids[:, :9], ids[:, 9:].clone()
    turn2[1, :4] = 7
    mask = torch.ones_like(ids)
    mask[1, 9:13] = 0
    with torch.no_grad():
        cache = getattr(model(turn1, use_cache=True), CACHE_NAME)
        continued = model(turn2, attention_mask=mask, **{CACHE_NAME: cache}).logits
        whole = model(torch.cat([turn1, turn2], 1), attention_mask=mask, use_cache=False).logits[:, 9:]
        row_alone = model(ids[1:, mask[1].bool()], use_cache=False).logits[0, 9:]
    real = mask[:, 9:].bool()
    torch.testing.assert_close(continued[real], whole[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole[1, 4:], row_alone, atol=1e-5, rtol=1e-5)
