"""Data-parallel training on CPU: the `longvq-train-clm` command, started by the launchers as the module
`longvq.training` (`-m`), in 2 processes (gloo) against 1 process over the same global batch (2 x 2 versus 4). Checks
that the replicas' codebooks stay bitwise identical (the model all-reduces its EMA k-means statistics; DDP's buffer
broadcast is off) and that loss curve, eval bits per byte and codebooks match the single-process run (measured:
losses within 5e-7 over 8 steps, bpb within 3e-8; tolerance 1e-4).

Launchers: `accelerate launch` with DDP and with FSDP2 (explicit config files, so a user's default accelerate config
cannot leak in), and `torchrun` (`python -m torch.distributed.run`), each with `-m longvq.training`. Note: in
accelerate 1.15, `accelerate launch --cpu --num_processes 2` starts ONE process unless MPI is set up
(`--mpirun_hostfile`); the multi-process CPU launch is the torch.distributed one (`distributed_type: MULTI_GPU` /
`--multi_gpu`), where the command, finding no GPU (or given `--use_cpu`), uses the gloo backend. The tests assert
`world_size == 2` so such a silent fallback would fail them. About 7 s per launch on 2 cores.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import set_seed

from longvq import LongVQForCausalLM
from longvq.training import byte_lm_config, codebook_summary, main

ROOT = Path(__file__).resolve().parents[1]
MODULE = "longvq.training"  # `python -m longvq.training` is longvq-train-clm; launchers start it with `-m`
STEPS = 8
MODEL = dict(
    hidden_size=32, intermediate_size=64, shared_representation_size=16, ema_projection_size=4, codebook_size=8,
    chunk_size=8,
)  # fmt: skip
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
"""
# FSDP2, one unit per LongVQ block (`_no_split_modules`), full state dict so that checkpoints are plain safetensors.
FSDP_CONFIG = (
    ACCELERATE_CONFIG.replace("MULTI_GPU", "FSDP")
    + """\
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LongVQBlock
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
"""
)


def _command_args(output_dir, per_device_batch, *extra):
    return [
        "--output_dir", str(output_dir), "--max_steps", str(STEPS), "--block_size", "64", "--seed", "0",
        "--per_device_train_batch_size", str(per_device_batch), "--per_device_eval_batch_size", "4",
        "--config_overrides", ",".join(f"{k}={v}" for k, v in MODEL.items()), "--logging_steps", "1",
        "--rank_codebooks", "--use_cpu", *extra,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(launcher, tmp_path, output_dir, *extra):
    port = str(_free_port())
    if launcher in ("accelerate", "fsdp"):
        config = tmp_path / "accelerate_config.yaml"
        config.write_text(ACCELERATE_CONFIG if launcher == "accelerate" else FSDP_CONFIG)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        command += ["--main_process_port", port]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += ["-m", MODULE, *_command_args(output_dir, 2, *extra)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"{' '.join(command)}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return json.loads((output_dir / "results.json").read_text())


def _read_rank_codebooks(output_dir):
    return {path.name: json.loads(path.read_text()) for path in sorted((output_dir / "codebooks").glob("rank*.json"))}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, per-device batch 4 (= 2 processes x 2), same seed, data and steps."""
    output_dir = tmp_path_factory.mktemp("single") / "run"
    main(_command_args(output_dir, 4, "--no_save_model"))
    return json.loads((output_dir / "results.json").read_text())


def _check_against_single_process(results, codebooks, single):
    assert results["world_size"] == 2 and results["global_batch_size"] == 4 == single["global_batch_size"]
    assert single["world_size"] == 1 and results["steps"] == single["steps"] == STEPS

    # (a) The replicas' codebooks are bitwise identical (DDP buffer broadcast is off, so only the model's all-reduce
    # of the EMA statistics keeps them equal) and differ from their initialisation.
    assert set(codebooks) == {"rank0.json", "rank1.json"}
    assert codebooks["rank0.json"]["sha256"] == codebooks["rank1.json"]["sha256"]
    assert codebooks["rank0.json"]["layers"] == codebooks["rank1.json"]["layers"]
    set_seed(0)
    initial = codebook_summary(LongVQForCausalLM(byte_lm_config(**MODEL)))
    assert codebooks["rank0.json"]["sha256"] != initial["sha256"]

    # (b) Same global batch -> same loss curve, eval bits per byte and codebooks as one process, up to float
    # summation order (gradient mean over ranks, all-reduced statistics). Measured: <= 1e-6 on the losses.
    assert np.allclose(results["losses"], single["losses"], rtol=0, atol=1e-4), (results["losses"], single["losses"])
    assert results["eval_bpb"] == pytest.approx(single["eval_bpb"], abs=1e-4)
    for replica, reference in zip(results["codebooks"]["layers"], single["codebooks"]["layers"]):
        for key in ("codebook_sum", "codebook_count"):
            assert replica[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-4)


def test_accelerate_launch_two_processes_match_one(tmp_path, single_process):
    output_dir = tmp_path / "ddp"
    results = _run_two_processes("accelerate", tmp_path, output_dir, "--no_save_model")
    _check_against_single_process(results, _read_rank_codebooks(output_dir), single_process)


def test_torchrun_two_processes_with_activation_checkpointing_match_one(tmp_path, single_process):
    """The same command under torchrun, with activation checkpointing in both replicas (DDP + recompute)."""
    output_dir = tmp_path / "ddp"
    results = _run_two_processes("torchrun", tmp_path, output_dir, "--no_save_model", "--activation_checkpointing")
    _check_against_single_process(results, _read_rank_codebooks(output_dir), single_process)


def test_accelerate_fsdp2_two_processes_match_one_and_save_the_codebooks(tmp_path, single_process):
    """FSDP2 (parameters sharded per LongVQ block; the codebook buffers are not sharded and stay replicated), with a
    checkpoint mid-run and the final model saved as safetensors from the full state dict."""
    output_dir = tmp_path / "fsdp"
    results = _run_two_processes("fsdp", tmp_path, output_dir, "--save_steps", str(STEPS // 2))
    _check_against_single_process(results, _read_rank_codebooks(output_dir), single_process)
    assert (output_dir / f"checkpoint-{STEPS // 2}" / "model.safetensors").exists()
    saved = LongVQForCausalLM.from_pretrained(output_dir)
    assert codebook_summary(saved)["sha256"] == results["codebooks"]["sha256"]
