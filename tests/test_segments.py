"""Long causal inputs run in state-carrying pieces (`config.segment_length`) == the whole-input forward, in value,
gradient and codebook statistics, with and without gradient checkpointing."""

import copy

import pytest
import torch

from longvq import LongVQForCausalLM
from longvq.training import enable_activation_checkpointing
from helpers import tiny_config

LENGTH = 45  # pieces of 8 (C = 4): 5 whole pieces and a ragged one


def _padded_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (3, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding across the first piece boundary
    mask[1, 30:] = 0  # right padding: the row ends inside the fourth piece
    return ids, mask


def _run(model, ids, mask, checkpointing):
    model = copy.deepcopy(model).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    torch.manual_seed(1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 7] = -100  # predicted from a padded position, whose output is meaningless
    out = model(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return out, grads, buffers


@pytest.mark.parametrize("segment_length", [4, 8, 13])  # 13 rounds down to 12
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_pieces_equal_the_whole_input(segment_length, checkpointing, dropout):
    torch.manual_seed(0)
    whole_model = LongVQForCausalLM(tiny_config(segment_length=None, dropout=dropout, codebook_restart_threshold=0.0))
    piece_model = copy.deepcopy(whole_model)
    piece_model.config.segment_length = segment_length
    ids, mask = _padded_batch()
    whole, whole_grads, whole_buffers = _run(whole_model, ids, mask, checkpointing=False)
    pieces, piece_grads, piece_buffers = _run(piece_model, ids, mask, checkpointing)
    real = mask.bool()
    if dropout == 0.0:  # dropout masks are drawn per piece, so only the deterministic model is compared
        torch.testing.assert_close(pieces.logits[real], whole.logits[real], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(pieces.loss, whole.loss, atol=1e-6, rtol=1e-5)
        for a, b in zip(pieces.hidden_states, whole.hidden_states):
            torch.testing.assert_close(a[real], b[real], atol=2e-5, rtol=1e-4)
        assert piece_grads.keys() == whole_grads.keys()
        for name in whole_grads:
            torch.testing.assert_close(piece_grads[name], whole_grads[name], atol=1e-5, rtol=1e-3, msg=name)
        for name in whole_buffers:  # one EMA k-means step from the same statistics
            torch.testing.assert_close(piece_buffers[name], whole_buffers[name], atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(pieces.codebook_usage, whole.codebook_usage)
    assert torch.isfinite(pieces.logits).all() and torch.isfinite(pieces.loss)


def test_checkpointed_pieces_equal_plain_pieces_bitwise_in_loss():
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config(segment_length=8, dropout=0.1))
    ids, mask = _padded_batch(seed=3)
    plain, plain_grads, _ = _run(model, ids, mask, checkpointing=False)
    checkpointed, checkpointed_grads, _ = _run(model, ids, mask, checkpointing=True)
    assert torch.equal(plain.loss, checkpointed.loss)  # the recompute replays the same dropout masks
    for name in plain_grads:
        torch.testing.assert_close(checkpointed_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_short_inputs_and_bidirectional_models_run_whole():
    model = LongVQForCausalLM(tiny_config(segment_length=8))
    assert model.model._segment_length(8, None) is None
    assert model.model._segment_length(9, None) == 8
    assert LongVQForCausalLM(tiny_config(segment_length=None)).model._segment_length(1000, None) is None
    assert LongVQForCausalLM(tiny_config(segment_length=2, chunk_size=4)).model._segment_length(9, None) == 4


def test_segment_length_is_validated():
    with pytest.raises(ValueError, match="segment_length"):
        tiny_config(segment_length=0)
