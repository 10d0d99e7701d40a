"""Hub checkpoints: export with remote code, then load by repo id from an offline Hub cache in a process without longvq.

The remote-code round trip runs once per module (fixture `remote`): a tiny causal LM is trained for two steps, exported
with the byte tokenizer and a model card into `<tmp>/hub/models--longvq-test--tiny/snapshots/<sha>/` (+ `refs/main`),
and a fresh interpreter started with `HF_HOME=<tmp>`, `HF_HUB_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1`,
`HF_MODULES_CACHE=<tmp>/modules`, stdin=/dev/null and cwd=<tmp> loads everything by repo id with
`trust_remote_code=True`, generates, runs a pipeline, re-saves, and prints one JSON line that the tests check.

The child cannot import `longvq` (tests/remote_code.py says how the installed package is hidden); with the editable
install, removing its meta-path finder alone suffices, which the test asserts.
The child also checks that the remote code never needs `longvq`: both remote-code files are loaded from
`HF_MODULES_CACHE/transformers_modules/longvq_hyphen_test/tiny/<sha>/`.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, pipeline

from longvq import LongVQForCausalLM
from longvq.hub import AUTO_MAP, REMOTE_CODE_FILES, export_checkpoint, install_in_hub_cache
from longvq.model_card import build_model_card
from longvq.tokenization import BYTE_PAD_ID, byte_tokenizer
from helpers import tiny_config
from remote_code import run_without_longvq

REPO_ID = "longvq-test/tiny"
PROMPTS = ["The lighthouse keeper", "A long sequence é", "\U0001f600!"]
NEW_TOKENS = 12
PIPELINE_TOKENS = 6

CHILD = r"""
import torch
from transformers import (
    AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline,
)

repo, prompts, new_tokens, pipeline_tokens, resave_dir = json.loads(sys.argv[1])
out = {"hidden_by": hidden_by}

try:
    AutoModelForCausalLM.from_pretrained(repo)
    out["untrusted_error"] = None
except Exception as error:
    out["untrusted_error"] = [type(error).__name__, str(error)]

modules = {}
config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
modules["AutoConfig"] = [type(config).__module__, type(config).__name__]
for auto, kwargs in (
    (AutoModel, {}),
    (AutoModelForSequenceClassification, {"num_labels": 3}),
    (AutoModelForCausalLM, {}),
):
    model = auto.from_pretrained(repo, trust_remote_code=True, **kwargs)
    modules[auto.__name__] = [type(model).__module__, type(model).__name__]
    if auto is AutoModelForSequenceClassification:
        out["num_labels"] = [model.config.num_labels, list(model.score.weight.shape)]
out["modules"] = modules

tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
modules["AutoTokenizer"] = [type(tokenizer).__module__, type(tokenizer).__name__]
model.eval()
batch = tokenizer(prompts, padding=True, return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
out["input_ids"] = batch["input_ids"].tolist()
out["attention_mask"] = batch["attention_mask"].tolist()
out["generated"] = generated.tolist()

pipe = pipeline("text-generation", model=repo, trust_remote_code=True)
texts = pipe(prompts, max_new_tokens=pipeline_tokens, do_sample=False, batch_size=len(prompts))
out["pipeline"] = [result[0]["generated_text"] for result in texts]
out["pipeline_model"] = type(pipe.model).__module__

model.save_pretrained(resave_dir)
out["resaved_files"] = sorted(os.listdir(resave_dir))
with open(os.path.join(resave_dir, "config.json")) as handle:
    out["resaved_auto_map"] = json.load(handle).get("auto_map")
out["sys_path"] = sys.path
# A leading newline: the refused trust prompt above was written to stdout without one.
print("\nLONGVQ_RESULT " + json.dumps(out), flush=True)
"""


def _train_tiny_lm() -> LongVQForCausalLM:
    """A tiny byte-level causal LM (vocab 257: bytes + <pad>; the export widens it to the tokenizer's 258) after two
    optimizer steps on the embedded corpus."""
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config(vocab_size=BYTE_PAD_ID + 1, pad_token_id=BYTE_PAD_ID, eos_token_id=None))
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    data = (Path(__file__).resolve().parents[1] / "longvq" / "data" / "tiny_corpus.txt").read_bytes()[:96]
    ids = torch.tensor(list(data)).view(3, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, initial[name])]
    assert "model.embed_tokens.weight" in changed or any("embed" in name for name in changed)
    assert len(changed) > len(initial) // 2, "training did not move the weights away from init"
    return model


def _generate(model, tokenizer):
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return batch, out


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Export, lay out as a Hub cache, run the child process; returns a dict with everything the tests check."""
    root = tmp_path_factory.mktemp("hf_home")
    model = _train_tiny_lm()
    tokenizer = byte_tokenizer()
    card = build_model_card(
        "longvq-tiny-test",
        {"dataset": {"name": "tiny corpus", "type": "tiny"}, "metrics": [{"type": "bits_per_byte", "value": 7.9}]},
        {"steps": 2, "optimizer": "Adam"},
        repo_id=REPO_ID,
    )
    staging = export_checkpoint(model, root / "export", tokenizer=tokenizer, card=card)
    snapshot = install_in_hub_cache(staging, REPO_ID, root / "hub")

    arguments = [REPO_ID, PROMPTS, NEW_TOKENS, PIPELINE_TOKENS, str(root / "resaved")]
    child = run_without_longvq(CHILD, arguments, root)

    batch, generated = _generate(model, tokenizer)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    texts = pipe(PROMPTS, max_new_tokens=PIPELINE_TOKENS, do_sample=False, batch_size=len(PROMPTS))
    return {
        "root": root,
        "snapshot": snapshot,
        "staging": staging,
        "model": model,
        "child": child,
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "generated": generated.tolist(),
        "pipeline": [result[0]["generated_text"] for result in texts],
    }


def test_checkpoint_is_laid_out_like_the_hub_cache(remote):
    snapshot, root = remote["snapshot"], remote["root"]
    repo_dir = root / "hub" / "models--longvq-test--tiny"
    sha = (repo_dir / "refs" / "main").read_text().strip()
    assert len(sha) == 40 and all(c in "0123456789abcdef" for c in sha)
    assert snapshot == repo_dir / "snapshots" / sha
    names = {path.name for path in snapshot.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected | set(REMOTE_CODE_FILES) | {"README.md"} <= names
    assert "__init__.py" not in names
    # The remote-code files are the package's own source files.
    package = Path(__file__).resolve().parents[1] / "longvq"
    for name in REMOTE_CODE_FILES:
        assert (snapshot / name).read_bytes() == (package / name).read_bytes()
    # Weights are the trained ones, in safetensors.
    weights = load_file(snapshot / "model.safetensors")
    state = remote["model"].state_dict()
    assert torch.equal(weights["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_config_auto_map_has_all_four_entries(remote):
    config = json.loads((remote["snapshot"] / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_longvq.LongVQConfig",
        "AutoModel": "modeling_longvq.LongVQModel",
        "AutoModelForCausalLM": "modeling_longvq.LongVQForCausalLM",
        "AutoModelForSequenceClassification": "modeling_longvq.LongVQForSequenceClassification",
    }
    assert config["architectures"] == ["LongVQForCausalLM"]
    assert config["model_type"] == "longvq"


def test_child_process_could_not_import_longvq(remote):
    child = remote["child"]
    # With the editable install, removing its meta-path finder is enough; a regular install needs the sentinel.
    editable = any("__editable__" in str(getattr(finder, "__module__", "")) for finder in sys.meta_path)
    if editable:
        assert child["hidden_by"] == "meta-path finder removed"
    else:
        assert child["hidden_by"] in {"meta-path finder removed", "sys.modules sentinel"}
    assert not any(Path(entry or ".").resolve() == Path(__file__).resolve().parents[1] for entry in child["sys_path"])


def test_remote_code_classes_are_loaded_from_the_modules_cache(remote):
    modules = remote["child"]["modules"]
    expected = {
        "AutoConfig": "LongVQConfig",
        "AutoModel": "LongVQModel",
        "AutoModelForSequenceClassification": "LongVQForSequenceClassification",
        "AutoModelForCausalLM": "LongVQForCausalLM",
    }
    for auto, class_name in expected.items():
        module, name = modules[auto]
        assert name == class_name
        assert module.startswith("transformers_modules.") and module.endswith(
            "configuration_longvq" if auto == "AutoConfig" else "modeling_longvq"
        ), module
    assert remote["child"]["num_labels"] == [3, [3, 32]]
    assert modules["AutoTokenizer"][1] in {"TokenizersBackend", "PreTrainedTokenizerFast"}
    cached = list((remote["root"] / "modules" / "transformers_modules").rglob("modeling_longvq.py"))
    assert cached, "remote code was not cached under HF_MODULES_CACHE"


def test_remote_generate_matches_the_original_model(remote):
    child = remote["child"]
    assert child["input_ids"] == remote["input_ids"]
    assert child["attention_mask"] == remote["attention_mask"]
    assert child["input_ids"][0] == list(PROMPTS[0].encode("utf-8"))  # the longest prompt: no padding
    assert child["attention_mask"][2][0] == 0  # the shortest prompt is left-padded
    assert child["generated"] == remote["generated"]
    assert len(child["generated"][0]) == len(child["input_ids"][0]) + NEW_TOKENS


def test_remote_pipeline_runs_and_matches(remote):
    child = remote["child"]
    assert child["pipeline_model"].startswith("transformers_modules.")
    assert len(child["pipeline"]) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, child["pipeline"]):
        assert text.startswith(prompt) and len(text) > len(prompt)
    assert child["pipeline"] == remote["pipeline"]


def test_loading_without_trust_remote_code_fails(remote):
    error = remote["child"]["untrusted_error"]
    assert error is not None, "loading remote code without trust_remote_code succeeded"
    kind, message = error
    assert kind == "ValueError" and "trust_remote_code" in message


def test_resaving_a_remote_loaded_model_keeps_the_full_auto_map(remote):
    child = remote["child"]
    assert child["resaved_auto_map"] == AUTO_MAP
    assert set(REMOTE_CODE_FILES) <= set(child["resaved_files"])
    assert "model.safetensors" in child["resaved_files"]


# ---- in-process checks of export_checkpoint -------------------------------------------------------------------------


def test_export_rejects_subclasses(tmp_path):
    class MyLongVQ(LongVQForCausalLM):
        pass

    with pytest.raises(TypeError, match="expects one of"):
        export_checkpoint(MyLongVQ(tiny_config()), tmp_path)


def test_export_widens_a_model_smaller_than_the_tokenizer(tmp_path):
    torch.manual_seed(1)
    model = LongVQForCausalLM(tiny_config(vocab_size=256)).eval()
    byte_rows = model.get_input_embeddings().weight.detach().clone()
    tokenizer = byte_tokenizer()
    prompt = tokenizer("The lighthouse keeper", return_tensors="pt")
    with torch.no_grad():
        before = model.generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)

    folder = export_checkpoint(model, tmp_path / "widened", tokenizer=tokenizer)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["vocab_size"] == model.config.vocab_size == len(tokenizer) == 258  # widened in place, then saved
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (256, 257, 257)
    assert generation["suppress_tokens"] == [256, 257] and generation["pad_token_id"] == 256
    assert torch.equal(model.get_input_embeddings().weight[:256], byte_rows)

    # The byte rows are untouched and the new rows are never generated; padded batches are in range.
    exported = LongVQForCausalLM.from_pretrained(folder).eval()
    batch = tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(exported.generate(**prompt, max_new_tokens=10, do_sample=False), before)
        exported.generate(**batch, max_new_tokens=3, do_sample=False)

    # A model that already covers the tokenizer is saved as it is.
    fitting = LongVQForCausalLM(tiny_config(vocab_size=len(tokenizer)))
    folder = export_checkpoint(fitting, tmp_path / "fitting", tokenizer=tokenizer)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 258
    assert not json.loads((folder / "generation_config.json").read_text()).get("suppress_tokens")


def test_export_cli_widens_a_256_byte_model_for_the_tokenizer(tmp_path):
    from longvq.hub import main

    torch.manual_seed(1)
    model = LongVQForCausalLM(tiny_config(vocab_size=256)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    metrics = {"args": {"lr": 0.003}, "steps": 3, "history": [{"step": 3, "bpb": 7.5}]}
    (tmp_path / "ckpt" / "metrics.json").write_text(json.dumps(metrics))
    main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--repo-id", "me/byte-lm"])

    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 258 and config["pad_token_id"] == 256 and config["auto_map"] == AUTO_MAP
    assert config["bos_token_id"] == config["eos_token_id"] == 257
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [256, 257] and generation["pad_token_id"] == 256
    card = (out / "README.md").read_text()
    assert '"me/byte-lm", trust_remote_code=True' in card and "7.5" in card and "<|endoftext|>" in card

    # The byte rows are untouched and the new rows are never generated: greedy output is the original model's.
    exported = LongVQForCausalLM.from_pretrained(out).eval()
    tokenizer = byte_tokenizer()
    prompt = tokenizer("The lighthouse keeper", return_tensors="pt")
    with torch.no_grad():
        before = model.generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        after = exported.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(before, after)
    batch = tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    with torch.no_grad():
        exported.generate(**batch, max_new_tokens=3, do_sample=False)  # padded ids are in range now

    main([str(tmp_path / "ckpt"), str(tmp_path / "bare"), "--no-special-tokens", "--no-card"])
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["vocab_size"] == 256
    assert len(AutoTokenizer.from_pretrained(tmp_path / "bare")) == 256
