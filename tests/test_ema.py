"""The FFT-convolution EMA == MEGA's step-by-step recurrence."""

import pytest
import torch

from longvq import LongVQConfig, LongVQForCausalLM
from longvq.modeling_longvq import LongVQMultiDimensionalEma
from reference import ema_recurrence


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


@pytest.mark.parametrize("length", [1, 2, 7, 32, 100])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_fft_matches_recurrence(length, bidirectional):
    torch.manual_seed(length)
    ema = _ema(bidirectional)
    x = torch.randn(2, length, 6)
    fast = ema.convolve(x)
    slow = ema_recurrence(ema, x)
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=1e-5)


def test_bidirectional_counts_current_token_once():
    """A unit impulse at t: the output at t is K1[0] only; earlier outputs see the backward kernel shifted by one."""
    ema = _ema(True)
    x = torch.zeros(1, 9, 6)
    x[0, 4] = 1.0
    out = ema.convolve(x)[0]
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
    truncated = ema.convolve(x)
    # Same as the full kernel with taps >= 5 zeroed: an impulse 7 steps away has no effect.
    impulse = torch.zeros(1, 20, 6)
    impulse[0, 10] = 1.0
    response = ema.convolve(impulse)[0]
    assert response[15:].abs().max() < 1e-6 and response[:5].abs().max() < 1e-6  # FFT rounding only
    assert response[14].abs().min() > 1e-4 and response[5].abs().min() > 1e-4
    assert not torch.allclose(truncated, full.convolve(x))
    # With truncation >= length it is the untruncated EMA.
    long_cap = _ema(True, truncation=50)
    long_cap.load_state_dict(ema.state_dict())
    torch.testing.assert_close(long_cap.convolve(x), full.convolve(x))


def test_padded_positions_are_zeroed_before_the_convolution():
    torch.manual_seed(1)
    ema = _ema(False)
    x = torch.randn(1, 10, 6)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 3] = False
    noisy = x.clone()
    noisy[0, 3] = 100.0
    torch.testing.assert_close(ema(x, mask), ema(noisy, mask))
