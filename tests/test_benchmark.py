"""The decode benchmark runs end to end at toy sizes (its targets are measured by the CLI, not here)."""

import json

from longvq.benchmark import build_models, decode_table, decode_targets, main, run_decode


def test_decode_benchmark_reports_constant_longvq_state_and_growing_kv_cache():
    models = build_models(hidden_size=32, num_layers=2, vocab_size=64, chunk_size=8, codebook_size=8)
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
    assert {r["model"] for r in payload["results"]} == {"longvq", "llama"}
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert "| context |" in capsys.readouterr().out
