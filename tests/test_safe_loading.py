"""Safe loading: weights come only from safetensors; a truncated file or a corrupt header raises a clear error naming
the file when loading; an exported checkpoint is sealed (sha256 per weight file) and `verify_checkpoint` names a file
whose bytes changed (opt-in: loading never hashes); checkpoints whose tensors disagree with their config behave as in
transformers (RuntimeError on shape mismatches, missing tensors initialised and unexpected ones ignored, with the
loading info reporting both)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from longvq import LongVQForCausalLM, LongVQForSequenceClassification, LongVQModel
from longvq.hub import export_checkpoint, verify_checkpoint


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    """An exported (sealed) causal LM (config.json + model.safetensors) and the model it came from."""
    model = LongVQForCausalLM(tiny_config(tie_word_embeddings=False))
    folder = export_checkpoint(model, tmp_path / "saved")
    return folder, model


def _copy(folder, tmp_path, name, config=None, weights=None, raw=None):
    """A copy of `folder` with config.json fields overridden, the weights replaced by a state dict, or the weights
    file's bytes transformed by `raw`."""
    target = tmp_path / name
    shutil.copytree(folder, target)
    if config:
        path = target / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights is not None:
        save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    if raw is not None:
        path = target / "model.safetensors"
        path.write_bytes(raw(path.read_bytes()))
    return target


def _flip(offset):
    def transform(data: bytes) -> bytes:
        data = bytearray(data)
        data[offset] ^= 0xFF
        return bytes(data)

    return transform


