"""The main job (`longvq-demo`): a fixed number of steps, deterministic, and an output folder that is a usable
checkpoint (tokenizer and generation config next to the weights, vocabulary covering the tokenizer, pipeline and padded
batches). The full default run, which must learn English-shaped text, is marked slow."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from longvq.demo import corpus_documents, load_corpus, main
from longvq.tokenization import BYTE_EOS_ID, BYTE_PAD_ID, byte_tokenizer

QUICK = ["--steps", "3", "--eval-every", "2", "--sample-bytes", "24"]


def _metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    main([*QUICK, "--out", str(out)])
    return out


def test_corpus_is_documents_separated_by_end_of_text():
    tokenizer = byte_tokenizer()
    ids = load_corpus(tokenizer).tolist()
    documents = corpus_documents()
    assert len(documents) > 10 and documents[1].startswith("Chapter 1.")
    assert ids.count(BYTE_EOS_ID) == len(documents) and ids[0] == BYTE_EOS_ID
    assert BYTE_PAD_ID not in ids
    expected = []
    for document in documents:
        expected += [BYTE_EOS_ID, *document.encode("utf-8")]
    assert ids == expected
    # The validation part (last 10%) is bytes only, so its bits per byte are over bytes.
    assert max(ids[int(0.9 * len(ids)) :]) < 256


def test_runs_the_requested_number_of_steps_with_a_progress_bar(tmp_path, capsys):
    main([*QUICK, "--out", str(tmp_path)])
    metrics = _metrics(tmp_path)
    assert metrics["steps"] == 3 and metrics["args"]["steps"] == 3
    assert [entry["step"] for entry in metrics["history"]] == [0, 2, 3]
    assert metrics["history"][-1]["bpb"] < metrics["history"][0]["bpb"]
    assert {"validation_curve.png", "metrics.json"} <= {path.name for path in tmp_path.iterdir()}
    captured = capsys.readouterr()
    assert "3/3" in captured.err  # the tqdm bar counts steps (with its ETA)
    assert "validation codebook usage per layer" in captured.out


def test_same_seed_same_run(demo_out, tmp_path):
    main([*QUICK, "--out", str(tmp_path)])
    first, second = _metrics(demo_out), _metrics(tmp_path)
    for entry in first["history"] + second["history"]:
        entry.pop("seconds")
    assert first["history"] == second["history"] and first["sample"] == second["sample"]
    weights, again = load_file(demo_out / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[name], again[name]) for name in weights)


def test_output_folder_is_a_checkpoint_with_tokenizer_and_special_ids(demo_out):
    names = {path.name for path in demo_out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    tokenizer = AutoTokenizer.from_pretrained(demo_out)
    model = AutoModelForCausalLM.from_pretrained(demo_out).eval()
    assert model.config.vocab_size == len(tokenizer) == 258
    for config in (model.config, model.generation_config):
        assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (256, 257, 257)
    assert tokenizer("The lighthouse")["input_ids"] == list(b"The lighthouse")

    batch = tokenizer(["The lighthouse keeper", "A"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0] == tokenizer.pad_token_id
    with torch.no_grad():
        padded = model.generate(**batch, max_new_tokens=5, do_sample=False)
        alone = model.generate(**tokenizer(["A"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert padded[1, -5:].tolist() == alone[0, -5:].tolist()

    generator = pipeline("text-generation", model=str(demo_out))
    texts = generator(["The lighthouse keeper", "A"], max_new_tokens=5, do_sample=False, batch_size=2)
    assert texts[0][0]["generated_text"].startswith("The lighthouse keeper")
    assert texts[1][0]["generated_text"] == tokenizer.decode(padded[1], skip_special_tokens=True)


@pytest.mark.parametrize("flag, kind", [("--steps", "integer"), ("--batch-size", "integer"), ("--lr", "number")])
def test_bad_arguments_exit_with_a_one_line_reason(flag, kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([flag, "0"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith(f"argument {flag}: must be a positive {kind}, got 0")


@pytest.mark.slow
def test_default_run_learns_english_shaped_text(tmp_path):
    main(["--out", str(tmp_path)])
    metrics = _metrics(tmp_path)
    first, last = metrics["history"][0]["bpb"], metrics["history"][-1]["bpb"]
    assert first > 8.5 and last < 3.2, (first, last)
    corpus_words = set(re.findall(r"[a-z]+", " ".join(corpus_documents()).lower()))
    sampled = re.findall(r"[a-z]+", metrics["sample"].lower())
    assert len(sampled) > 25
    assert sum(word in corpus_words for word in sampled) / len(sampled) > 0.5, metrics["sample"]
