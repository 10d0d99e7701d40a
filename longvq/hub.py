"""Export LongVQ models as self-contained, `push_to_hub`-ready checkpoints that load with `trust_remote_code=True`.

`export_checkpoint(model, folder, tokenizer=..., card=...)` writes:

* `config.json` whose `auto_map` names all four auto classes (`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
  `AutoModelForSequenceClassification`), so any head can be loaded from the same repository;
* the remote-code files (`REMOTE_CODE_FILES`: `modeling_longvq.py` and the package's sibling files it imports; they
  import only the standard library, torch, transformers and each other);
* `model.safetensors` (sharded with an index above `max_shard_size`), sealed: each file's sha256 is recorded in its
  metadata, so `verify_checkpoint(folder)` / `longvq-verify FOLDER` can tell later whether it is intact; and, for the
  causal LM, `generation_config.json`;
* the tokenizer files (`tokenizer.json`, `tokenizer_config.json`) when a tokenizer is given; a model whose vocabulary
  is smaller than the tokenizer's is widened first (`fit_to_tokenizer`), so every id the tokenizer produces is valid;
* `README.md` (the model card) when a card is given.

Weights, config (with its `auto_map`) and remote-code files come from the model's own `save_pretrained`: every LongVQ
class is registered for its Auto class, so any save copies the defining module files (see `LongVQPreTrainedModel`).
`export_checkpoint` adds the tokenizer and the card, and checks the result: missing code files or a code file
importing the `longvq` package by absolute name raise an error.

`install_in_hub_cache(folder, repo_id, cache_dir)` lays an exported folder out as a Hub-cache snapshot, which is how
the tests load a checkpoint by repo id (`"org/name"`) with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from huggingface_hub import ModelCard

from transformers.dynamic_module_utils import get_relative_import_files

from . import modeling_longvq
from .checkpoint_longvq import seal_checkpoint, verify_checkpoint
from .configuration_longvq import AUTO_MAP

__all__ = [
    "AUTO_MAP",
    "REMOTE_CODE_FILES",
    "export_checkpoint",
    "fit_to_tokenizer",
    "install_in_hub_cache",
    "verify_checkpoint",
]

CONFIG_MODULE = "configuration_longvq"
MODELING_MODULE = "modeling_longvq"
# The files `save_pretrained` copies next to the weights: the modeling file and what it imports relatively.
REMOTE_CODE_FILES = tuple(
    sorted(Path(path).name for path in (modeling_longvq.__file__, *get_relative_import_files(modeling_longvq.__file__)))
)
_HEADS = {name.rsplit(".", 1)[1] for auto, name in AUTO_MAP.items() if auto != "AutoConfig"}


def _absolute_imports(path: Path) -> set[str]:
    from transformers.dynamic_module_utils import get_imports

    return set(get_imports(str(path)))


def fit_to_tokenizer(model, tokenizer) -> bool:
    """Make `model` accept every id of `tokenizer` and record its special ids; returns True if the model was changed.

    A byte-level model trained with `vocab_size=256` has no rows for `byte_tokenizer()`'s `<pad>` (256) and
    `<|endoftext|>` (257), so a padded batch, or a text prefixed with the BOS id (as lm-evaluation-harness scores it),
    would index past the embedding. A model with `vocab_size < len(tokenizer)` is widened in place to `len(tokenizer)`
    with `resize_token_embeddings` (existing rows untouched; new rows from the mean/covariance of the old ones), and the
    new ids are added to `generation_config.suppress_tokens` so that generation never emits these untrained rows; the
    new output rows do take a little probability mass, so log-likelihoods of the widened model differ slightly. The
    tokenizer's pad/bos/eos ids are written into the config and generation config wherever those have none.
    """
    generation_config = getattr(model, "generation_config", None)
    old_size = model.config.vocab_size
    changed = False
    if len(tokenizer) > old_size:
        model.resize_token_embeddings(len(tokenizer))
        if generation_config is not None:
            new_ids = set(range(old_size, len(tokenizer)))
            generation_config.suppress_tokens = sorted(set(generation_config.suppress_tokens or []) | new_ids)
        changed = True
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name)
        for config in (model.config, generation_config):
            if token_id is not None and config is not None and getattr(config, name, None) is None:
                setattr(config, name, token_id)
                changed = True
    return changed


def export_checkpoint(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    card: ModelCard | str | None = None,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a push_to_hub-ready LongVQ checkpoint folder for `model` (see the module docstring) and return its path.

    Args:
        model: a `LongVQModel`, `LongVQForCausalLM` or `LongVQForSequenceClassification` (from the installed package
            or itself loaded with `trust_remote_code=True`).
        save_directory: target folder (created if needed; existing files with the same names are overwritten).
        tokenizer: optional tokenizer saved next to the weights (e.g. `longvq.tokenization.byte_tokenizer()`). The
            model is first fitted to it with `fit_to_tokenizer` (in place): widened if its vocabulary is smaller than
            the tokenizer's, and given the tokenizer's pad/bos/eos ids where it has none.
        card: optional model card, a `huggingface_hub.ModelCard` (e.g. from `longvq.model_card.build_model_card`) or
            markdown text, written as `README.md`.
        max_shard_size: passed to `save_pretrained`.

    Apart from that fitting, the model is left as it was.
    Push the folder with `huggingface_hub.upload_folder(repo_id=..., folder_path=save_directory)`.
    """
    model_class, config_class = type(model), type(model.config)
    if model_class.__name__ not in _HEADS:
        raise TypeError(
            f"export_checkpoint expects one of {sorted(_HEADS)}, got {model_class.__name__} "
            "(subclasses and the abstract LongVQPreTrainedModel cannot be exported as LongVQ remote code)"
        )
    for cls, module in ((model_class, MODELING_MODULE), (config_class, CONFIG_MODULE)):
        if cls.__module__.rsplit(".", 1)[-1] != module or cls.__module__ == "__main__":
            raise TypeError(f"{cls.__name__} must be defined in a module named {module}.py, not {cls.__module__}")
    module_file = Path(sys.modules[model_class.__module__].__file__)
    if not (module_file.parent / f"{CONFIG_MODULE}.py").is_file():
        raise FileNotFoundError(f"{CONFIG_MODULE}.py not found next to {module_file}")

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)

    if tokenizer is not None:
        fit_to_tokenizer(model, tokenizer)

    model.save_pretrained(save_directory, max_shard_size=max_shard_size)
    _check_export(save_directory, expect_generation_config=model.can_generate())
    seal_checkpoint(save_directory)

    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    if card is not None:
        if isinstance(card, ModelCard):
            card.save(save_directory / "README.md")
        else:
            (save_directory / "README.md").write_text(str(card), encoding="utf-8")
    return save_directory


