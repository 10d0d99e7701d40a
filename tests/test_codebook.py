"""Codebook learning: one EMA k-means step per training forward, from real tokens only, identical across replicas."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longvq import LongVQForCausalLM
from longvq.modeling_longvq import _random_real_rows
from longvq.training import enable_activation_checkpointing
from helpers import tiny_config


def _codebooks(model):
    return [layer.attention.quantizer.codebook().clone() for layer in model.model.layers]


def _counts(model):
    return [layer.attention.quantizer.codebook_count.clone() for layer in model.model.layers]


def _train_step(model, ids, mask=None):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out


def test_one_update_per_training_forward_matches_the_ema_formula():
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config()).train()
    decay = model.config.codebook_ema_decay
    before = _counts(model)
    ids = torch.randint(0, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    _train_step(model, ids, mask)
    for old, new in zip(before, _counts(model)):
        # Each layer assigns every real token to exactly one code.
        torch.testing.assert_close(new.sum(), decay * old.sum() + (1 - decay) * mask.sum().float())
        assert not torch.equal(old, new)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_updates_once_and_keeps_gradients(use_reentrant):
    torch.manual_seed(1)
    plain = LongVQForCausalLM(tiny_config()).train()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed, use_reentrant=use_reentrant)
    assert checkpointed.model.layers[0].gradient_checkpointing
    for step in range(3):
        ids = torch.randint(0, 50, (2, 13))
        loss_plain = _train_step(plain, ids).loss
        loss_checkpointed = _train_step(checkpointed, ids).loss
        torch.testing.assert_close(loss_checkpointed, loss_plain)
        for a, b in zip(_codebooks(plain), _codebooks(checkpointed)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        # The recompute saw the pre-update codebook, so the gradients are those of the forward that was run.
        for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_no_update_in_eval_mode_or_without_training():
    torch.manual_seed(2)
    model = LongVQForCausalLM(tiny_config())
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    model.eval()
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        model(ids)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_padded_tokens_do_not_move_the_codebook():
    torch.manual_seed(3)
    model = LongVQForCausalLM(tiny_config()).train()
    other = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, 9:] = 0
    noisy = ids.clone()
    noisy[mask == 0] = (noisy[mask == 0] + 7) % 50
    _train_step(model, ids, mask)
    _train_step(other, noisy, mask)
    for a, b in zip(_codebooks(model), _codebooks(other)):
        torch.testing.assert_close(a, b)
    # And a fully padded extra row changes nothing either.
    third = copy.deepcopy(other)
    padded_ids = torch.cat([ids, torch.randint(0, 50, (1, 12))])
    padded_mask = torch.cat([mask, torch.zeros(1, 12, dtype=mask.dtype)])
    fourth = copy.deepcopy(other)
    _train_step(third, ids, mask)
    _train_step(fourth, padded_ids, padded_mask)
    for a, b in zip(_codebooks(third), _codebooks(fourth)):
        torch.testing.assert_close(a, b)


def test_usage_and_perplexity_are_reported():
    torch.manual_seed(4)
    model = LongVQForCausalLM(tiny_config(codebook_size=8)).eval()
    ids = torch.randint(0, 50, (2, 40))
    out = model(ids)
    assert out.codebook_usage.shape == (2,) and out.codebook_perplexity.shape == (2,)
    assert ((out.codebook_usage > 0) & (out.codebook_usage <= 1)).all()
    assert ((out.codebook_perplexity >= 1) & (out.codebook_perplexity <= 8 + 1e-4)).all()
    # Collapse layer 0 onto code 5: every other codeword far away.
    quantizer = model.model.layers[0].attention.quantizer
    quantizer.codebook_sum.fill_(1e3)
    quantizer.codebook_sum[5] = 0.0
    out = model(ids)
    assert out.codebook_usage[0] == 1 / 8
    torch.testing.assert_close(out.codebook_perplexity[0], torch.tensor(1.0))


def test_gradient_accumulation_updates_once_per_micro_batch():
    torch.manual_seed(5)
    model = LongVQForCausalLM(tiny_config()).train()
    decay = model.config.codebook_ema_decay
    before = _counts(model)
    for micro_batch in range(4):
        ids = torch.randint(0, 50, (2, 8))
        (model(ids, labels=ids).loss / 4).backward()
    for old, new in zip(before, _counts(model)):
        expected = decay**4 * old.sum() + sum((1 - decay) * decay**k * 16 for k in range(4))
        torch.testing.assert_close(new.sum(), expected)


def _replica(rank, world_size, port, config, state, batches, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = LongVQForCausalLM(config).train()
        model.load_state_dict(state)
        for ids in batches[rank]:
            model(ids, labels=ids).loss.backward()
        results[rank] = [c.clone() for c in _codebooks(model)]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("restart_threshold", [0.0, 2.0])  # 2.0: most codes restart every step
def test_distributed_replicas_keep_identical_codebooks(restart_threshold):
    """Two gloo processes on different data end with the same codebook, equal to one process on the union (without
    restarts; restarts re-seed from process 0's keys, broadcast, so replicas still agree bitwise)."""
    torch.manual_seed(6)
    config = tiny_config(codebook_restart_threshold=restart_threshold)
    model = LongVQForCausalLM(config)
    state = copy.deepcopy(model.state_dict())
    batches = [[torch.randint(0, 50, (2, 10)) for _ in range(2)] for _ in range(2)]
    manager = mp.Manager()
    results = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_replica, args=(2, port, config, state, batches, results), nprocs=2, start_method="spawn")
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if restart_threshold:
        return
    single = LongVQForCausalLM(config).train()
    single.load_state_dict(state)
    for step in range(2):
        ids = torch.cat([batches[0][step], batches[1][step]])
        single(ids, labels=ids)
    for a, b in zip(results[0], _codebooks(single)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_dead_code_restart_recovers_a_collapsed_codebook(threshold):
    """All codewords but one pushed far away: without restarts every key keeps code 5 and the codebook stays
    collapsed; with restarts the dead codes are re-seeded from batch keys and usage recovers."""
    torch.manual_seed(7)
    model = LongVQForCausalLM(tiny_config(codebook_size=8, codebook_restart_threshold=threshold)).train()
    for layer in model.model.layers:
        quantizer = layer.attention.quantizer
        quantizer.codebook_sum.fill_(1e3)
        quantizer.codebook_sum[5] = 0.0
        quantizer.codebook_count.fill_(1e-3)  # dead by any positive threshold...
        quantizer.codebook_count[5] = 1.0  # ...except code 5
    ids = torch.randint(0, 50, (4, 24))
    assert (model(ids).codebook_usage == 1 / 8).all()  # collapsed (this training forward also restarts)
    for _ in range(3):
        _train_step(model, torch.randint(0, 50, (4, 24)))
    usage = model.eval()(ids).codebook_usage
    if threshold:
        assert (usage >= 3 / 8).all(), usage
    else:
        assert (usage == 1 / 8).all(), usage


def test_restart_candidates_are_real_keys_drawn_uniformly():
    """`_random_real_rows` draws only real (unmasked) rows, each about equally often, with static shapes; with no
    real token it still returns `count` rows (which the codebook update then ignores)."""
    torch.manual_seed(8)
    x = torch.arange(12.0).view(2, 6, 1)
    mask = torch.tensor([[True, False, True, True, False, False], [False, True, False, False, False, True]])
    picks = _random_real_rows(x, mask, 6000).flatten()
    assert set(picks.tolist()) == {0.0, 2.0, 3.0, 7.0, 11.0}
    frequencies = torch.bincount(picks.long(), minlength=12)[[0, 2, 3, 7, 11]] / 6000
    torch.testing.assert_close(frequencies, torch.full((5,), 0.2), atol=0.03, rtol=0)
    assert _random_real_rows(x, torch.zeros_like(mask), 4).shape == (4, 1)


def test_no_restart_without_a_real_token():
    """A training forward whose batch is all padding leaves dead codes alone (no candidate is a key)."""
    model = LongVQForCausalLM(tiny_config(codebook_restart_threshold=2.0, pad_token_id=0)).train()
    before = _codebooks(model)
    ids = torch.zeros(2, 8, dtype=torch.long)
    model(ids, attention_mask=torch.zeros_like(ids))
    for a, b in zip(before, _codebooks(model)):  # the EMA decays sums and counts alike: same codewords
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
