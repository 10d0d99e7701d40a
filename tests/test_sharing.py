"""Sharing through the standard paths: `save_pretrained`, `push_to_hub` and `Trainer` checkpoints (with the tokenizer
given to the Trainer) all carry the remote-code files and an `auto_map` for every head, so they load both with the
package installed and, in a process that cannot import `longvq`, with `trust_remote_code=True`.

`push_to_hub` is exercised offline: transformers' Hub calls are routed to `RecordingHub`, which keeps the files that
would have been uploaded; each recorded repository is then laid out as a Hub-cache snapshot and loaded by repo id.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import transformers.trainer
import transformers.utils.hub as transformers_hub
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from helpers import tiny_config
from longvq import LongVQConfig, LongVQForCausalLM, LongVQForSequenceClassification, LongVQModel
from longvq.configuration_longvq import AUTO_MAP
from longvq.hub import REMOTE_CODE_FILES, install_in_hub_cache
from longvq.tokenization import byte_tokenizer
from remote_code import run_without_longvq

REMOTE_CODE = set(REMOTE_CODE_FILES)
PROMPTS = ["The lighthouse keeper", "a"]
NEW_TOKENS = 8

CHILD = r"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

repos, prompts, new_tokens = json.loads(sys.argv[1])
out = {"hidden_by": hidden_by, "generated": {}, "modules": {}}
tokenizer = AutoTokenizer.from_pretrained(repos[0], trust_remote_code=True)  # model.push_to_hub pushes no tokenizer
for repo in repos:
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
    out["modules"][repo] = type(model).__module__
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    out["generated"][repo] = generated.tolist()
print("LONGVQ_RESULT " + json.dumps(out), flush=True)
"""


class RecordingHub:
    """Stands in for transformers' `HfApi`: `create_commit` / `upload_folder` copy what would be uploaded into
    `root/<org>--<name>`, and `create_repo` succeeds."""

    def __init__(self, root):
        self.root = root

    def folder(self, repo_id):
        return self.root / repo_id.replace("/", "--")

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        self.folder(repo_id).mkdir(parents=True, exist_ok=True)
        for operation in operations:
            shutil.copy(operation.path_or_fileobj, self.folder(repo_id) / operation.path_in_repo)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, self.folder(repo_id), dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}")


def _routed_to(recording, patch):
    """Send transformers' Hub calls to `recording`: through its shared `HfApi` (`hf_api()`, in recent versions), or
    through the `huggingface_hub` functions its modules imported by name (earlier 5.x versions)."""
    if hasattr(transformers_hub, "hf_api"):
        patch.setattr(transformers_hub, "_hf_api", recording)
        return
    imported = {transformers_hub: ("create_repo", "create_commit"), transformers.trainer: ("create_repo", "upload_folder")}
    for module, names in imported.items():
        for name in names:
            patch.setattr(module, name, getattr(recording, name))


@pytest.mark.parametrize("model_class", [LongVQModel, LongVQForCausalLM, LongVQForSequenceClassification])
def test_every_head_saves_its_remote_code_and_the_full_auto_map(tmp_path, model_class):
    model = model_class(tiny_config(num_labels=2))
    model.save_pretrained(tmp_path)
    assert REMOTE_CODE <= {path.name for path in tmp_path.iterdir()}
    package = LongVQConfig.__module__.rsplit(".", 1)[0]
    for name in REMOTE_CODE:  # the package's own source files
        source = __import__(f"{package}.{name[:-3]}", fromlist=["x"]).__file__
        assert (tmp_path / name).read_bytes() == open(source, "rb").read()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == [model_class.__name__]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One trained tiny byte-level LM shared three ways (save_pretrained + tokenizer, model.push_to_hub, Trainer with
    the tokenizer pushing to the Hub), each laid out as a Hub-cache repo; and the tokens the original model
    generates."""
    root = tmp_path_factory.mktemp("sharing")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = LongVQForCausalLM(config)
    ids = torch.tensor([list(b"The lighthouse keeper kept the light")])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()

    saved = root / "saved"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    uploads = RecordingHub(root / "uploads")
    with pytest.MonkeyPatch.context() as patch:
        _routed_to(uploads, patch)
        model.push_to_hub("org/pushed")
        arguments = TrainingArguments(
            output_dir=str(root / "run"), push_to_hub=True, hub_model_id="org/trained", report_to=[], use_cpu=True
        )
        Trainer(model=model, args=arguments, processing_class=tokenizer).push_to_hub()
    folders = {"org/saved": saved, "org/pushed": uploads.folder("org/pushed"), "org/trained": uploads.folder("org/trained")}
    for repo_id, folder in folders.items():
        install_in_hub_cache(folder, repo_id, root / "hub")

    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    child = run_without_longvq(CHILD, [list(folders), PROMPTS, NEW_TOKENS], root)
    return {"folders": folders, "expected": expected, "child": child, "model": model}


def test_shared_checkpoints_carry_remote_code_and_the_tokenizer(shared):
    for repo_id, folder in shared["folders"].items():
        names = {path.name for path in folder.iterdir()}
        assert REMOTE_CODE | {"config.json", "model.safetensors", "generation_config.json"} <= names, repo_id
        assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP, repo_id
    assert {"tokenizer.json", "tokenizer_config.json"} <= {path.name for path in shared["folders"]["org/trained"].iterdir()}


def test_shared_checkpoints_load_with_the_package(shared):
    for repo_id, folder in shared["folders"].items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model) is LongVQForCausalLM, repo_id  # the installed package's class, not remote code
        for name, tensor in shared["model"].state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), (repo_id, name)
    assert len(AutoTokenizer.from_pretrained(shared["folders"]["org/trained"])) == len(byte_tokenizer())


def test_shared_checkpoints_load_without_the_package(shared):
    child = shared["child"]
    assert child["hidden_by"] in {"meta-path finder removed", "sys.modules sentinel"}
    for repo_id in shared["folders"]:
        assert child["modules"][repo_id].startswith("transformers_modules."), repo_id
        assert child["generated"][repo_id] == shared["expected"], repo_id
