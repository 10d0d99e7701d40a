"""Long sequences: a forward and backward pass of a small LongVQ causal LM over 16K tokens (CI) and 64K tokens
(`slow`, run with `pytest -m slow`) in float32: no NaN/inf in outputs or gradients, and the attention output at
sampled query positions equals a dense oracle computed for those rows only (O(R T), `dense_vq_attention_rows`)."""

import time

import pytest
import torch
from helpers import tiny_config
from longvq.ops_longvq import naive_vq_attention_rows as dense_vq_attention_rows

import longvq.modeling_longvq as modeling
from longvq import LongVQForCausalLM

SAMPLED_ROWS = 32
# Max |block-wise - oracle| over the sampled rows (the oracle runs in float64 on the captured float32 inputs).
# Measured 7e-9 at 16K and 64K; the bound leaves room for summation order over tens of thousands of keys.
ATOL = 1e-5


def _config(**overrides):
    return tiny_config(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, intermediate_size=16, shared_representation_size=8,
        ema_projection_size=2, codebook_size=16, chunk_size=64, **overrides,
    )  # fmt: skip


def _forward_backward(model, ids, mask):
    start = time.perf_counter()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert torch.isfinite(out.commitment_loss) and (out.codebook_usage > 0).all()
    return out, elapsed


def _long_run(length: int, monkeypatch):
    """Returns the forward+backward seconds of the whole-input and default (segmented) paths, and the max attention
    error over the sampled rows."""
    torch.manual_seed(0)
    # segment_length=None: the layer attends over the whole input in one `vq_attention` call, which is compared
    # with the oracle; the default configuration (long causal inputs in segments that carry the state) must then
    # give the same logits.
    whole = LongVQForCausalLM(_config(segment_length=None)).train()
    segmented = LongVQForCausalLM(_config()).train()
    segmented.load_state_dict(whole.state_dict())
    calls = []

    def recording_vq_attention(*args, **kwargs):
        out, state = vq_attention(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out, state

    vq_attention = modeling.vq_attention
    monkeypatch.setattr(modeling, "vq_attention", recording_vq_attention)
    ids = torch.randint(0, 64, (2, length))
    mask = torch.ones_like(ids)
    mask[1, length - length // 7 :] = 0  # a right-padded second row
    out, whole_elapsed = _forward_backward(whole, ids, mask)
    assert len(calls) == 1
    (query, key, value, _codes, _codebook, key_mask, position_bias, chunk_size), kwargs, attention = calls[0]
    assert query.shape[1] == length and kwargs.get("memory", True)
    monkeypatch.undo()
    out_segmented, elapsed = _forward_backward(segmented, ids, mask)
    real = mask.bool().unsqueeze(-1)
    torch.testing.assert_close(out_segmented.logits * real, out.logits * real, atol=1e-4, rtol=1e-4)

    # Sampled positions, the first and last included (the last reads the longest memory).
    generator = torch.Generator().manual_seed(length)
    rows = torch.cat([torch.randperm(length, generator=generator)[: SAMPLED_ROWS - 2], torch.tensor([0, length - 1])])
    with torch.no_grad():
        args = (query.double(), key.double(), value.double(), key_mask, position_bias, chunk_size, False, rows)
        expected = dense_vq_attention_rows(*args)
        # Guard against a vacuous comparison: far positions attend to a memory of thousands of tokens.
        assert (dense_vq_attention_rows(*args, memory=False) - expected).abs().max() > 100 * ATOL
    real_rows = key_mask[:, rows].unsqueeze(-1)
    error = ((attention.detach()[:, rows].double() - expected) * real_rows).abs().max().item()
    assert error < ATOL, error
    return whole_elapsed, elapsed, error


def test_16k_tokens_forward_backward_match_the_oracle(monkeypatch):
    whole, segmented, error = _long_run(16 * 1024, monkeypatch)
    print(f"16K x 2: forward+backward {whole:.2f} s whole, {segmented:.2f} s segmented; max error {error:.2e}")


@pytest.mark.slow
def test_64k_tokens_forward_backward_match_the_oracle(monkeypatch):
    whole, segmented, error = _long_run(64 * 1024, monkeypatch)
    print(f"64K x 2: forward+backward {whole:.2f} s whole, {segmented:.2f} s segmented; max error {error:.2e}")
