"""Training reliability: a Trainer process killed with SIGKILL after a checkpoint resumes to the same result as an
uninterrupted run (codebooks included), and `CodebookHealthCallback` logs codebook usage and perplexity, also while
a collapsed codebook recovers through dead-code restarts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longvq import LongVQForCausalLM
from longvq.training import (
    CodebookHealthCallback,
    byte_lm_config,
    codebook_summary,
    train_causal_lm,
)

# Dropout (RNG state) and dead-code restarts (random batch keys) make the resume non-trivial.
CONFIG = {
    "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "shared_representation_size": 16,
    "ema_projection_size": 4, "codebook_size": 16, "chunk_size": 8, "dropout": 0.1, "hidden_dropout": 0.1,
    "codebook_restart_threshold": 0.5,
}  # fmt: skip
RUN = {
    "config": CONFIG, "block_size": 32, "max_steps": 8, "per_device_train_batch_size": 4, "save_steps": 4,
    "logging_steps": 1, "warmup_steps": 2, "evaluate": False, "save_final_model": False,
}  # fmt: skip
KILL_AT_STEP = 6  # the child stalls at the start of step 6 (checkpoint-4 written, steps 5-6 lost) and is killed

_CHILD = """
import sys, time
from pathlib import Path
import torch
from transformers import TrainerCallback
from longvq.training import train_causal_lm

output_dir, marker, run, kill_at = sys.argv[1], Path(sys.argv[2]), eval(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)

class Stall(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == kill_at - 1:
            marker.write_text(str(state.global_step))
            time.sleep(600)  # killed here, in the middle of the run

train_causal_lm(output_dir, callbacks=[Stall()], **run)
"""


def _kill_after_checkpoint(output_dir: Path, tmp_path: Path):
    marker = tmp_path / "stalled"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(output_dir), str(marker), repr(RUN), str(KILL_AT_STEP)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"training process exited early:\n{child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("training process never reached the kill point")
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()


def test_a_killed_training_process_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL at step 6 (last checkpoint: step 4), resume in a fresh Trainer: final loss, every parameter and the
    codebook buffers equal an uninterrupted 8-step run. Measured: bitwise equal; tolerance 1e-6."""
    killed_dir = tmp_path / "killed"
    _kill_after_checkpoint(killed_dir, tmp_path)
    checkpoints = sorted(p.name for p in killed_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-4"]  # the kill came after the checkpoint and before the end
    assert json.loads((killed_dir / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process
    try:
        resumed = train_causal_lm(str(killed_dir), resume_from_checkpoint=True, **RUN)
        full = train_causal_lm(str(tmp_path / "full"), **RUN)
    finally:
        torch.set_num_threads(threads)
    assert resumed.trainer.state.global_step == full.trainer.state.global_step == 8
    # The resumed log history is the checkpoint's (steps 1-4) followed by the retrained steps 5-8.
    assert len(resumed.losses) == len(full.losses) == 8
    assert resumed.losses[-1] == pytest.approx(full.losses[-1], abs=1e-6)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    resumed_layers, full_layers = codebook_summary(resumed.model)["layers"], codebook_summary(full.model)["layers"]
    assert len(resumed_layers) == len(full_layers)
    for resumed_layer, full_layer in zip(resumed_layers, full_layers):
        assert resumed_layer == pytest.approx(full_layer, abs=1e-5)  # one flat dict per layer (pytest 9 refuses nesting)
    # Not vacuous: the codebooks moved after the checkpoint the run resumed from.
    checkpoint = LongVQForCausalLM.from_pretrained(str(killed_dir / "checkpoint-4"))
    assert codebook_summary(checkpoint)["sha256"] != codebook_summary(full.model)["sha256"]


class _CountingHealth(CodebookHealthCallback):
    """Also records how many tokens each layer counted between logs."""

    def __init__(self):
        super().__init__()
        self.tokens = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.tokens.append([float(counts.sum()) for counts in self.counter.counts])
        super().on_log(args, state, control, logs=logs, **kwargs)


def test_codebook_health_is_logged_per_layer_and_counts_each_token_once(tmp_path):
    health = _CountingHealth()
    run = train_causal_lm(
        str(tmp_path), config=CONFIG, block_size=32, max_steps=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, activation_checkpointing=True, logging_steps=2, callbacks=[health],
        eval_steps=2, save_final_model=False,
    )  # fmt: skip
    assert run.trainer.callback_handler.callbacks[0] is health  # first, so reporters see the values
    train_logs = [entry for entry in run.trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    size = CONFIG["codebook_size"]
    for entry in train_logs:
        for layer in range(CONFIG["num_hidden_layers"]):
            assert 0 < entry[f"codebook_usage_layer{layer}"] <= 1
            assert 1 <= entry[f"codebook_perplexity_layer{layer}"] <= size + 1e-4
        usages = [entry[f"codebook_usage_layer{layer}"] for layer in range(CONFIG["num_hidden_layers"])]
        assert entry["codebook_usage"] == pytest.approx(sum(usages) / len(usages))
        assert "codebook_perplexity" in entry
    # 2 steps x 2 micro-batches x 4 rows x 32 tokens per log, counted once although checkpointing replays each
    # forward in backward; evaluation forwards are not counted.
    assert health.tokens == [[512.0, 512.0], [512.0, 512.0]]
    assert not any("codebook_usage" in entry for entry in run.trainer.state.log_history if "eval_loss" in entry)


def test_health_log_shows_a_collapsed_codebook_recovering(tmp_path):
    """Every codeword but one pushed far away: the first log shows usage 1/S and perplexity 1; dead-code restarts
    (from the batch's keys) bring usage and perplexity back up in the following steps."""
    torch.manual_seed(0)
    model = LongVQForCausalLM(byte_lm_config(**CONFIG))
    size = CONFIG["codebook_size"]
    for layer in model.model.layers:
        quantizer = layer.attention.quantizer
        quantizer.codebook_sum.fill_(1e3)
        quantizer.codebook_sum[3] = 0.0
        quantizer.codebook_count.fill_(1e-3)
        quantizer.codebook_count[3] = 1.0
    run = train_causal_lm(
        str(tmp_path), model=model, block_size=32, max_steps=6, per_device_train_batch_size=4, logging_steps=1,
        evaluate=False, save_final_model=False,
    )  # fmt: skip
    logs = [entry for entry in run.trainer.state.log_history if "loss" in entry]
    assert logs[0]["codebook_usage"] == pytest.approx(1 / size)
    assert logs[0]["codebook_perplexity"] == pytest.approx(1.0)
    assert logs[-1]["codebook_usage"] >= 0.5, [entry["codebook_usage"] for entry in logs]
    assert logs[-1]["codebook_perplexity"] > 4
