"""Mixed precision on CPU: under bf16/fp16 autocast the precision-critical parts of LongVQ stay in float32 (VQ
distances, the EMA kernel, FFT convolution and recurrence, the softmax and the memory's counts and value sums), and
logits stay within a measured tolerance of float32."""

import collections

import pytest
import torch
from helpers import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from longvq import LongVQForCausalLM
from longvq import modeling_longvq, ops_longvq
from longvq.modeling_longvq import LongVQMultiDimensionalEma, LongVQVectorQuantizer

# Max / mean |logits(autocast) - logits(fp32)| for the model below (logits of std ~1, max ~5), measured on CPU with
# torch 2.13: bf16 0.039 / 0.0051, fp16 0.0046 / 0.00065. The bounds are ~2.5x the measurements.
TOLERANCE = {torch.bfloat16: (0.1, 0.015), torch.float16: (0.015, 0.002)}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def _require_cpu_autocast(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as error:  # older torch builds lack fp16 CPU autocast
        pytest.skip(f"CPU autocast does not support {dtype}: {error}")


def _model():
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=256, hidden_size=64, intermediate_size=128, shared_representation_size=32, codebook_size=32,
        chunk_size=32,
    )  # fmt: skip
    return LongVQForCausalLM(config)


def _batch():
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding
    return ids, mask


class _OpDtypes(TorchDispatchMode):
    """Records the input dtypes of every aten op as it is actually computed (below autocast)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]].add(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def _record_outputs(monkeypatch, cls, name, log):
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        log[name].add(out[0].dtype if isinstance(out, tuple) else out.dtype)
        return out

    monkeypatch.setattr(cls, name, wrapper)


@DTYPES
def test_precision_critical_ops_run_in_float32_under_autocast(dtype, monkeypatch):
    _require_cpu_autocast(dtype)
    model = _model()
    ids, mask = _batch()
    outputs = collections.defaultdict(set)
    _record_outputs(monkeypatch, LongVQVectorQuantizer, "_shifted_distances", outputs)
    for name in ("kernel", "convolve", "step"):
        _record_outputs(monkeypatch, LongVQMultiDimensionalEma, name, outputs)
    for name in ("ema_scan", "ema_final_state"):
        _record_outputs(monkeypatch, modeling_longvq, name, outputs)
    _record_outputs(monkeypatch, ops_longvq, "_prefix_sums", outputs)  # cumulative memory counts and sums
    ops = _OpDtypes()
    with torch.autocast("cpu", dtype=dtype), ops:
        model.train()(ids, attention_mask=mask, labels=ids).loss.backward()  # training: whole-sequence path
        with torch.no_grad():
            cache = model.eval()(ids, attention_mask=mask, use_cache=True).past_key_values  # prefill into a state
            model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)  # one step
    # The autocast really was on: the linear layers ran in low precision.
    assert (dtype, dtype, dtype) in ops.ops["addmm"]
    # (`kernel` runs only for truncated kernels.)
    assert set(outputs) >= {"_shifted_distances", "convolve", "ema_scan", "ema_final_state", "step", "_prefix_sums"}
    for name, dtypes in outputs.items():
        assert dtypes == {torch.float32}, (name, dtypes)  # VQ distances, EMA kernel / convolution / recurrence
    assert ops.ops["_softmax"] == {(torch.float32,)}
    for fft in ("_fft_r2c", "_fft_c2r"):  # FFTs run only for truncated kernels
        assert all(d[0] in (torch.float32, torch.complex64) for d in ops.ops[fft]), fft
    # Memory statistics (per-code counts and value sums): float32 values, long indices.
    for name in ("scatter_add", "scatter_add_"):
        assert ops.ops[name] and all(d[0] == torch.float32 and d[-1] == torch.float32 for d in ops.ops[name]), (
            name, ops.ops[name],
        )  # fmt: skip


@DTYPES
def test_autocast_logits_stay_within_the_documented_tolerance_of_float32(dtype):
    _require_cpu_autocast(dtype)
    model = _model().eval()
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits[real]
        with torch.autocast("cpu", dtype=dtype):
            low = model(ids, attention_mask=mask).logits[real]
    assert low.dtype == dtype
    error = (low.float() - reference).abs()
    max_tolerance, mean_tolerance = TOLERANCE[dtype]
    print(f"{dtype}: max {error.max():.4f} mean {error.mean():.5f}")
    assert error.max() < max_tolerance and error.mean() < mean_tolerance, (error.max(), error.mean())


@DTYPES
def test_autocast_training_step_is_finite(dtype):
    _require_cpu_autocast(dtype)
    model = _model().train()
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=dtype):
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    for layer in model.model.layers:  # the EMA k-means update kept the float32 codebook finite
        quantizer = layer.attention.quantizer
        assert quantizer.codebook_sum.dtype == torch.float32 and torch.isfinite(quantizer.codebook()).all()


@DTYPES
def test_vq_attention_padded_queries_stay_finite_under_autocast(dtype):
    """A padded query whose window holds padding only is masked everywhere; its masks must not turn into -inf in half
    precision (softmax NaN), or the NaN reaches every gradient through the padded rows."""
    _require_cpu_autocast(dtype)
    torch.manual_seed(0)
    chunk_size, codebook = 4, torch.randn(5, 8)
    codes = torch.randint(0, 5, (2, 13))
    query, value = torch.randn(2, 13, 8, requires_grad=True), torch.randn(2, 13, 6, requires_grad=True)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, :9] = False  # two whole blocks of padding in front of the first row
    table = torch.randn(2 * (2 * chunk_size - 1) + 1)

    def position_bias(offsets):
        return table[offsets.clamp(-(2 * chunk_size - 1), 2 * chunk_size - 1) + 2 * chunk_size - 1]

    for bidirectional in (False, True):
        with torch.autocast("cpu", dtype=dtype):
            out, _ = ops_longvq.vq_attention(
                query, codebook[codes], value.to(dtype), codes, codebook, mask, position_bias, chunk_size, bidirectional
            )
        assert torch.isfinite(out).all()
        gradients = torch.autograd.grad((out.float() * mask[..., None]).sum(), (query, value))
        assert all(torch.isfinite(gradient).all() for gradient in gradients)
