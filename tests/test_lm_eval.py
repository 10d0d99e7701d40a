"""lm-evaluation-harness on an exported checkpoint, with stock arguments and remote code only.

A seeded random tiny byte-level model (`vocab_size=256`) is exported with
`export_checkpoint(model, folder, tokenizer=byte_tokenizer())`, which widens it to the tokenizer's 258 ids. The real
`lm_eval` CLI then runs three local tasks (tests/lm_eval_tasks: multiple choice, rolling perplexity and
`generate_until`; YAML + JSON-lines files, no download) twice, with `--batch_size 1` and `--batch_size 4`:

    lm_eval --model hf --model_args pretrained=<export>,trust_remote_code=True --tasks ... --include_path ...
            --batch_size N --output_path ... --log_samples

with no other model arguments, in a fresh interpreter that cannot import `longvq` (tests/remote_code.py), offline,
with HF_HOME and HF_MODULES_CACHE in a temporary folder. The tests compare the logged per-sample results across the
two batch sizes, and with a direct forward pass / greedy `generate` of the model in this process.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from longvq import LongVQForCausalLM
from longvq.hub import export_checkpoint
from longvq.tokenization import BYTE_EOS_ID, BYTE_PAD_ID, byte_tokenizer
from helpers import tiny_config
from remote_code import RESULT_PREFIX, run_without_longvq

pytest.importorskip("lm_eval")

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ("longvq_tiny_mc", "longvq_tiny_rolling", "longvq_tiny_gen")
BATCH_SIZES = (1, 4)

# Runs the `lm_eval` console script's entry point, then reports which LongVQ modules the interpreter loaded.
CHILD = f"""
from lm_eval.__main__ import cli_evaluate

