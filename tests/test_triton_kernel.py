"""The Triton kernel of block-wise VQ-attention (`longvq.triton_longvq`) == the PyTorch path == the dense oracle, in
value and in every gradient, on CPU tensors under Triton's interpreter; and the dispatch rules.

Triton reads TRITON_INTERPRET when it and the kernels are imported (its own library functions are kernels too), so
the kernel tests run in a child pytest process started with the variable set (`test_kernel_under_the_interpreter`);
in a run that already has it set, they run directly.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from longvq import ops_longvq, triton_longvq  # noqa: E402
from longvq.ops_longvq import naive_vq_attention, vq_attention  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the child of test_kernel_under_the_interpreter")


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_kernel_under_the_interpreter():
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" in child.stdout  # the kernel tests ran; only this one skipped


def _through_kernel(fn):
    """fn() with `ops_longvq` dispatching to the kernel as it does for CUDA tensors."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops_longvq, "kernel_supports", lambda query: True)
        return fn()


def _inputs(length, chunk_size, codebook_size, z_dim, h_dim, seed, batch=2):
    """Random inputs with left and right padding in every row and a learned bias table (one scalar per offset)."""
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(codebook_size, z_dim, generator=generator)
    codes = torch.randint(0, codebook_size, (batch, length), generator=generator)
    raw_keys = torch.randn(batch, length, z_dim, generator=generator).requires_grad_()
    query = torch.randn(batch, length, z_dim, generator=generator).requires_grad_()
    value = torch.randn(batch, length, h_dim, generator=generator).requires_grad_()
    table = torch.randn(4 * chunk_size - 1, generator=generator).requires_grad_()
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        left = int(torch.randint(0, length, (1,), generator=generator))
        right = int(torch.randint(left + 1, length + 1, (1,), generator=generator))
        mask[row, left:right] = True
    return codebook, codes, raw_keys, query, value, table, mask


def _bias(table, chunk_size):
    return lambda offsets: table[offsets.clamp(-(2 * chunk_size - 1), 2 * chunk_size - 1) + 2 * chunk_size - 1]


def _run(attention, inputs, chunk_size, seed):
    """attention(query, quantized keys, value, codes, codebook, mask, bias) and the gradients of a random weighting of
    its real rows w.r.t. query, raw keys (straight-through), value and the bias table."""
    codebook, codes, raw_keys, query, value, table, mask = inputs
    keys = codebook[codes] + (raw_keys - raw_keys.detach())
    out = attention(query, keys, value, codes, codebook, mask, _bias(table, chunk_size))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)) * mask.unsqueeze(-1)
    grads = torch.autograd.grad((out * weights).sum(), (query, raw_keys, value, table))
    return out * mask.unsqueeze(-1), grads  # rows of padded queries are meaningless


CASES = [
    # (length, chunk_size, codebook_size, z_dim, h_dim)
    (13, 4, 5, 8, 6),  # a partial last block
    (3, 4, 4, 8, 6),  # T < C
    (16, 8, 8, 6, 20),  # Z not a power of two, two H tiles
    (20, 4, 24, 8, 6),  # more codewords than tokens: empty memory entries (and empty memories of the first blocks)
    (140, 72, 6, 8, 6),  # two query and key tiles per block: the causal tile skipping
]


@needs_interpreter
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("memory", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_pytorch_and_oracle(case, memory, bidirectional):
    length, chunk_size, codebook_size, z_dim, h_dim = case
    inputs = _inputs(length, chunk_size, codebook_size, z_dim, h_dim, seed=length + chunk_size)

    def attention(query, keys, value, codes, codebook, mask, bias):
        out, _ = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size, bidirectional, memory=memory)
        return out

    def oracle(query, keys, value, codes, codebook, mask, bias):
        return naive_vq_attention(query, keys, value, mask, bias, chunk_size, bidirectional, memory=memory)

    kernel_out, kernel_grads = _run(lambda *a: _through_kernel(lambda: attention(*a)), inputs, chunk_size, 1)
    for reference in (attention, oracle):
        out, grads = _run(reference, inputs, chunk_size, 1)
        torch.testing.assert_close(kernel_out, out, atol=2e-5, rtol=1e-4)
        for name, kernel_grad, grad in zip(("query", "key", "value", "bias"), kernel_grads, grads):
            torch.testing.assert_close(kernel_grad, grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"d {name}: {m}")


