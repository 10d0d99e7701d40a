"""`torch.compile(model, fullgraph=True)` traces a LongVQ training forward (and its backward) without graph breaks:
the forward has no host synchronisation and no Python branch on tensor values when compiling (input value checks run
in eager mode only), and the compiled step computes what the eager one does."""

import copy

import pytest
import torch

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
