"""`torch.compile(model, fullgraph=True)` traces a LongVQ training forward (and its backward) and a decoding step
without graph breaks: neither has a host synchronisation or a Python branch on tensor values when compiling (input value
checks run in eager mode only), and the compiled call computes what the eager one does."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

from helpers import tiny_config
from longvq import LongVQForCausalLM, LongVQForSequenceClassification


def _loss_and_gradients(model, call, **inputs):
    """Loss, logits and parameter gradients of one training forward of `model` run through `call`."""
    out = call(**inputs)
    out.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits.detach(), gradients


@pytest.mark.parametrize("head", ["causal_lm", "classifier"])
def test_a_training_step_compiles_with_fullgraph_and_matches_eager(head):
    torch.manual_seed(0)
    if head == "causal_lm":
        eager = LongVQForCausalLM(tiny_config(chunk_size=4, segment_length=8)).train().freeze_codebooks()
    else:
        eager = LongVQForSequenceClassification(tiny_config(chunk_size=4, bidirectional=True, num_labels=3)).train()
        eager.freeze_codebooks()
    compiled_model = copy.deepcopy(eager)
    ids = torch.randint(1, 50, (2, 19))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # padding at the start and inside a row
    mask[0, 9:11] = 0
    labels = ids.masked_fill(mask == 0, -100) if head == "causal_lm" else torch.tensor([0, 2])
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    expected = _loss_and_gradients(eager, eager, **inputs)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    actual = _loss_and_gradients(compiled_model, compiled, **inputs)  # fullgraph=True: a graph break raises here
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-5)
    assert actual[2].keys() == expected[2].keys()
    for name, gradient in expected[2].items():
        torch.testing.assert_close(actual[2][name], gradient, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_generate_with_a_compiled_decoding_step_matches_eager_and_compiles_once():
    """generate() compiles the forward for decoding when the cache is compileable (on CPU only when the compile config
    asks for all devices): one graph for every step (fixed shapes, no host synchronisation, the state updated in
    place), and the same greedy tokens as eager decoding, across block boundaries and with a left-padded row."""
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config(chunk_size=4, pad_token_id=0, eos_token_id=None)).eval()
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # transformers' switch for compiling on CPU (its own tests use it)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # generate() did take the compiled path
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1  # 11 decoding steps, no recompilation