@needs_interpreter
def test_kernel_continues_a_state():
    """A causal call that continues a state: the state's memory enters every block's memory (`initial_memory`), its
    window goes in front of the tokens, and gradients reach the new tokens' keys and values."""
    chunk_size = 4
    inputs = _inputs(14, chunk_size, 5, 8, 6, seed=3)
    first = [t[:, :6].detach() if t.dim() > 1 else t for t in inputs[1:5]]

    def attention(query, keys, value, codes, codebook, mask, bias):
        _, state = vq_attention(
            first[2], codebook[first[0]], first[3], first[0], codebook, mask[:, :6], bias, chunk_size,
            output_final_state=True,
        )  # fmt: skip
        rest = slice(6, None)
        out, _ = vq_attention(
            query[:, rest], keys[:, rest], value[:, rest], codes[:, rest], codebook, mask[:, rest], bias, chunk_size,
            initial_state=state,
        )  # fmt: skip
        return torch.cat([torch.zeros_like(out[:, :1]).expand(-1, 6, -1), out], dim=1)

    kernel_out, kernel_grads = _run(lambda *a: _through_kernel(lambda: attention(*a)), inputs, chunk_size, 2)
    out, grads = _run(attention, inputs, chunk_size, 2)
    torch.testing.assert_close(kernel_out, out, atol=2e-5, rtol=1e-4)
    for kernel_grad, grad in zip(kernel_grads, grads):
        torch.testing.assert_close(kernel_grad, grad, atol=2e-5, rtol=1e-4)


def _refuse(*args, **kwargs):
    raise AssertionError("the Triton kernel was called")


def test_cpu_tensors_take_the_pytorch_path(monkeypatch):
    chunk_size = 4
    codebook, codes, _, query, value, table, mask = _inputs(13, chunk_size, 5, 8, 6, seed=4)
    assert not triton_longvq.kernel_supports(query)
    monkeypatch.setattr(ops_longvq, "blockwise_attention_triton", _refuse)
    keys, bias = codebook[codes], _bias(table, chunk_size)
    out, _ = vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size)
    expected = naive_vq_attention(query, keys, value, mask, bias, chunk_size, False)
    torch.testing.assert_close(out * mask.unsqueeze(-1), expected * mask.unsqueeze(-1))


def test_dropout_in_training_takes_the_pytorch_path(monkeypatch):
    """Attention dropout drops weights the kernel never materialises: in training it runs the PyTorch path even where
    the kernel would apply; in evaluation the kernel runs."""
    chunk_size = 4
    codebook, codes, _, query, value, table, mask = _inputs(9, chunk_size, 5, 8, 6, seed=5)
    monkeypatch.setattr(ops_longvq, "kernel_supports", lambda query: True)
    monkeypatch.setattr(ops_longvq, "blockwise_attention_triton", _refuse)
    arguments = (query, codebook[codes], value, codes, codebook, mask, _bias(table, chunk_size), chunk_size)
    vq_attention(*arguments, dropout=0.5, training=True)
    with pytest.raises(AssertionError, match="kernel was called"):
        vq_attention(*arguments, dropout=0.5, training=False)


@needs_interpreter
def test_kernel_traces_in_torch_compile():
    """The kernel is a custom operator with a fake implementation: `torch.compile(fullgraph=True)` traces through it
    (forward and backward) without a graph break."""
    chunk_size = 4
    inputs = _inputs(13, chunk_size, 5, 8, 6, seed=6)

    def attention(query, keys, value, codes, codebook, mask, bias):
        return vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size)[0]

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    kernel_out, kernel_grads = _run(lambda *a: _through_kernel(lambda: compiled(*a)), inputs, chunk_size, 3)
    out, grads = _run(attention, inputs, chunk_size, 3)
    torch.testing.assert_close(kernel_out, out, atol=2e-5, rtol=1e-4)
    for kernel_grad, grad in zip(kernel_grads, grads):
        torch.testing.assert_close(kernel_grad, grad, atol=2e-5, rtol=1e-4)


