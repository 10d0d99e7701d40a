"""LongVQ with the transformers Trainer (`longvq.training`): byte-level data, pretraining with eval metrics, gradient
accumulation, activation checkpointing, sequence classification and resuming from a checkpoint, on tiny models."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset
from packaging.version import Version
from safetensors.torch import load_file
from transformers import EvalPrediction, set_seed

from longvq import LongVQForCausalLM, LongVQForSequenceClassification
from longvq.training import (
    byte_classification_datasets,
    byte_lm_datasets,
    classification_trainer,
    codebook_summary,
    compute_classification_metrics,
    compute_lm_metrics,
    load_corpus_bytes,
    preprocess_logits_for_metrics,
    split_corpus,
    train_causal_lm,
)

BLOCK = 32


@pytest.fixture(scope="module")
def lm_data():
    return byte_lm_datasets(block_size=BLOCK, seed=0)


def _byte_config(tiny_config, **overrides):
    return tiny_config(vocab_size=256, **overrides)


def _quiet(**overrides):
    """Trainer keyword arguments shared by these tests: no final evaluation or model unless asked, log every step."""
    return {"evaluate": False, "save_final_model": False, "logging_steps": 1, **overrides}


# ---------------------------------------------------------------------------------------------------------------------
# Data and metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_byte_lm_datasets_are_a_contiguous_split_of_fixed_windows():
    corpus = load_corpus_bytes()
    train_bytes, validation_bytes = split_corpus(corpus)
    assert train_bytes + validation_bytes == corpus
    assert len(validation_bytes) == pytest.approx(0.1 * len(corpus), abs=1)

    data = byte_lm_datasets(block_size=BLOCK, seed=0)
    assert set(data) == {"train", "validation"}
    for split in data.values():
        assert set(split.column_names) == {"input_ids", "labels"}
        ids = np.array(split["input_ids"])
        assert ids.shape[1] == BLOCK and ids.min() >= 0 and ids.max() < 256
        assert (ids == np.array(split["labels"])).all()
    # Validation windows tile the held-out bytes from their start; no training window reaches into them.
    validation = np.array(data["validation"]["input_ids"])
    assert len(validation) == len(validation_bytes) // BLOCK
    assert bytes(validation.reshape(-1).astype(np.uint8).tolist()) == validation_bytes[: len(validation) * BLOCK]
    train = np.array(data["train"]["input_ids"])
    offset = train_bytes.index(bytes(train[0].astype(np.uint8).tolist()))
    assert offset < BLOCK
    assert bytes(train.reshape(-1).astype(np.uint8).tolist()) == train_bytes[offset : offset + len(train) * BLOCK]

    # The seed moves the training windows' grid only; validation does not depend on it.
    other = byte_lm_datasets(block_size=BLOCK, seed=1)
    assert other["validation"]["input_ids"] == data["validation"]["input_ids"]
    assert other["train"]["input_ids"] != data["train"]["input_ids"]
    assert byte_lm_datasets(block_size=BLOCK, seed=0)["train"]["input_ids"] == data["train"]["input_ids"]


def test_lm_metrics_are_perplexity_and_bits_per_byte_of_the_shifted_cross_entropy():
    logits = torch.randn(3, 7, 256)
    labels = torch.randint(0, 256, (3, 7))
    labels[1, 4:] = -100  # ignored targets
    nll = preprocess_logits_for_metrics(logits, labels)
    assert nll.shape == labels.shape
    metrics = compute_lm_metrics(EvalPrediction(predictions=nll.numpy(), label_ids=labels.numpy()))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100).item()
    assert metrics["cross_entropy"] == pytest.approx(expected, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert metrics["bpb"] == pytest.approx(expected / math.log(2), rel=1e-6)

    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    accuracy = compute_classification_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1, 1])))
    assert accuracy == {"accuracy": 0.75}


def test_byte_classification_datasets_are_balanced_and_order_only():
    data = byte_classification_datasets(block_size=BLOCK, seed=0)
    for split in data.values():
        labels = np.array(split["labels"])
        assert set(labels.tolist()) == {0, 1} and labels.mean() == 0.5
        ids = np.array(split["input_ids"])
        # Each reversed window is the mirror image of a forward one: same bytes, different order.
        forward = {tuple(row) for row in ids[labels == 0]}
        assert all(tuple(row[::-1]) in forward for row in ids[labels == 1])


# ---------------------------------------------------------------------------------------------------------------------
# Causal-LM pretraining
# ---------------------------------------------------------------------------------------------------------------------


def test_pretraining_reduces_loss_and_reports_perplexity_and_bpb(tmp_path, tiny_config, lm_data):
    config = _byte_config(tiny_config)
    run = train_causal_lm(
        str(tmp_path), config=config, datasets=lm_data, max_steps=40, per_device_train_batch_size=8,
        learning_rate=3e-3, logging_steps=5,
    )  # fmt: skip
    losses = run.losses
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(256) = 5.5 towards the unigram entropy

    metrics = run.eval_metrics
    for key in ("eval_loss", "eval_cross_entropy", "eval_perplexity", "eval_bpb"):
        assert key in metrics and math.isfinite(metrics[key])
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_cross_entropy"]), rel=1e-9)
    assert metrics["eval_bpb"] == pytest.approx(metrics["eval_cross_entropy"] / math.log(2), rel=1e-9)
    # eval_loss adds vq_commitment_weight (1e-4) x commitment loss to the cross-entropy; perplexity = exp(eval_loss)
    # up to that term. (Before 5.10, transformers' Trainer counted each row's first label, which no position predicts,
    # in `num_items_in_batch`, so its eval_loss of every causal LM was the cross-entropy x (T - 1) / T.)
    if Version(transformers.__version__) >= Version("5.10"):
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=2e-3)
    assert metrics["eval_bpb"] < 8.0  # better than uniform over bytes

    # The metrics agree with a plain evaluation of the trained model on the validation windows.
    model = run.model.eval()
    windows = torch.tensor(lm_data["validation"]["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1)).item()
    assert metrics["eval_cross_entropy"] == pytest.approx(nll, rel=1e-5)

    # The final model (weights and codebooks) is saved and reloads to the same codebooks.
    reloaded = LongVQForCausalLM.from_pretrained(str(tmp_path))
    assert codebook_summary(reloaded)["sha256"] == codebook_summary(model)["sha256"]


def _padded_batch_dataset(length=32):
    """Four rows of corpus bytes with very different numbers of real tokens (right padding, labels -100 on pads), so
    the two micro-batches of a 2 x 2 accumulation hold 62 and 15 targets: averaging micro-batch means would be
    wrong; the loss must be normalised by the number of targets of the whole accumulated batch."""
    data = load_corpus_bytes()
    rows, masks, labels = [], [], []
    for i, real in enumerate((32, 32, 6, 11)):
        ids = list(data[100 * i : 100 * i + length])
        mask = [1] * real + [0] * (length - real)
        rows.append([b if m else 0 for b, m in zip(ids, mask)])
        masks.append(mask)
        labels.append([b if m else -100 for b, m in zip(ids, mask)])
    return Dataset.from_dict({"input_ids": rows, "attention_mask": masks, "labels": labels})


def _one_sgd_step(tmp_path, tiny_config, batch_size, accumulation, accepts_loss_kwargs=True):
    set_seed(0)
    # vq_commitment_weight 0.1 so that the commitment term's scaling matters too. codebook_ema_decay 0.999999:
    # the codebook is updated once per *micro-batch* forward, so with the default decay the second micro-batch of
    # 2 x 2 would be quantized against a codebook already moved by the first one (a real, intended difference of
    # accumulation, ~5e-2 here); with the decay near 1 both schedules see the same codebook up to ~1e-6 and the
    # comparison isolates the loss/gradient scaling.
    config = _byte_config(tiny_config, vq_commitment_weight=0.1, codebook_ema_decay=0.999999)
    model = LongVQForCausalLM(config)
    if not accepts_loss_kwargs:
        model.accepts_loss_kwargs = False  # control: Trainer then averages micro-batch means
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = _padded_batch_dataset()
    run = train_causal_lm(
        str(tmp_path / f"ga{batch_size}x{accumulation}{accepts_loss_kwargs}"), model=model,
        datasets={"train": data, "validation": data}, max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, **_quiet(),  # the one step sees all 4 rows in any sampling order
    )  # fmt: skip
    # Plain SGD (no clipping, no weight decay): the update is -lr x gradient, so a wrongly scaled gradient shows up
    # in the parameters (Adam's first step would normalise the scale away).
    params = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    return run.losses[-1], initial, params


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tiny_config):
    loss_full, initial, full = _one_sgd_step(tmp_path, tiny_config, batch_size=4, accumulation=1)
    loss_accumulated, _, accumulated = _one_sgd_step(tmp_path, tiny_config, batch_size=2, accumulation=2)
    update = max((full[name] - initial[name]).abs().max().item() for name in full)
    difference = max((full[name] - accumulated[name]).abs().max().item() for name in full)
    assert update > 0.1  # the step is large compared with the tolerance below
    assert difference < 1e-4, difference  # measured ~4e-6 (the residual 1e-6 codebook drift)
    assert loss_accumulated == pytest.approx(loss_full, rel=1e-5)

    # Control: without `num_items_in_batch` (micro-batch means averaged) the same comparison is far off.
    _, _, broken = _one_sgd_step(tmp_path, tiny_config, batch_size=2, accumulation=2, accepts_loss_kwargs=False)
    _, _, broken_full = _one_sgd_step(tmp_path, tiny_config, batch_size=4, accumulation=1, accepts_loss_kwargs=False)
    assert max((broken_full[name] - broken[name]).abs().max().item() for name in full) > 1e-2


def test_activation_checkpointing_gives_the_same_loss_curve(tmp_path, tiny_config, lm_data):
    """Trainer's `activation_checkpointing=True` (5.23's name for gradient checkpointing) recomputes every block in
    backward; the codebook is read before and updated after the blocks, once per forward, so the run is the same."""
    config = _byte_config(tiny_config, dropout=0.1, hidden_dropout=0.1)  # recompute must replay the dropout masks
    runs = {}
    for checkpointing in (False, True):
        set_seed(0)
        model = LongVQForCausalLM(config)
        calls = []
        # A pre-hook of a module inside the block: 5.23 checkpoints the block's `forward` (hooks of the block itself
        # run once), and the non-reentrant recompute stops early, before the block's last forward hooks.
        model.model.layers[0].attention.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        run = train_causal_lm(
            str(tmp_path / str(checkpointing)), model=model, datasets=lm_data, max_steps=8,
            per_device_train_batch_size=8, activation_checkpointing=checkpointing, **_quiet(),
        )  # fmt: skip
        runs[checkpointing] = (run.losses, codebook_summary(run.model), len(calls), run.model)
    plain, checkpointed = runs[False], runs[True]
    assert checkpointed[3].uses_activation_checkpointing and not plain[3].uses_activation_checkpointing
    assert (plain[2], checkpointed[2]) == (8, 16)  # each block really ran twice per step under checkpointing
    assert np.allclose(plain[0], checkpointed[0], rtol=0, atol=1e-6), (plain[0], checkpointed[0])  # measured: equal
    assert checkpointed[1]["sha256"] == plain[1]["sha256"]  # one codebook update per step, not two
    for (name, p), q in zip(plain[3].named_parameters(), checkpointed[3].parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


# ---------------------------------------------------------------------------------------------------------------------
# Sequence classification
# ---------------------------------------------------------------------------------------------------------------------


def test_sequence_classification_fine_tuning_reports_accuracy(tmp_path, tiny_config):
    data = byte_classification_datasets(block_size=BLOCK, seed=0)
    set_seed(0)
    config = _byte_config(tiny_config, bidirectional=True, num_labels=2, chunk_size=8)
    model = LongVQForSequenceClassification(config)
    trainer = classification_trainer(str(tmp_path), model, data, max_steps=300, per_device_train_batch_size=16)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert 0.0 <= before["eval_accuracy"] <= 1.0 and "eval_loss" in after
    # Both classes hold the same bytes, only their order differs: chance is 0.5. Measured 0.93-0.96 over seeds.
    assert after["eval_accuracy"] >= 0.75, after


# ---------------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, tiny_config, lm_data):
    """10 steps with a checkpoint at 5, versus resuming from that checkpoint: Trainer restores weights *and* the
    codebook buffers (persistent, saved in model.safetensors), optimizer, scheduler, RNG states (dropout) and the
    position in the seeded data order. Measured: bitwise equal; tolerance 1e-6."""
    config = _byte_config(tiny_config, dropout=0.1, hidden_dropout=0.1)
    common = dict(config=config, datasets=lm_data, max_steps=10, per_device_train_batch_size=8, warmup_steps=2)
    full = train_causal_lm(str(tmp_path / "full"), save_steps=5, **_quiet(), **common)
    checkpoint = tmp_path / "full" / "checkpoint-5"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert any(key.endswith("codebook_sum") for key in saved) and any(key.endswith("codebook_count") for key in saved)
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert (checkpoint / name).exists(), name
    assert any(name.startswith("rng_state") for name in os.listdir(checkpoint))

    resumed = train_causal_lm(str(tmp_path / "resumed"), resume_from_checkpoint=str(checkpoint), **_quiet(), **common)
    assert resumed.trainer.state.global_step == 10
    assert np.allclose(resumed.losses[5:], full.losses[5:], rtol=0, atol=1e-6)  # same batches, same order
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    assert any(key.endswith("codebook_sum") for key in actual) and any(key.endswith("codebook_count") for key in actual)
    for key in expected:
        assert torch.allclose(expected[key], actual[key], rtol=0, atol=1e-6), key
    # The codebooks moved during steps 6-10, so comparing them is not vacuous.
    moved = {k: v for k, v in saved.items() if k.endswith("codebook_sum")}
    assert any(not torch.equal(moved[k], actual[k]) for k in moved)
