"""`torch.compile(model, fullgraph=True)` traces a LongVQ training forward (and its backward) and a decoding step
without graph breaks: neither has a host synchronisation or a Python branch on tensor values when compiling (input value
checks run in eager mode only), and the compiled call computes what the eager one does: a training step plain, through
the segmented long-input path with activation checkpointing and inside `Trainer(torch_compile=True)`; greedy
`generate()` with compiled decoding steps. Lengths bucketed by padding to a multiple of the chunk size share one
compiled graph."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import CompileConfig, DataCollatorWithPadding

from helpers import tiny_config
from longvq import LongVQForCausalLM, LongVQForSequenceClassification
from longvq.tokenization import byte_tokenizer
from longvq.training import byte_lm_datasets, enable_activation_checkpointing, train_causal_lm


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


def test_the_segmented_path_with_activation_checkpointing_compiles_and_matches_eager():
    torch.manual_seed(0)
    config = tiny_config(chunk_size=4, segment_length=8, num_hidden_layers=1)
    eager = LongVQForCausalLM(config).train().freeze_codebooks()
    enable_activation_checkpointing(eager)
    compiled_model = copy.deepcopy(eager)
    ids = torch.randint(1, 50, (2, 13))  # two pieces of 8 tokens, the second one partial
    inputs = {"input_ids": ids, "labels": ids}
    expected = _loss_and_gradients(eager, eager, **inputs)
    actual = _loss_and_gradients(compiled_model, torch.compile(compiled_model, fullgraph=True, backend="aot_eager"), **inputs)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    for name, gradient in expected[2].items():
        torch.testing.assert_close(actual[2][name], gradient, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_lengths_padded_to_a_multiple_of_the_chunk_size_share_one_compiled_graph():
    """The bucketing recipe: a collator with `pad_to_multiple_of=config.chunk_size` turns batches of 9, 10 and 12
    tokens into one shape, so the model compiles once, and each real token's logits are those of the unpadded input."""
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config(vocab_size=258, chunk_size=4)).eval()
    collator = DataCollatorWithPadding(byte_tokenizer(padding_side="right"), pad_to_multiple_of=model.config.chunk_size)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for length in (9, 10, 12):
        rows = [torch.randint(0, 256, (length - shorter,)).tolist() for shorter in (0, 2)]
        batch = collator([{"input_ids": row} for row in rows])
        assert batch["input_ids"].shape == (2, 12)
        with torch.no_grad():
            logits = compiled(**batch, use_cache=False).logits
            for index, row in enumerate(rows):
                alone = model(torch.tensor([row]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[index, : len(row)], alone, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_trainer_with_torch_compile_trains_one_graph_like_eager(tmp_path):
    data = byte_lm_datasets(block_size=16, seed=0)
    data = {"train": data["train"].select(range(24)), "validation": data["validation"].select(range(4))}
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        run = train_causal_lm(
            str(tmp_path / str(compiled)), model=LongVQForCausalLM(tiny_config(vocab_size=256)), datasets=data,
            max_steps=3, per_device_train_batch_size=4, evaluate=False, save_final_model=False, logging_steps=1,
            torch_compile=compiled, torch_compile_backend="aot_eager", report_to=[],
        )  # fmt: skip
        losses[compiled] = run.losses
    assert counters["stats"]["unique_graphs"] == 1  # compiled, without a graph break or recompile across steps
    assert not counters["graph_break"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


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
