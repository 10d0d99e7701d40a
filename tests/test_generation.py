"""Decoding with LongVQCache: token-by-token == full forward, constant state size, and the generate() surface."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DynamicCache,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
    pipeline,
    set_seed,
)

from longvq import LongVQCache, LongVQForCausalLM
from longvq.cache_longvq import LongVQLayerState
from helpers import tiny_config

MAX_DECODE_ERROR = 1e-4


def _model(chunk_size=3, **overrides):
    torch.manual_seed(chunk_size)
    config = tiny_config(chunk_size=chunk_size, pad_token_id=0, eos_token_id=None, **overrides)
    return LongVQForCausalLM(config).eval()


def _left_padded_batch(lengths, width=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, 50, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("chunk_size", [1, 3, 4])
@pytest.mark.parametrize("bias", ["simple", "rotary"])
@pytest.mark.parametrize("memory", [True, False], ids=["memory", "window_only"])
def test_token_by_token_reproduces_the_full_forward(chunk_size, bias, memory):
    model = _model(chunk_size, relative_positional_bias=bias, codebook_memory=memory)
    ids, mask = _left_padded_batch([26, 19, 26, 1], seed=chunk_size)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    steps = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (steps - full)[real].abs().max() < MAX_DECODE_ERROR
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.positions.tolist() == mask.sum(1).tolist()


@pytest.mark.parametrize("chunk_size", [3, 4])
def test_prefill_at_block_boundaries_then_steps(chunk_size):
    model = _model(chunk_size)
    ids, mask = _left_padded_batch([6 * chunk_size, 5 * chunk_size + 2], seed=1)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    # Prompts ending one before, exactly on and one after a block boundary (k C - 1, k C, k C + 1) for row 0.
    for prefill in (4 * chunk_size - 1, 4 * chunk_size, 4 * chunk_size + 1):
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            logits.append(out.logits)
        assert (torch.cat(logits, 1) - full)[real].abs().max() < MAX_DECODE_ERROR, prefill


def test_chunked_prefill_equals_single_prefill():
    model = _model(4)
    ids, mask = _left_padded_batch([30, 21], seed=2)
    single = model(ids, attention_mask=mask, use_cache=True)
    cache, logits = None, []
    for start in range(0, 30, 7):  # chunks cross block boundaries at different phases
        out = model(ids[:, start : start + 7], attention_mask=mask[:, : start + 7], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    assert (torch.cat(logits, 1) - single.logits)[mask.bool()].abs().max() < MAX_DECODE_ERROR
    _assert_same_states(single.past_key_values, cache, model)


def _assert_same_states(cache_a, cache_b, model):
    """Two caches carry the same state: window (empty slots may hold anything), memory and EMA state."""
    assert torch.equal(cache_a.positions, cache_b.positions)
    for a, b, layer in zip(cache_a.layers, cache_b.layers, model.model.layers):
        codebook = layer.attention.quantizer.codebook()
        carry_a, carry_b = a.carry(codebook, cache_a.positions), b.carry(codebook, cache_b.positions)
        valid = carry_a.attention.mask
        assert torch.equal(valid, carry_b.attention.mask)
        assert torch.equal(carry_a.attention.codes[valid], carry_b.attention.codes[valid])
        torch.testing.assert_close(carry_a.attention.values[valid], carry_b.attention.values[valid], atol=1e-4, rtol=1e-4)
        for name in ("memory_counts", "memory_sums"):
            torch.testing.assert_close(getattr(carry_a.attention, name), getattr(carry_b.attention, name), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(carry_a.ema, carry_b.ema, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "window_only"])
def test_decoding_steps_leave_the_state_a_prefill_leaves(memory):
    """The ring of window halves and the one-token-per-step fold into the memory hold what the block-parallel forward
    keeps, whatever block phase each row is at (left padding of different lengths: rows start blocks at different
    steps)."""
    model = _model(4, codebook_memory=memory)
    ids, mask = _left_padded_batch([23, 17, 9, 2], seed=3)
    prefill = model(ids, attention_mask=mask, use_cache=True).past_key_values
    cache = model(ids[:, :1], attention_mask=mask[:, :1], use_cache=True).past_key_values
    for t in range(1, ids.shape[1]):
        cache = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).past_key_values
    _assert_same_states(prefill, cache, model)


def test_decoding_steps_update_the_state_in_place():
    """A decoding step writes into the tensors the prefill allocated (what a CUDA graph of the step needs)."""
    model = _model(3)
    cache = model(torch.randint(1, 50, (2, 5)), use_cache=True).past_key_values

    def addresses():
        return [cache.positions.data_ptr()] + [t.data_ptr() for layer in cache.layers for t in (*layer.tensors(), layer.seen_tokens)]

    before = addresses()
    for _ in range(7):
        cache = model(torch.randint(1, 50, (2, 1)), past_key_values=cache).past_key_values
    assert addresses() == before
    assert cache.get_seq_length() == 12


def test_state_size_does_not_depend_on_tokens_seen():
    model = _model(4)
    short = model(torch.randint(1, 50, (2, 8)), use_cache=True).past_key_values  # 2C tokens
    long = model(torch.randint(1, 50, (2, 80)), use_cache=True).past_key_values  # 20C tokens
    assert short.nbytes == long.nbytes > 0
    for _ in range(9):
        long = model(torch.randint(1, 50, (2, 1)), past_key_values=long).past_key_values
    assert long.nbytes == short.nbytes
    assert [t.shape for layer in long.layers for t in layer.tensors()] == [
        t.shape for layer in short.layers for t in layer.tensors()
    ]


def test_padded_decode_step_changes_no_state():
    model = _model(3)
    out = model(torch.randint(1, 50, (2, 7)), use_cache=True)
    cache = out.past_key_values
    before = [t.clone() for layer in cache.layers for t in layer.tensors()] + [cache.positions.clone()]
    model(torch.tensor([[5], [6]]), attention_mask=torch.zeros(2, 1, dtype=torch.long), past_key_values=cache)
    after = [t for layer in cache.layers for t in layer.tensors()] + [cache.positions]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_reorder_and_batch_operations_cover_every_tensor():
    model = _model(3)
    cache = model(torch.randint(1, 50, (3, 11)), use_cache=True).past_key_values
    tensors = [t.clone() for layer in cache.layers for t in layer.tensors()] + [cache.positions.clone()]
    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    reordered = [t for layer in cache.layers for t in layer.tensors()] + [cache.positions]
    assert len(reordered) == len(tensors) == len(LongVQLayerState.state_names) * model.config.num_hidden_layers + 1
    for old, new in zip(tensors, reordered):
        assert torch.equal(new, old[order])
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert cache.batch_size == 2 and all(t.shape[0] == 2 for layer in cache.layers for t in layer.tensors())


def test_cache_cannot_roll_back_and_foreign_caches_are_checked():
    model = _model(3)
    cache = model(torch.randint(1, 50, (1, 5)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cannot be cropped or rolled back"):
        cache.crop(2)
    # An empty DynamicCache is replaced; a non-empty one is refused.
    out = model(torch.randint(1, 50, (1, 5)), past_key_values=DynamicCache())
    assert isinstance(out.past_key_values, LongVQCache)
    foreign = DynamicCache()
    foreign.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), layer_idx=0)
    with pytest.raises(TypeError, match="must be a LongVQCache"):
        model(torch.randint(1, 50, (1, 5)), past_key_values=foreign)
    with pytest.raises(ValueError, match="holds 1 rows"):
        model(torch.randint(1, 50, (2, 1)), past_key_values=cache)


def test_generate_with_and_without_cache_agree():
    model = _model(3)
    ids, mask = _left_padded_batch([9, 5, 7], seed=3)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    assert torch.equal(greedy, model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, use_cache=False))
    beam = model.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False)
    beam_no_cache = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False, use_cache=False
    )
    assert torch.equal(beam, beam_no_cache)
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, prefill_chunk_size=4)
    assert torch.equal(chunked, greedy)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = _model(4)
    ids, mask = _left_padded_batch([11, 4, 8], seed=4)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row in range(3):
        n = int(mask[row].sum())
        alone = model.generate(ids[row : row + 1, -n:], max_new_tokens=12, do_sample=False)
        assert torch.equal(alone[0], batched[row, -n - 12 :])


def test_continuing_from_a_returned_cache_equals_one_shot():
    model = _model(3)
    ids, mask = _left_padded_batch([8, 6], seed=5)
    one_shot = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(first.past_key_values, LongVQCache)
    grown_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], dim=1)
    second = model.generate(
        first.sequences, attention_mask=grown_mask, past_key_values=first.past_key_values, max_new_tokens=9,
        do_sample=False,
    )  # fmt: skip
    assert torch.equal(second, one_shot)


def test_sampling_strategies_and_inputs_embeds():
    model = _model(3)
    ids, mask = _left_padded_batch([7, 4], seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    set_seed(0)
    first = model.generate(ids, num_return_sequences=3, **kwargs)
    set_seed(0)
    assert torch.equal(first, model.generate(ids, num_return_sequences=3, **kwargs))
    assert first.shape == (6, 15)
    beam_sample = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=True)
    assert beam_sample.shape == (2, 12)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds, greedy[:, ids.shape[1] :])


def test_stopping_criteria_and_eos():
    model = _model(3)
    ids = torch.randint(1, 50, (1, 6))
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False)
    eos = int(greedy[0, 8])
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert stopped.shape[1] <= 9 and stopped[0, -1] == eos

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)

    assert model.generate(ids, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAfter()])).shape[1] == 9


def test_strategies_that_need_rollback_are_refused():
    """Assisted and prompt-lookup decoding roll the state back; generate() refuses them because the model is
    stateful (transformers < 5.25) or because its cache cannot be cropped (5.25, after the prefill)."""
    model = _model(3)
    ids = torch.randint(1, 50, (1, 6))
    refused = "stateful|can be cropped"
    with pytest.raises(ValueError, match=refused):
        model.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match=refused):
        model.generate(ids, max_new_tokens=4, assistant_model=_model(3))


def _tokenizer():
    vocab = {"<pad>": 0, "<unk>": 1, **{word: i + 2 for i, word in enumerate("the a cat dog sat ran on mat fast slow".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def test_pipeline_text_generation_and_streamer(capsys):
    model = LongVQForCausalLM(tiny_config(vocab_size=12, chunk_size=3, pad_token_id=0)).eval()
    generator = pipeline("text-generation", model=model, tokenizer=_tokenizer())
    set_seed(1)
    first = generator("the cat sat", max_new_tokens=6, do_sample=True)
    set_seed(1)
    second = generator("the cat sat", max_new_tokens=6, do_sample=True)
    assert first == second and first[0]["generated_text"].startswith("the cat sat")
    tokenizer = _tokenizer()
    inputs = tokenizer(["the dog ran"], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False, streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out.strip()
    assert printed == tokenizer.decode(output[0]).strip()