def _check_export(folder: Path, expect_generation_config: bool) -> None:
    missing = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"save_pretrained did not copy the remote-code files {missing} into {folder}")
    for name in REMOTE_CODE_FILES:
        if "longvq" in _absolute_imports(folder / name):
            raise RuntimeError(f"{name} imports the longvq package by absolute name; remote code cannot do that")
    auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map", {})
    if any(auto_map.get(auto) != target for auto, target in AUTO_MAP.items()):
        raise RuntimeError(f"config.json auto_map is incomplete: {auto_map}")
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        raise RuntimeError(f"no safetensors weights in {folder}")
    if expect_generation_config and not (folder / "generation_config.json").is_file():
        raise RuntimeError(f"no generation_config.json in {folder}")


def _fake_commit(folder: Path) -> str:
    """A deterministic 40-hex id from the folder's file names and contents."""
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def install_in_hub_cache(
    folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike, commit: str | None = None
) -> Path:
    """Copy an exported folder into a Hugging Face Hub cache as if `repo_id` had been downloaded; return the snapshot.

    Layout: `<cache_dir>/models--<org>--<name>/snapshots/<commit>/...` plus `refs/main` holding `<commit>` (a 40-hex
    id; by default a hash of the files). `cache_dir` is `$HF_HOME/hub` (`HF_HUB_CACHE`); with `HF_HUB_OFFLINE=1`
    `from_pretrained(repo_id)` then resolves to the snapshot without any network access. Files are copied, not
    symlinked to `blobs/`, which the offline resolver accepts.
    """
    folder = Path(folder)
    commit = commit or _fake_commit(folder)
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"commit must be 40 lowercase hex digits, got {commit!r}")
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def main(argv=None) -> None:
    """`longvq-export CHECKPOINT OUT ...`: export a local causal-LM checkpoint for the Hub."""
    import argparse

    import torch
    from transformers import AutoModelForCausalLM

    from .model_card import build_model_card, demo_recipe, demo_results
    from .tokenization import BYTE_VOCAB_SIZE, byte_tokenizer

    parser = argparse.ArgumentParser(
        description="Export a local LongVQ byte-level causal-LM checkpoint (e.g. outputs/demo) as a push_to_hub-ready "
        "folder: remote code, auto_map for all heads, safetensors, generation config, byte tokenizer and model card."
    )
    parser.add_argument("checkpoint", help="local checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--repo-id", default="your-org/longvq", help="Hub repo id used in the card's usage snippet")
    parser.add_argument("--model-name", default=None, help="card title (default: last part of --repo-id)")
    parser.add_argument("--results", default=None, help="results JSON for the card (default: <checkpoint>/metrics.json "
                        "of a longvq-demo run, if present)")  # fmt: skip
    parser.add_argument("--recipe", default=None, help="JSON file with the training recipe {setting: value}")
    parser.add_argument("--no-card", action="store_true", help="do not write README.md")
    parser.add_argument(
        "--no-special-tokens",
        action="store_true",
        help="keep a vocab_size=256 model unchanged and export the byte tokenizer without <pad> and <|endoftext|> "
        "(then batches cannot be padded and lm-evaluation-harness cannot run); by default such a model gets two extra "
        "embedding rows for them, never generated",
    )
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint folder {args.checkpoint!r} does not exist")

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    vocab_size = model.config.vocab_size
    if vocab_size < BYTE_VOCAB_SIZE:
        parser.error(f"the byte tokenizer needs vocab_size >= 256, the checkpoint has {vocab_size}")
    if args.no_special_tokens:
        if vocab_size != BYTE_VOCAB_SIZE:
            parser.error(f"--no-special-tokens needs a vocab_size=256 model, the checkpoint has {vocab_size}")
        tokenizer = byte_tokenizer(pad_token=None, eos_token=None)
    else:
        tokenizer = byte_tokenizer()
        if fit_to_tokenizer(model, tokenizer) and model.config.vocab_size != vocab_size:
            print(
                f"vocab_size {vocab_size} -> {model.config.vocab_size}: added rows for {tokenizer.pad_token} = "
                f"{tokenizer.pad_token_id} and {tokenizer.eos_token} = {tokenizer.eos_token_id} (never generated)"
            )

    card = None
    if not args.no_card:
        metrics_path = Path(args.checkpoint) / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
        results = args.results or (demo_results(metrics) if metrics else None)
        if args.recipe:
            recipe = json.loads(Path(args.recipe).read_text(encoding="utf-8"))
        else:
            recipe = demo_recipe(metrics) if metrics else {}
        special_note = (
            f" `{tokenizer.pad_token}` (id {tokenizer.pad_token_id}) pads batches; `{tokenizer.eos_token}` (id "
            f"{tokenizer.eos_token_id}) ends a text and is also the BOS token. Neither is added to encodings."
            if tokenizer.pad_token is not None
            else " There are no special tokens (no padding, no end-of-text)."
        )
        card = build_model_card(
            args.model_name or args.repo_id.split("/")[-1],
            results,
            recipe,
            repo_id=args.repo_id,
            config=model.config,
            num_parameters=model.num_parameters(),
            tokenizer_note="The tokenizer maps text to its UTF-8 bytes: ids 0-255 are the bytes." + special_note,
        )
    folder = export_checkpoint(model, args.out, tokenizer=tokenizer, card=card)
    for path in sorted(folder.iterdir()):
        print(f"{path.stat().st_size:>10}  {path}")


def verify_main(argv=None) -> dict[str, str]:
    """`longvq-verify FOLDER`: check every weight file of a checkpoint against the sha256 `export_checkpoint` recorded
    in it; prints one line per file and raises ValueError naming a file that changed."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="longvq-verify", description="Check a LongVQ checkpoint's weight files against their recorded sha256."
    )
    parser.add_argument("checkpoint", help="checkpoint folder (from export_checkpoint / longvq-export)")
    args = parser.parse_args(argv)
    report = verify_checkpoint(args.checkpoint)
    for path, status in report.items():
        print(f"{status:<9}  {path}")
    return report
