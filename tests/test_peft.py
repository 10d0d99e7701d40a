"""LoRA (PEFT) on LongVQ: the causal LM and the sequence classifier, with the Trainer.

Decisions under test (see `longvq.training.LORA_TARGET_MODULES` and `LongVQPreTrainedModel.freeze_codebooks`):
- LoRA targets the block's linear layers `value_proj`, `mix_proj`, `out_proj`, `fc1`, `fc2` (= PEFT's "all-linear");
- the raw EMA / q-k affine / relative-bias parameters stay frozen, or are trained as full copies via
  `modules_to_save=["ema", "position_bias"]`;
- the codebook buffers are frozen during LoRA fine-tuning (`freeze_codebooks()`): an adapter file holds adapter weights
  only, so a codebook moved by the EMA k-means in training-mode forwards would be lost on reload (and would alter the
  base shared by other adapters). With them frozen, adapter + base reproduce the fine-tuned model exactly.
"""

import copy

import pytest
import torch
from transformers import set_seed

peft = pytest.importorskip("peft")
from helpers import tiny_config
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from longvq import LongVQForCausalLM, LongVQForSequenceClassification
from longvq.training import (
    LORA_TARGET_MODULES,
    byte_classification_datasets,
    byte_lm_datasets,
    classification_trainer,
    codebook_summary,
    codebooks_frozen,
    train_causal_lm,
)

# PEFT 0.21 still reads `is_gradient_checkpointing`, which transformers 5.23 renamed (warning only).
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RAW_PARAMETERS = ("damping_logit", "decay_logit", "expansion", "projection", "residual_weight", "query_key_scale",
                  "query_key_offset", "position_bias.weight")  # fmt: skip


def _lora(task, **overrides):
    return LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGET_MODULES), task_type=task, **overrides)


def _causal_lm():
    set_seed(0)
    return LongVQForCausalLM(tiny_config(vocab_size=256))


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 21), generator=generator)


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    """A LoRA adapter on the causal LM, fine-tuned with Trainer for a few steps (codebooks frozen); the base model is
    saved first, so it can be reloaded from disk."""
    folder = tmp_path_factory.mktemp("lora")
    base = _causal_lm()
    base.save_pretrained(folder / "base")
    base_logits = _logits(base, _inputs())
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base.freeze_codebooks(), _lora(TaskType.CAUSAL_LM))
    run = train_causal_lm(
        str(folder / "adapter"), model=model, datasets=byte_lm_datasets(block_size=32, seed=0), max_steps=10,
        per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
    )  # fmt: skip
    return {"folder": folder, "model": model, "run": run, "base_logits": base_logits, "base_state": base_state}


def test_only_lora_parameters_are_trainable():
    model = get_peft_model(_causal_lm(), _lora(TaskType.CAUSAL_LM))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == set(LORA_TARGET_MODULES)
    assert len(trainable) == 2 * len(LORA_TARGET_MODULES) * model.config.num_hidden_layers
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    for raw in RAW_PARAMETERS:  # raw nn.Parameters: LoRA cannot wrap them, they stay frozen
        assert any(name.endswith(raw) for name in frozen), raw

    # PEFT's "all-linear" picks the same layers (it leaves the output layer out).
    everything = get_peft_model(
        _causal_lm(), LoraConfig(r=4, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)
    )
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in everything.named_parameters() if ".lora_A." in n}
    assert names == set(LORA_TARGET_MODULES)


def test_lora_training_changes_outputs_but_not_the_base_or_codebooks(trained_lora):
    model, run = trained_lora["model"], trained_lora["run"]
    assert codebooks_frozen(model)
    assert run.losses[-1] < run.losses[0]
    assert "eval_bpb" in run.eval_metrics
    logits = _logits(model, _inputs())
    assert (logits - trained_lora["base_logits"]).abs().max() > 1e-2  # the adapter changed the outputs
    # Base weights and codebook buffers are exactly as before fine-tuning (LoRA-wrapped layers keep theirs under
    # `<layer>.base_layer.`).
    base_state = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()}
    for key, value in trained_lora["base_state"].items():
        assert torch.equal(base_state[key], value), key
    # Saved by Trainer: the adapter only (no full model weights).
    adapter_dir = trained_lora["folder"] / "adapter"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    assert not (adapter_dir / "model.safetensors").exists()


