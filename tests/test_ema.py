"""The block-scan EMA (and the FFT convolution of truncated kernels) == MEGA's step-by-step recurrence."""

import pytest
import torch

from longvq import LongVQConfig, LongVQForCausalLM
from longvq.modeling_longvq import LongVQMultiDimensionalEma
from longvq.ops_longvq import ema_final_state, naive_ema


def _ema(bidirectional, truncation=None, hidden_size=6, ema_projection_size=4):
    config = LongVQConfig(
        hidden_size=hidden_size, ema_projection_size=ema_projection_size, bidirectional=bidirectional,
        truncation=truncation,
    )  # fmt: skip
    # Initialised through a model so the test covers `_init_weights` too.
    model = LongVQForCausalLM(LongVQConfig(**{**config.to_dict(), "bidirectional": False, "truncation": None}))
    ema = LongVQMultiDimensionalEma(config)
    model._init_weights(ema)
    return ema


@pytest.mark.parametrize("length", [1, 2, 7, 32, 64, 100, 129, 300])  # scan blocks of 64: within, at and across
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_scan_matches_recurrence(length, bidirectional):
    torch.manual_seed(length)
    ema = _ema(bidirectional)
    x = torch.randn(2, length, 6)
    fast, final = ema.convolve(x)
    slow = naive_ema(x, ema.damping_logit, ema.decay_logit, ema.expansion, ema.projection, ema.bidirectional)
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=1e-5)
    # A causal scan returns the state after the last step when T is a multiple of its block (or shorter than one).
    assert (final is None) == (bidirectional or (length > 64 and length % 64 != 0))


@pytest.mark.parametrize("length", [1, 50, 64, 200])  # the scan returns a final state for 1 and 64 (multiples of P)
def test_scan_continues_a_state_and_returns_the_final_state(length):
    """Two halves with the carried state == the whole; the final state == the recurrence's and `ema_final_state`'s."""
    torch.manual_seed(length)
    ema = _ema(False)
    x = torch.randn(2, 2 * length, 6)
    lengths = torch.full((2,), length)
    whole, whole_final = ema.convolve(x)
    first, state = ema.convolve(x[:, :length])
    assert (state is None) == (length % 64 != 0 and length > 64)
    state = ema_final_state(x[:, :length], lengths, *ema.coefficients(), None) if state is None else state
    second, final = ema.convolve(x[:, length:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=1e-5)
    whole_final = ema_final_state(x, 2 * lengths, *ema.coefficients(), None) if whole_final is None else whole_final
    final_by_sum = ema_final_state(x[:, length:], lengths, *ema.coefficients(), state)
    torch.testing.assert_close(final_by_sum, whole_final, atol=1e-5, rtol=1e-5)
    if final is not None:
        torch.testing.assert_close(final, final_by_sum, atol=1e-5, rtol=1e-5)
    # The recurrence: h_t = p beta x_t + q h_(t-1), from zero.
    gain, q = (t.double() for t in ema.coefficients())
    h = torch.zeros(2, 6, gain.shape[-1], dtype=torch.float64)
    for t in range(2 * length):
        h = gain * x[:, t, :, None].double() + q * h
    torch.testing.assert_close(whole_final.double(), h, atol=1e-5, rtol=1e-5)


def test_bidirectional_counts_current_token_once():
    """A unit impulse at t: the output at t is K1[0] only; earlier outputs see the backward kernel shifted by one."""
    ema = _ema(True)
    x = torch.zeros(1, 9, 6)
    x[0, 4] = 1.0
    out = ema.convolve(x)[0][0]
    kernel = ema.kernel(9)  # (2D, 9): forward channels then backward channels
    torch.testing.assert_close(out[4], kernel[:6, 0])
    torch.testing.assert_close(out[3], kernel[6:, 0])  # token 4 is one step in the future of 3: K2[0]
    torch.testing.assert_close(out[0], kernel[6:, 3])
    torch.testing.assert_close(out[6], kernel[:6, 2])


def test_truncation_caps_the_kernel():
    torch.manual_seed(0)
    ema = _ema(True, truncation=5)
    full = _ema(True)
    full.load_state_dict(ema.state_dict())
    x = torch.randn(2, 20, 6)
    truncated = ema.convolve(x)[0]
    # Same as the full kernel with taps >= 5 zeroed: an impulse 7 steps away has no effect.
    impulse = torch.zeros(1, 20, 6)
    impulse[0, 10] = 1.0
    response = ema.convolve(impulse)[0][0]
    assert response[15:].abs().max() < 1e-6 and response[:5].abs().max() < 1e-6  # FFT rounding only
    assert response[14].abs().min() > 1e-4 and response[5].abs().min() > 1e-4
    assert not torch.allclose(truncated, full.convolve(x)[0])
    # With truncation >= length it is the untruncated EMA.
    long_cap = _ema(True, truncation=50)
    long_cap.load_state_dict(ema.state_dict())
    torch.testing.assert_close(long_cap.convolve(x)[0], full.convolve(x)[0])


def test_padded_positions_are_zeroed_before_the_convolution():
    torch.manual_seed(1)
    ema = _ema(False)
    x = torch.randn(1, 10, 6)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 3] = False
    noisy = x.clone()
    noisy[0, 3] = 100.0
    torch.testing.assert_close(ema(x, mask), ema(noisy, mask))
