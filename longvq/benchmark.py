"""Benchmarks of LongVQ against same-width transformers baselines, measured side by side in one process.

`decode`: per-token latency and decoding-state bytes versus context length, LongVQ (`LongVQCache`) against HF Llama
(SDPA attention, `DynamicCache`). Each context is prefilled once (not timed per token), then `steps` single-token
steps are timed and the median is reported.
"""

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_longvq import LongVQConfig
from .modeling_longvq import LongVQForCausalLM

DEFAULT_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def build_models(hidden_size=256, num_layers=4, vocab_size=256, chunk_size=256, codebook_size=256, seed=0):
    """A LongVQ causal LM and an HF Llama of the same width and depth (Llama's SwiGLU width ~ 8/3 D, heads of 64)."""
    torch.manual_seed(seed)
    longvq = LongVQForCausalLM(
        LongVQConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            intermediate_size=2 * hidden_size, shared_representation_size=hidden_size // 4, chunk_size=chunk_size,
            codebook_size=codebook_size,
        )
    )  # fmt: skip
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            intermediate_size=int(8 * hidden_size / 3), num_attention_heads=max(1, hidden_size // 64),
            max_position_embeddings=1 << 20, attn_implementation="sdpa",
        )
    )  # fmt: skip
    return {"longvq": longvq.eval(), "llama": llama.eval()}


def state_bytes(cache) -> int:
    """Bytes held by a decoding state: LongVQCache.nbytes, or the key/value tensors of a DynamicCache."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class DecodeResult:
    model: str
    context: int
    ms_per_token: float
    state_bytes: int
    prefill_seconds: float


@torch.inference_mode()
def measure_decode(model, context: int, steps: int = 32, warmup: int = 4, seed: int = 0) -> tuple[float, int, float]:
    """Prefill `context` random tokens, then time single-token greedy steps. Returns (median ms per token, state
    bytes after the steps, prefill seconds)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        elapsed = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if step >= warmup:
            times.append(elapsed)
    times.sort()
    return 1e3 * times[len(times) // 2], state_bytes(cache), prefill


def run_decode(contexts=DEFAULT_CONTEXTS, steps=32, models=None, **model_kwargs) -> list[DecodeResult]:
    models = models or build_models(**model_kwargs)
    results = []
    work = [(name, context) for context in contexts for name in models]
    for name, context in tqdm(work, desc="decode benchmark"):
        ms, nbytes, prefill = measure_decode(models[name], context, steps)
        results.append(DecodeResult(name, context, ms, nbytes, prefill))
    return results


def decode_table(results: list[DecodeResult]) -> str:
    """Markdown table, one row per context, LongVQ and Llama side by side with their ratio."""
    by_key = {(r.model, r.context): r for r in results}
    contexts = sorted({r.context for r in results})
    lines = [
        "| context | LongVQ ms/token | Llama ms/token | Llama / LongVQ | LongVQ state KiB | Llama KV cache KiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for context in contexts:
        ours, theirs = by_key[("longvq", context)], by_key[("llama", context)]
        lines.append(
            f"| {context} | {ours.ms_per_token:.2f} | {theirs.ms_per_token:.2f} | "
            f"{theirs.ms_per_token / ours.ms_per_token:.2f}x | {ours.state_bytes / 1024:.0f} | "
            f"{theirs.state_bytes / 1024:.0f} |"
        )
    return "\n".join(lines)


def decode_targets(results: list[DecodeResult]) -> dict:
    """The decode targets of the project, as ratios from this run."""
    by_key = {(r.model, r.context): r for r in results}
    shortest, longest = min(r.context for r in results), max(r.context for r in results)
    ours_short, ours_long = by_key[("longvq", shortest)], by_key[("longvq", longest)]
    llama_short, llama_long = by_key[("llama", shortest)], by_key[("llama", longest)]
    return {
        f"longvq_latency_{longest}_over_{shortest}": ours_long.ms_per_token / ours_short.ms_per_token,
        "longvq_state_bytes_constant": ours_long.state_bytes == ours_short.state_bytes,
        f"longvq_over_llama_latency_at_{shortest}": ours_short.ms_per_token / llama_short.ms_per_token,
        f"llama_over_longvq_latency_at_{longest}": llama_long.ms_per_token / ours_long.ms_per_token,
    }


def plot_decode(results: list[DecodeResult], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("longvq", "LongVQ (LongVQCache)"), ("llama", "Llama SDPA (KV cache)")):
        rows = sorted((r for r in results if r.model == name), key=lambda r: r.context)
        contexts = [r.context for r in rows]
        latency.plot(contexts, [r.ms_per_token for r in rows], marker="o", label=label)
        memory.plot(contexts, [r.state_bytes / 2**20 for r in rows], marker="o", label=label)
    for axis, title, unit in ((latency, "Per-token decode latency", "ms / token"), (memory, "Decoding state", "MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="longvq-benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    decode = sub.add_parser("decode", help="per-token decode latency and state bytes versus context length")
    decode.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    decode.add_argument("--steps", type=int, default=32, help="timed decoding steps per context (median reported)")
    decode.add_argument("--hidden-size", type=int, default=256)
    decode.add_argument("--layers", type=int, default=4)
    decode.add_argument("--chunk-size", type=int, default=256)
    decode.add_argument("--codebook-size", type=int, default=256)
    decode.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    decode.add_argument("--out", default="outputs/benchmark", help="folder for decode.json and decode.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_decode(
        args.contexts, args.steps, hidden_size=args.hidden_size, num_layers=args.layers, chunk_size=args.chunk_size,
        codebook_size=args.codebook_size,
    )  # fmt: skip
    targets = decode_targets(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"results": [asdict(r) for r in results], "targets": targets, "args": vars(args)}, f, indent=2)
    plot_decode(results, os.path.join(args.out, "decode.png"))
    print(decode_table(results))
    print()
    for name, value in targets.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"\nwrote {args.out}/decode.json and {args.out}/decode.png")


if __name__ == "__main__":
    main()