def test_codebooks_update_during_lora_unless_frozen():
    """Control for the choice above: the EMA k-means runs in any training-mode forward, PEFT or not."""
    model = get_peft_model(_causal_lm(), _lora(TaskType.CAUSAL_LM))
    ids = _inputs()
    before = codebook_summary(model)["sha256"]
    model.train()
    model.freeze_codebooks()  # through the PEFT model to the LongVQ model's method
    model(input_ids=ids, labels=ids)
    assert codebook_summary(model)["sha256"] == before
    model.freeze_codebooks(False)
    assert not codebooks_frozen(model)
    model(input_ids=ids, labels=ids)
    assert codebook_summary(model)["sha256"] != before


def test_merge_and_unload_matches_the_adapted_model(trained_lora):
    model = copy.deepcopy(trained_lora["model"])
    ids = _inputs()
    expected = _logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged) is LongVQForCausalLM
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=0)


def test_adapter_saves_and_loads_offline(trained_lora, tmp_path):
    ids = _inputs()
    expected = _logits(trained_lora["model"], ids)
    trained_lora["model"].save_pretrained(tmp_path / "adapter")
    base = LongVQForCausalLM.from_pretrained(trained_lora["folder"] / "base")  # HF_HUB_OFFLINE=1 (conftest)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=0)
    # The adapter folder written by Trainer loads the same way.
    base = LongVQForCausalLM.from_pretrained(trained_lora["folder"] / "base")
    loaded = PeftModel.from_pretrained(base, trained_lora["folder"] / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=0)


def test_modules_to_save_trains_ema_and_positional_bias(tmp_path):
    base = _causal_lm()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base.freeze_codebooks(), _lora(TaskType.CAUSAL_LM, modules_to_save=["ema", "position_bias"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    copies = [name for name in trainable if ".modules_to_save." in name]
    for raw in ("damping_logit", "decay_logit", "expansion", "projection", "residual_weight", "position_bias"):
        assert any(raw in name for name in copies), raw
    assert not any("query_key" in name for name in trainable)  # on the attention module itself: stays frozen
    before = {name: p.detach().clone() for name, p in model.named_parameters() if ".modules_to_save." in name}

    ids = _inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)

    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(LongVQForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model.merge_and_unload(), ids), expected, atol=1e-5, rtol=0)


def test_lora_sequence_classifier_keeps_score_trainable(tmp_path):
    set_seed(0)
    base = LongVQForSequenceClassification(tiny_config(vocab_size=256, bidirectional=True, num_labels=2, chunk_size=8))
    model = get_peft_model(base.freeze_codebooks(), _lora(TaskType.SEQ_CLS))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    head = [name for name in trainable if ".score." in name]
    assert {name.rsplit(".", 1)[-1] for name in head} == {"weight", "bias"}  # SEQ_CLS keeps `score` trainable
    assert all(".lora_" in name or ".score." in name for name in trainable)
    score_before = {name: p.detach().clone() for name, p in model.named_parameters() if name in head}
    codebooks = codebook_summary(model)["sha256"]

    data = byte_classification_datasets(block_size=32, seed=0)
    trainer = classification_trainer(str(tmp_path), model, data, max_steps=20, per_device_train_batch_size=16)
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert all(not torch.equal(p, score_before[name]) for name, p in model.named_parameters() if name in head)
    assert codebook_summary(model)["sha256"] == codebooks

    ids = _inputs()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is LongVQForSequenceClassification
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=0)
    set_seed(0)  # the same base initialisation
    fresh = LongVQForSequenceClassification(tiny_config(vocab_size=256, bidirectional=True, num_labels=2, chunk_size=8))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=0)


def test_lora_with_activation_checkpointing_trains_the_adapters(tmp_path):
    """Trainer(activation_checkpointing=True) on a PEFT model: the frozen embedding does not cut the adapters'
    gradients (5.23 checkpoints non-reentrantly), and the loss curve equals the one without checkpointing."""
    data = byte_lm_datasets(block_size=32, seed=0)
    curves = {}
    for checkpointing in (False, True):
        model = get_peft_model(_causal_lm().freeze_codebooks(), _lora(TaskType.CAUSAL_LM))
        before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        run = train_causal_lm(
            str(tmp_path / str(checkpointing)), model=model, datasets=data, max_steps=4, per_device_train_batch_size=8,
            learning_rate=1e-2, activation_checkpointing=checkpointing, logging_steps=1, evaluate=False,
            save_final_model=False,
        )  # fmt: skip
        changed = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
        assert len(changed) == len(before)  # every LoRA matrix got a gradient (lora_B starts at zero)
        curves[checkpointing] = run.losses
    assert curves[True] == pytest.approx(curves[False], abs=1e-6)
