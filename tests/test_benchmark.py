"""The benchmarks run end to end at toy sizes (their targets are measured by the CLI, not here)."""

import dataclasses
import json

import pytest
import torch

from longvq.benchmark import (
    TrainResult,
    benchmark_config,
    benchmark_model,
    benchmark_models,
    decode_table,
    decode_targets,
    longvq_train_flops,
    main,
    measure_train_point,
    run_decode,
    saved_floats_per_token_layer,
    train_table,
    train_targets,
)
from longvq.experiments import BASELINES, count_parameters


def test_decode_benchmark_reports_constant_longvq_state_and_growing_kv_cache():
    models = benchmark_models(hidden_size=32, num_layers=2, vocab_size=64, chunk_size=8, codebook_size=8)
    results = run_decode(contexts=[16, 64], steps=2, models=models)
    state = {(r.model, r.context): r.state_bytes for r in results}
    assert state[("longvq", 16)] == state[("longvq", 64)] > 0
    assert state[("llama", 64)] > state[("llama", 16)]
    assert all(r.ms_per_token > 0 for r in results)
    assert decode_table(results).count("\n") == 3
    assert decode_targets(results)["longvq_state_bytes_constant"] is True


def test_decode_cli_writes_json_and_png(tmp_path, capsys):
    main(["decode", "--contexts", "8", "16", "--steps", "1", "--hidden-size", "32", "--layers", "1",
          "--chunk-size", "4", "--codebook-size", "4", "--out", str(tmp_path)])  # fmt: skip
    payload = json.loads((tmp_path / "decode.json").read_text())
    assert {r["model"] for r in payload["decode"]["results"]} == {"longvq", "llama"}
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert "| context |" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["longvq", "longvq+ckpt", "llama", "mamba"])
def test_train_point_measures_throughput_and_memory(name):
    result = measure_train_point(name, 64, hidden_size=32, num_layers=1, min_seconds=0.0, max_steps=2)
    assert result.tokens_per_second > 0 and result.seconds_per_step > 0 and result.parameters > 0
    assert result.peak_memory_bytes >= 0
    assert (result.achieved_flops is not None) == name.startswith("longvq")


def test_flop_model_counts_projections_attention_and_head():
    config = benchmark_config(hidden_size=64, num_layers=2, vocab_size=100, chunk_size=16, codebook_size=8)
    d, h, z, c, s = 64, 128, 16, 16, 8
    per_token = 2 * ((d * h + d * (2 * d + z + h) + h * d + 2 * d * h) + (2 * c * z + s * z + (2 * c + s) * h)) + d * 100
    assert longvq_train_flops(config, 10) == 3 * 2 * per_token * 10
    # The model it describes has exactly these layer shapes.
    model = benchmark_model("longvq", hidden_size=64, num_layers=2, vocab_size=100, chunk_size=16, codebook_size=8)
    assert model.model.layers[0].attention.mix_proj.out_features == 2 * d + z + h


def test_train_targets_and_table_from_results():
    def result(model, length, tokens_per_second, memory):
        return TrainResult(model, length, 256, 1, length / tokens_per_second, tokens_per_second, 0.0, memory, 1e9, 1e9)

    results = [
        result("longvq", 1024, 1000, 100), result("llama", 1024, 1000, 100), result("mamba", 1024, 5, 100),
        result("longvq", 16384, 900, 200), result("llama", 16384, 300, 1000), result("longvq+ckpt", 16384, 700, 50),
        result("longvq", 65536, 850, 400), result("llama", 65536, 50, 4000),
    ]  # fmt: skip
    targets = train_targets(results, matmul_peak=2e9, flops_point=result("longvq", 16384, 1, 1))
    assert targets["longvq_tokens_per_s_65536_over_1024"] == pytest.approx(0.85)
    assert targets["longvq_over_llama_tokens_per_s_at_16384"] == pytest.approx(3.0)
    assert targets["longvq_over_mamba_tokens_per_s_at_1024"] == pytest.approx(200.0)
    assert targets["longvq_ckpt_over_llama_peak_memory_at_16384"] == pytest.approx(0.05)
    assert targets["longvq_ckpt_over_llama_ckpt_peak_memory_at_16384"] is None  # not measured
    assert targets["longvq_d256_at_16384_fraction_of_matmul_peak"] == pytest.approx(0.5)
    table = train_table(results)
    assert table.count("\n") == 4 and "| 65536 |" in table


def test_train_cli_runs_points_in_subprocesses(tmp_path, capsys):
    main(["train", "--lengths", "64", "--models", "longvq", "llama", "longvq+ckpt", "--checkpointing-lengths", "32",
          "--hidden-size", "32", "--layers", "1",
          "--min-seconds", "0", "--flops-hidden-size", "0", "--out", str(tmp_path)])  # fmt: skip
    payload = json.loads((tmp_path / "train.json").read_text())
    assert {(r["model"], r["length"]) for r in payload["train"]["results"]} == {
        ("longvq", 64), ("llama", 64), ("longvq+ckpt", 32),
    }
    assert (tmp_path / "train.png").stat().st_size > 0
    assert "| length |" in capsys.readouterr().out


def test_baselines_come_from_the_experiments_registry(monkeypatch):
    built, mamba = [], BASELINES["mamba"]

    def recording_config(reference):
        built.append(reference)
        return mamba.config(reference)

    monkeypatch.setitem(BASELINES, "mamba", dataclasses.replace(mamba, config=recording_config))
    benchmark_model("mamba", hidden_size=32, num_layers=1)
    assert [(r.config.hidden_size, r.config.num_hidden_layers, r.head) for r in built] == [(32, 1, "causal_lm")]
    # Llama: the registry's, sized to the benchmarked LongVQ's parameter count (a same-width Llama is 3% off here).
    longvq, llama = benchmark_model("longvq", num_layers=1), benchmark_model("llama", num_layers=1)
    assert llama.config.num_hidden_layers == 1 and llama.config._attn_implementation == "sdpa"
    assert abs(count_parameters(llama) / count_parameters(longvq) - 1) < 0.01


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel benchmark runs on a CUDA device")
def test_kernel_benchmark_needs_a_cuda_device(capsys):
    from longvq.cli import benchmark

    assert benchmark(["kernel"]) == 1
    assert capsys.readouterr().err.strip() == "longvq-benchmark: error: the kernel benchmark needs a CUDA device"


def test_saved_floats_count_what_backward_keeps_and_the_fused_gates_save_less(monkeypatch):
    from longvq import modeling_longvq, ops_longvq

    fused = saved_floats_per_token_layer("longvq", 64, hidden_size=32, num_layers=2)
    monkeypatch.setattr(modeling_longvq, "silu_gated_linear", ops_longvq.naive_silu_gated_linear)
    monkeypatch.setattr(modeling_longvq, "gated_residual", ops_longvq.naive_gated_residual)
    plain = saved_floats_per_token_layer("longvq", 64, hidden_size=32, num_layers=2)
    # out_proj's input o * SiLU(r) and SiLU(r) (H = 64 each), fc2's SiLU(h) (64), SiLU(p) and sigmoid(u) (D = 32 each)
    assert plain - fused == pytest.approx(3 * 64 + 2 * 32, abs=8)
    assert saved_floats_per_token_layer("llama", 64, hidden_size=32, num_layers=2) > 0