@needs_interpreter
def test_kernel_under_autocast_runs_in_half_precision():
    """Under autocast the kernel's matmuls take the autocast dtype, as the PyTorch path's do, and the result stays close
    to float32 attention, with finite gradients (padded rows included). float16 here: the interpreter's bfloat16
    `tl.dot` is not faithful, so bfloat16 is left to a GPU."""
    chunk_size = 4
    inputs = _inputs(13, chunk_size, 5, 8, 6, seed=7)

    def attention(query, keys, value, codes, codebook, mask, bias):
        return vq_attention(query, keys, value, codes, codebook, mask, bias, chunk_size)[0]

    def half_attention(query, keys, value, codes, codebook, mask, bias):
        with torch.autocast("cpu", dtype=torch.float16):
            out = attention(query, keys, value.half(), codes, codebook, mask, bias)
        assert out.dtype == torch.float16
        return out.float()

    kernel_out, kernel_grads = _run(lambda *a: _through_kernel(lambda: half_attention(*a)), inputs, chunk_size, 4)
    out, grads = _run(attention, inputs, chunk_size, 4)
    torch.testing.assert_close(kernel_out, out, atol=1e-2, rtol=1e-2)
    for kernel_grad, grad in zip(kernel_grads, grads):
        torch.testing.assert_close(kernel_grad, grad, atol=1e-2 * grad.abs().max().item(), rtol=1e-2)


@needs_interpreter
@pytest.mark.parametrize("bidirectional", [False, True])
def test_model_through_the_kernel(tiny_config, bidirectional):
    """A tiny model's loss and every parameter gradient are the same through the kernel, padding included, with the
    kernel taken by the model's own call of VQ-attention (in eval mode: a training forward moves the codebook)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = tiny_config(bidirectional=bidirectional, num_labels=3)
    auto = AutoModelForSequenceClassification if bidirectional else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 19))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    labels = torch.tensor([0, 2]) if bidirectional else input_ids.masked_fill(attention_mask == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    kernel_loss, kernel_grads = _through_kernel(loss_and_grads)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(kernel_loss, loss, atol=1e-5, rtol=1e-5)
    assert kernel_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(kernel_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _compile_for_sm90(kernel, constexprs):
    """Compile a kernel with Triton's own compiler for an H100 (sm_90) target: no GPU needed, and it checks what the
    interpreter does not (global names, types, layouts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"query": "*bf16", "key": "*bf16", "value": "*bf16", "codebook": "*bf16", "out": "*bf16",
                "grad_out": "*bf16", "grad_query": "*bf16", "grad": "*bf16", "key_mask": "*i8"}  # fmt: skip
    float_pointers = {"bias", "memory_counts", "memory_sums", "lse", "delta", "grad_bias", "grad_sums"}
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "*fp32" if name in float_pointers else "i32")
        for name in kernel.arg_names
    }  # fmt: skip
    signature["scale"] = "fp32"
    triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels, which the interpreter replaces")
@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])  # ~10 s each
def test_kernels_compile_for_a_gpu(causal):
    tiles = dict(BLOCK_M=64, BLOCK_Z=128, BLOCK_H=64, PRECISION="tf32")
    window = dict(CAUSAL=causal, BLOCK_N=32, **tiles)
    _compile_for_sm90(triton_longvq._forward_kernel, dict(window, BLOCK_S=32))
    _compile_for_sm90(triton_longvq._query_grad_kernel, dict(window, BLOCK_S=32))
    for keys in (True, False):
        _compile_for_sm90(triton_longvq._key_value_grad_kernel, dict(window, KEYS=keys, READERS=2 if causal else 3))
    _compile_for_sm90(triton_longvq._memory_grad_kernel, dict(tiles, BLOCK_S=32))