sys.argv = ["lm_eval", *json.loads(sys.argv[1])]
cli_evaluate()
loaded = sorted(name for name, module in sys.modules.items() if "longvq" in name and module is not None)
print({RESULT_PREFIX!r} + json.dumps({{"hidden_by": hidden_by, "loaded": loaded}}), flush=True)
"""


def _random_byte_model() -> LongVQForCausalLM:
    """A seeded random tiny model over the 256 bytes only. A larger initialisation than the default makes its greedy
    continuations differ from prompt to prompt (a trained-for-seconds tiny model answers " the the the" to
    everything), so a batching or padding mistake would show in the generated text."""
    torch.manual_seed(0)
    return LongVQForCausalLM(tiny_config(vocab_size=256, initializer_range=0.2)).eval()


def _samples(folder: Path, task: str) -> list[dict]:
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return sorted(rows, key=lambda row: row["doc_id"])


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = _random_byte_model()
    export = export_checkpoint(model, root / "export", tokenizer=byte_tokenizer())
    runs = {}
    for batch_size in BATCH_SIZES:
        output = root / f"batch_{batch_size}"
        arguments = [
            "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
            "--tasks", ",".join(TASKS), "--include_path", str(TASKS_DIR), "--batch_size", str(batch_size),
            "--output_path", str(output), "--log_samples",
        ]  # fmt: skip
        child = run_without_longvq(CHILD, arguments, root, timeout=600)
        (results_file,) = output.rglob("results_*.json")
        runs[batch_size] = {
            "child": child,
            "results": json.loads(results_file.read_text(encoding="utf-8"))["results"],
            "samples": {task: _samples(output, task) for task in TASKS},
        }
    return {"model": model, "export": export, "runs": runs}


def _continuation_log_likelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Sum of the log-probabilities of the continuation given the context (one forward pass of context+continuation)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context_ids + continuation_ids])).logits[0]
    log_probs = logits.float().log_softmax(-1)
    start = len(context_ids)
    return sum(log_probs[start - 1 + i, token].item() for i, token in enumerate(continuation_ids))


def test_export_widened_the_byte_model_for_the_tokenizer(evaluation):
    config = json.loads((evaluation["export"] / "config.json").read_text())
    generation = json.loads((evaluation["export"] / "generation_config.json").read_text())
    assert config["vocab_size"] == len(byte_tokenizer()) == 258
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (BYTE_PAD_ID, 257, 257)
    assert generation["pad_token_id"] == BYTE_PAD_ID and generation["eos_token_id"] == BYTE_EOS_ID
    assert generation["suppress_tokens"] == [BYTE_PAD_ID, BYTE_EOS_ID]  # the two new rows are never generated


def test_lm_eval_ran_on_remote_code_only(evaluation):
    for run in evaluation["runs"].values():
        child = run["child"]
        assert child["hidden_by"] in {"meta-path finder removed", "sys.modules sentinel"}  # and import longvq failed
        loaded = child["loaded"]
        assert not [name for name in loaded if name == "longvq" or name.startswith("longvq.")], loaded
        code = [name for name in loaded if name.endswith(("configuration_longvq", "modeling_longvq"))]
        assert code and all(name.startswith("transformers_modules.") for name in code), loaded
        assert any(name.endswith(".modeling_longvq") for name in code)
        assert set(run["results"]) == set(TASKS)


def _numbers(response) -> list[float]:
    """The floats of one logged response: `[log-likelihood, is-greedy]` per request (multiple choice) or
    `[log-likelihood]` (rolling)."""
    return [float(value[0] if isinstance(value, list) else value) for value in response]


def test_batch_sizes_give_the_same_per_sample_results(evaluation):
    one, four = (evaluation["runs"][size] for size in BATCH_SIZES)
    for task in TASKS:
        assert [row["doc_id"] for row in one["samples"][task]] == [row["doc_id"] for row in four["samples"][task]]
        for a, b in zip(one["samples"][task], four["samples"][task]):
            if task == "longvq_tiny_gen":
                assert a["filtered_resps"] == b["filtered_resps"] and a["resps"] == b["resps"]
            else:
                assert _numbers(a["filtered_resps"]) == pytest.approx(_numbers(b["filtered_resps"]), abs=1e-4)
        for metric, value in one["results"][task].items():
            if isinstance(value, float) and math.isfinite(value):
                assert four["results"][task][metric] == pytest.approx(value, rel=1e-5), metric


def test_multiple_choice_log_likelihoods_equal_a_direct_forward(evaluation):
    model, tokenizer = evaluation["model"], byte_tokenizer()
    rows = evaluation["runs"][1]["samples"]["longvq_tiny_mc"]
    assert len(rows) == 6
    for row in rows:
        expected = []
        for request in row["arguments"].values():  # {"gen_args_<i>": {"arg_0": context, "arg_1": continuation}}
            context, continuation = request["arg_0"], request["arg_1"]
            context_ids = tokenizer(context)["input_ids"]
            expected.append(_continuation_log_likelihood(model, context_ids, tokenizer(continuation)["input_ids"]))
        assert _numbers(row["filtered_resps"]) == pytest.approx(expected, abs=1e-4)


def test_rolling_log_likelihoods_equal_a_direct_forward_after_the_bos_token(evaluation):
    model, tokenizer = evaluation["model"], byte_tokenizer()
    rows = evaluation["runs"][1]["samples"]["longvq_tiny_rolling"]
    assert len(rows) == 5
    total_log_likelihood = total_bytes = 0
    for row in rows:
        text_ids = tokenizer(row["arguments"]["gen_args_0"]["arg_0"])["input_ids"]
        # lm-eval scores a text from its first byte by prefixing the BOS id (= <|endoftext|>).
        expected = _continuation_log_likelihood(model, [tokenizer.bos_token_id], text_ids)
        assert _numbers(row["filtered_resps"]) == pytest.approx([expected], abs=1e-4)
        total_log_likelihood += expected
        total_bytes += len(text_ids)
    bits_per_byte = evaluation["runs"][1]["results"]["longvq_tiny_rolling"]["bits_per_byte,none"]
    assert bits_per_byte == pytest.approx(-total_log_likelihood / math.log(2) / total_bytes, rel=1e-5)


def test_generate_until_equals_greedy_generate_cut_at_the_stop_strings(evaluation):
    model, tokenizer = evaluation["model"], byte_tokenizer()
    rows = evaluation["runs"][1]["samples"]["longvq_tiny_gen"]
    assert len(rows) == 5
    for row in rows:
        inputs = tokenizer(row["arguments"]["gen_args_0"]["arg_0"], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for stop in (".", "\n"):
            text = text.split(stop)[0]
        assert row["filtered_resps"] == [text]