def test_exported_weights_carry_a_digest_and_reload_bitwise(checkpoint, tmp_path):
    folder, model = checkpoint
    with safe_open(folder / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and len(metadata["longvq_sha256"]) == 64
    assert verify_checkpoint(folder) == {str(folder / "model.safetensors"): "verified"}
    model.save_pretrained(tmp_path / "plain")  # a plain save is not sealed: no hashing on the save path either
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        assert "longvq_sha256" not in f.metadata()
    reloaded = LongVQForCausalLM.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_a_file_without_digest_still_loads(checkpoint, tmp_path):
    """Checkpoints written by other tools (plain safetensors) carry no digest and load unchecked."""
    folder, model = checkpoint
    plain = _copy(folder, tmp_path, "plain", weights=load_file(folder / "model.safetensors"))
    reloaded = LongVQForCausalLM.from_pretrained(plain)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert verify_checkpoint(plain) == {str(plain / "model.safetensors"): "no digest"}


# name -> (copy arguments, fragment of the ValueError message)
CORRUPT_FILES = {
    "truncated_in_data": ({"raw": lambda data: data[: len(data) // 2]}, "is truncated or corrupt"),
    "truncated_in_header": ({"raw": lambda data: data[:100]}, "is truncated"),
    "truncated_to_nothing": ({"raw": lambda data: b""}, "is truncated"),
    "trailing_garbage": ({"raw": lambda data: data + b"\x00" * 16}, "is truncated or corrupt"),
    "tampered_header_byte": ({"raw": _flip(20)}, "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", list(CORRUPT_FILES))
def test_corrupt_weights_file_raises_naming_the_file(checkpoint, tmp_path, case):
    folder, _ = checkpoint
    copy_arguments, fragment = CORRUPT_FILES[case]
    target = _copy(folder, tmp_path, case, **copy_arguments)
    with pytest.raises(ValueError, match=fragment) as excinfo:
        LongVQForCausalLM.from_pretrained(target)
    assert str(target / "model.safetensors") in str(excinfo.value)
    with pytest.raises(ValueError, match=fragment):  # the Auto classes go through the same checks
        AutoModelForCausalLM.from_pretrained(target)
    with pytest.raises(ValueError, match=fragment):
        verify_checkpoint(target)


def test_a_tampered_data_byte_is_found_by_verification(checkpoint, tmp_path):
    folder, _ = checkpoint
    target = _copy(folder, tmp_path, "tampered", raw=_flip(-100))
    with pytest.raises(ValueError, match="does not match the sha256") as excinfo:
        verify_checkpoint(target)
    assert str(target / "model.safetensors") in str(excinfo.value)
    LongVQForCausalLM.from_pretrained(target)  # loading reads headers only: verification is opt-in


def test_tampered_shard_of_a_sharded_checkpoint_is_refused(tiny_config, tmp_path):
    model = LongVQForCausalLM(tiny_config())
    export_checkpoint(model, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert "longvq_sha256" in f.metadata(), shard
    assert set(verify_checkpoint(tmp_path / "sharded").values()) == {"verified"}
    LongVQForCausalLM.from_pretrained(tmp_path / "sharded")  # intact: loads
    shards[-1].write_bytes(_flip(-8)(shards[-1].read_bytes()))
    with pytest.raises(ValueError, match="does not match the sha256") as excinfo:
        verify_checkpoint(tmp_path / "sharded")
    assert shards[-1].name in str(excinfo.value)


def test_only_safetensors_are_read(checkpoint, tmp_path):
    folder, model = checkpoint
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"only from safetensors.*pytorch_model\.bin will not be read"):
        LongVQForCausalLM.from_pretrained(pickled)
    with pytest.raises(ValueError, match="only from safetensors"):
        LongVQForCausalLM.from_pretrained(pickled / "pytorch_model.bin", config=folder / "config.json")
    with pytest.raises(ValueError, match="use_safetensors=False"):
        LongVQForCausalLM.from_pretrained(folder, use_safetensors=False)
    with pytest.raises(ValueError, match="gguf_file"):
        LongVQForCausalLM.from_pretrained(folder, gguf_file="model.gguf")
    with pytest.raises(ValueError, match="safe_serialization=False"):
        model.save_pretrained(tmp_path / "unsafe", safe_serialization=False)


def test_config_whose_shapes_disagree_with_the_weights_raises_runtime_error(checkpoint, tmp_path):
    """As in transformers: a tensor whose saved shape differs from the model built from config.json raises
    RuntimeError (not silently random weights); `ignore_mismatched_sizes=True` re-initialises it."""
    folder, _ = checkpoint
    for case, edit in (("hidden_size", {"hidden_size": 48}), ("codebook_size", {"codebook_size": 12})):
        target = _copy(folder, tmp_path, case, config=edit)
        with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
            LongVQForCausalLM.from_pretrained(target)
        model, info = LongVQForCausalLM.from_pretrained(target, ignore_mismatched_sizes=True, output_loading_info=True)
        assert info["mismatched_keys"] and all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_missing_and_unexpected_tensors_follow_transformers(checkpoint, tmp_path):
    """Missing tensors are initialised and unexpected ones ignored, both reported (transformers' default); a tensor
    of the wrong shape raises RuntimeError unless `ignore_mismatched_sizes=True`."""
    folder, saved_model = checkpoint
    weights = load_file(folder / "model.safetensors")
    missing = {k: v for k, v in weights.items() if k != "model.layers.0.attention.ema.projection"}
    model, info = LongVQForCausalLM.from_pretrained(_copy(folder, tmp_path, "missing", weights=missing),
                                                    output_loading_info=True)  # fmt: skip
    assert info["missing_keys"] == {"model.layers.0.attention.ema.projection"}
    assert torch.isfinite(model.model.layers[0].attention.ema.projection).all()
    assert torch.equal(model.model.layers[1].attention.ema.projection, weights["model.layers.1.attention.ema.projection"])

    more_layers = _copy(folder, tmp_path, "more_layers", config={"num_hidden_layers": 3})
    model, info = LongVQForCausalLM.from_pretrained(more_layers, output_loading_info=True)
    assert len(model.model.layers) == 3 and info["missing_keys"]
    assert all(key.startswith("model.layers.2.") for key in info["missing_keys"])
    fewer_layers = _copy(folder, tmp_path, "fewer_layers", config={"num_hidden_layers": 1})
    model, info = LongVQForCausalLM.from_pretrained(fewer_layers, output_loading_info=True)
    assert len(model.model.layers) == 1 and all(key.startswith("model.layers.1.") for key in info["unexpected_keys"])

    reshaped = {**weights, "model.layers.1.attention.query_key_scale": torch.zeros(2, 5)}
    target = _copy(folder, tmp_path, "reshaped", weights=reshaped)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LongVQForCausalLM.from_pretrained(target)
    model = LongVQForCausalLM.from_pretrained(target, ignore_mismatched_sizes=True)
    assert model.model.layers[1].attention.query_key_scale.shape == (2, 16)
    kept = weights["model.layers.0.attention.query_key_scale"]
    assert torch.equal(model.model.layers[0].attention.query_key_scale, kept)

    foreign = {**weights, "encoder.weight": torch.zeros(3)}
    model, info = LongVQForCausalLM.from_pretrained(_copy(folder, tmp_path, "foreign", weights=foreign),
                                                    output_loading_info=True)  # fmt: skip
    assert "encoder.weight" in info["unexpected_keys"]
    assert torch.equal(model.lm_head.weight, saved_model.lm_head.weight)


def test_loading_info_is_still_available(checkpoint):
    folder, _ = checkpoint
    model, info = LongVQForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert isinstance(model, LongVQForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_heads_still_load_from_base_and_other_head_checkpoints(tiny_config, tmp_path, checkpoint):
    """A head may lack its own layer (initialised), and the base model drops a head's layer (ignored)."""
    folder, model = checkpoint
    base = LongVQModel.from_pretrained(folder)
    assert torch.equal(base.embed_tokens.weight, model.model.embed_tokens.weight)
    LongVQModel(tiny_config(bidirectional=True)).save_pretrained(tmp_path / "base")
    classifier = LongVQForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    assert classifier.score.weight.shape == (3, 32)


def test_verify_command_reports_each_file_and_names_a_changed_one(checkpoint, tmp_path, capsys):
    from longvq import cli

    folder, _ = checkpoint
    assert cli.verify([str(folder)]) == 0
    assert capsys.readouterr().out == f"verified   {folder / 'model.safetensors'}\n"
    target = _copy(folder, tmp_path, "tampered", raw=_flip(-100))
    assert cli.verify([str(target)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("longvq-verify: error: ") and str(target / "model.safetensors") in error
