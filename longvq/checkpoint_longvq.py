# Copyright 2026 The LongVQ Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint safety for LongVQ: weights only from safetensors, a clear error for unreadable files, and an opt-in
integrity check.

- `check_weight_files(path, **from_pretrained_kwargs)` runs before every `from_pretrained`: it refuses a checkpoint
  that has only pickled (`pytorch_model.bin`) or GGUF weights, and reads each safetensors file's header (never its
  data) to raise `ValueError` naming a truncated file or a corrupt header, which safetensors itself reports as
  "header too small" without saying which file.
- `seal_checkpoint(folder)` records each weight file's sha256 in its safetensors metadata (`export_checkpoint` does
  this); `verify_checkpoint(folder)` recomputes it and raises `ValueError` naming a file whose bytes changed since
  (`longvq-verify FOLDER` from the command line). Hashing reads every byte, so it is not part of loading. The digest
  detects damage (bit rot, a partial copy, an edit); it is not a signature: whoever can edit the file can rewrite it.

Copied into Hub checkpoints beside `modeling_longvq.py` (which imports it): standard library and transformers only.
"""

import hashlib
import json
import os
import struct

DIGEST_KEY = "longvq_sha256"
_PICKLED_OR_GGUF = (".bin", ".pt", ".pth", ".gguf")


def read_header(path: str) -> tuple[dict, int]:
    """The JSON header of safetensors file `path` and the offset where its data starts. Raises ValueError naming the
    file when it is truncated or its header is malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or 8 + length > size:
            raise ValueError(f"Weights file {path} is truncated ({size} bytes): it ends inside its header.")
        try:
            header = json.loads(f.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise ValueError(f"Weights file {path} has a corrupt safetensors header ({error}).") from error
    if 8 + length + end != size:
        raise ValueError(
            f"Weights file {path} is truncated or corrupt: its header describes {8 + length + end} bytes, the file "
            f"has {size}."
        )
    return header, 8 + length


def _weights_name(name: str, variant: str | None) -> str:
    """`model.safetensors` -> `model.<variant>.safetensors`, as transformers names variants."""
    if variant is None:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def weight_files(path, **hub_kwargs) -> list[str] | None:
    """Local paths of the safetensors files of checkpoint `path` (a folder, a Hub repo id resolved like
    `from_pretrained` does with `hub_kwargs`, or one file): [] if it has none, None if it cannot be resolved (then
    transformers reports that)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    names = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
    resolve_kwargs = {name: hub_kwargs[name] for name in names if hub_kwargs.get(name) is not None}

    def resolve(name):
        return cached_file(
            path, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_gated_repo=False,
            **resolve_kwargs,
        )  # fmt: skip

    try:
        single = resolve(_weights_name(SAFE_WEIGHTS_NAME, hub_kwargs.get("variant")))
        if single is not None:
            return [single]
        index = resolve(_weights_name(SAFE_WEIGHTS_INDEX_NAME, hub_kwargs.get("variant")))
        if index is None:
            return []
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [resolve(shard) for shard in shards]
    except OSError:
        return None


def check_weight_files(path, **from_pretrained_kwargs) -> list[str] | None:
    """Refuse what LongVQ does not load (see the module docstring) and check each safetensors header; returns the
    files (None when the checkpoint cannot be resolved)."""
    if from_pretrained_kwargs.get("use_safetensors") is False or from_pretrained_kwargs.get("gguf_file") is not None:
        raise ValueError(
            "LongVQ loads weights only from safetensors files; `use_safetensors=False` and `gguf_file` are not "
            "supported (pickled weights can execute code when loaded)."
        )
    path = os.fspath(path)
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        raise ValueError(f"LongVQ loads weights only from safetensors files, got {path}.")
    files = weight_files(path, **from_pretrained_kwargs)
    local = os.path.join(path, from_pretrained_kwargs.get("subfolder") or "")
    if files == [] and os.path.isdir(local):
        found = sorted(name for name in os.listdir(local) if name.endswith(_PICKLED_OR_GGUF))
        raise OSError(
            f"No model.safetensors in {local}. LongVQ loads weights only from safetensors"
            + (f"; {', '.join(found)} will not be read (convert it only if you trust its source)." if found else ".")
        )
    for file in files or []:
        read_header(file)
    return files


def _digest(path: str, header: dict, data_start: int) -> str:
    digest = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True).encode())
    with open(path, "rb") as f:
        f.seek(data_start)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def seal_checkpoint(folder) -> list[str]:
    """Record each weight file's sha256 in its safetensors metadata (tensor data copied unchanged); returns the
    files."""
    files = weight_files(folder) or []
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {folder}.")
    for path in files:
        header, data_start = read_header(path)
        metadata = {**header.get("__metadata__", {}), DIGEST_KEY: _digest(path, header, data_start)}
        header = {"__metadata__": metadata, **{k: v for k, v in header.items() if k != "__metadata__"}}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes
        with open(path, "rb") as source, open(path + ".tmp", "wb") as target:
            target.write(struct.pack("<Q", len(encoded)) + encoded)
            source.seek(data_start)
            target.writelines(iter(lambda: source.read(1 << 24), b""))
        os.replace(path + ".tmp", path)
    return files


def verify_checkpoint(folder) -> dict[str, str]:
    """Check every weight file of `folder` against the sha256 in its metadata: {file: "verified" | "no digest"}.
    Raises ValueError naming a truncated or corrupt file, or one whose bytes changed after it was sealed."""
    files = weight_files(folder) or []
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {folder}.")
    report = {}
    for path in files:
        header, data_start = read_header(path)
        expected = header.get("__metadata__", {}).get(DIGEST_KEY)
        if expected is not None and _digest(path, header, data_start) != expected:
            raise ValueError(
                f"Weights file {path} does not match the sha256 recorded when it was sealed: it was modified or "
                "damaged afterwards."
            )
        report[path] = "no digest" if expected is None else "verified"
    return report
