"""Remote-code check: a LongVQ checkpoint exported once with the package gives the same generations when stock
transformers loads it with `trust_remote_code=True`, in an environment where `longvq` is not installed.

    python ci/remote_code.py export FOLDER   # longvq installed: trains a tiny byte-level LM for a few steps,
                                             # exports it to FOLDER/checkpoint and records its generations in
                                             # FOLDER/expected.json
    python ci/remote_code.py check FOLDER    # `import longvq` must fail: loads FOLDER/checkpoint with
                                             # AutoModelForCausalLM and AutoTokenizer, compares each generation,
                                             # exits 1 on any mismatch

Both sides compute the generations with `generations()`: greedy, seeded sampling and beam search on a left-padded
batch, a `pipeline("text-generation")` text, and a generation continued from the cache that a first call returned.
transformers 5.24 renamed generate()'s `past_key_values` argument and output field to `cache` (the output keeps a
`past_key_values` alias), so the continuation reads whichever field the output has and passes the cache back under
the name the installed version documents. `ci/matrix.py` runs `check` once per tested transformers version, offline
(`HF_HUB_OFFLINE=1`) with `HF_MODULES_CACHE` in a temporary folder and the working directory outside the repository.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

PROMPTS = ["The lighthouse keeper", "Once"]
NEW_TOKENS = 12
SAMPLING_SEED = 1234
# Every sampling knob is explicit, so that a changed default in some transformers version cannot change the draw.
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 1.0}
CACHE_ARGUMENT = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def _generate(model, batch, pad_token_id, **settings) -> list[list[int]]:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, pad_token_id=pad_token_id, **settings).tolist()


def _sampling(model, batch, pad_token_id) -> list[list[int]]:
    torch.manual_seed(SAMPLING_SEED)
    return _generate(model, batch, pad_token_id, **SAMPLING)


def _continue_from_cache(model, batch, pad_token_id) -> list[list[int]]:
    """Greedy: half the tokens, then the rest from the cache the first call returned; the final sequences."""
    settings = {"do_sample": False, "pad_token_id": pad_token_id}
    with torch.no_grad():
        first = model.generate(**batch, **settings, max_new_tokens=NEW_TOKENS // 2, return_dict_in_generate=True)
        cache = getattr(first, "cache", None)
        if cache is None:
            cache = first.past_key_values
        grown = first.sequences.shape[1] - batch["input_ids"].shape[1]
        mask = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(len(first.sequences), grown)], 1)
        rest = model.generate(
            input_ids=first.sequences, attention_mask=mask, **{CACHE_ARGUMENT: cache}, **settings,
            max_new_tokens=NEW_TOKENS - NEW_TOKENS // 2,
        )  # fmt: skip
    return rest.tolist()


# What both sides compare: name -> function(model, left-padded batch of PROMPTS, pad id) giving token ids.
GENERATIONS = {
    "greedy": lambda model, batch, pad: _generate(model, batch, pad, do_sample=False),
    "sampling": _sampling,
    "beam": lambda model, batch, pad: _generate(model, batch, pad, do_sample=False, num_beams=3),
    "continue_from_cache": _continue_from_cache,
}


def pipeline_texts(text_pipeline) -> list[str]:
    """Greedy `pipeline("text-generation")` continuations of PROMPTS, one call per prompt."""
    outputs = [text_pipeline(prompt, max_new_tokens=NEW_TOKENS, do_sample=False) for prompt in PROMPTS]
    return [output[0]["generated_text"] for output in outputs]


def export(folder: Path) -> None:
    """Train a tiny byte-level LongVQ LM for a few steps, export it with the package and record its generations."""
    from longvq import LongVQConfig, LongVQForCausalLM
    from longvq.hub import export_checkpoint
    from longvq.tokenization import byte_tokenizer
    from longvq.training import load_corpus_bytes

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LongVQConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=32,
        num_hidden_layers=2, intermediate_size=64, shared_representation_size=16, ema_projection_size=4,
        codebook_size=8, chunk_size=8,
    )  # fmt: skip
    model = LongVQForCausalLM(config)
    corpus = torch.tensor(list(load_corpus_bytes()[:4096])).view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(20):
        batch = corpus[step % 8 :: 8]
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()

    checkpoint = export_checkpoint(model, folder / "checkpoint", tokenizer=tokenizer)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    expected = {name: generate(model, batch, tokenizer.pad_token_id) for name, generate in GENERATIONS.items()}
    expected["pipeline"] = pipeline_texts(pipeline("text-generation", model=model, tokenizer=tokenizer))
    (folder / "expected.json").write_text(json.dumps(expected), encoding="utf-8")
    print(f"exported {checkpoint} with transformers {transformers.__version__}; expected generations recorded")


def _outcome(compute):
    """compute()'s result, or the text of the exception it raised, so that one broken mode does not hide the others."""
    try:
        return compute()
    except Exception as error:
        return f"ERROR {type(error).__name__}: {error}"


def check(folder: Path) -> int:
    """Load the checkpoint as remote code and compare every generation with the exporter's; the exit status."""
    if importlib.util.find_spec("longvq") is not None:
        raise SystemExit("longvq is importable here; the remote-code check needs an environment without it")
    checkpoint = str(folder / "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    if not type(model).__module__.startswith("transformers_modules."):
        raise SystemExit(f"the model class came from {type(model).__module__}, not from the checkpoint's remote code")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    batch, pad_id = tokenizer(PROMPTS, padding=True, return_tensors="pt"), tokenizer.pad_token_id
    actual = {name: _outcome(lambda run=run: run(model, batch, pad_id)) for name, run in GENERATIONS.items()}
    actual["pipeline"] = _outcome(
        lambda: pipeline_texts(pipeline("text-generation", model=checkpoint, trust_remote_code=True))
    )
    expected = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    mismatches = [name for name in expected if actual[name] != expected[name]]
    for name in expected:
        print(f"  {name:<20} {'MISMATCH' if name in mismatches else 'ok'}")
        if name in mismatches:
            print(f"    expected {expected[name]}\n    actual   {actual[name]}")
    print(f"transformers {transformers.__version__}: {len(expected) - len(mismatches)}/{len(expected)} as exported")
    return 1 if mismatches else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("export", "check"):
        raise SystemExit("usage: python ci/remote_code.py export|check FOLDER")
    command, target = sys.argv[1], Path(sys.argv[2])
    if command == "export":
        export(target)
    else:
        sys.exit(check(target))
