"""Benchmarks of LongVQ against transformers baselines of the experiments' registry
(`longvq.experiments.baselines`: HF Llama with SDPA attention, same depth and parameter count; HF Mamba, same width
and depth), measured side by side in one run.

`train`: training throughput (forward + backward tokens/s, batch 1) and peak training memory versus sequence length,
    each point in a fresh process (so its peak resident memory is its own), plus LongVQ's achieved FLOP/s against this
    machine's measured fp32 matmul peak (`FLOP model` in `longvq_train_flops`).
`decode`: per-token latency and decoding-state bytes versus context length, LongVQ (`LongVQCache`) against HF Llama
    (SDPA attention, `DynamicCache`). Each context is prefilled once (not timed per token), then `steps` single-token
    steps are timed and the median is reported. `--compile` times both decoding steps compiled
    (`torch.compile(fullgraph=True, dynamic=False)`, inductor), Llama's with the `StaticCache` transformers compiles
    it with.
`all`: both, into one folder (JSON, PNG plots) with one summary of the targets.
`kernel`: CUDA only: forward + backward of one layer's causal VQ-attention (bf16, one row) through the Triton kernel
    and through the PyTorch path, with achieved FLOP/s against the measured bf16 matmul peak.
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from unittest import mock

import torch
from tqdm.auto import tqdm
from transformers import StaticCache

from . import ops_longvq
from .configuration_longvq import LongVQConfig
from .experiments.baselines import Reference, build_baseline, count_parameters
from .experiments.plots import pyplot
from .modeling_longvq import CACHE_NAME
from .training import enable_activation_checkpointing

DEFAULT_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
BENCHMARKED = ("longvq", "llama", "mamba")
MAX_LENGTH = 1 << 19  # longer than any benchmarked sequence (the Llama baseline's positions reach twice this)


def benchmark_config(hidden_size=256, num_layers=4, vocab_size=256, chunk_size=256, codebook_size=256, **overrides):
    """The benchmarked LongVQ: H = 2D, Z = D/4, N = 16."""
    return LongVQConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, intermediate_size=2 * hidden_size,
        shared_representation_size=hidden_size // 4, chunk_size=chunk_size, codebook_size=codebook_size, **overrides,
    )  # fmt: skip


def benchmark_model(name, hidden_size=256, num_layers=4, vocab_size=256, chunk_size=256, codebook_size=256, seed=0):
    """One benchmarked causal LM: `longvq` (`benchmark_config`), or the baseline `llama` or `mamba` of
    `longvq.experiments.baselines.BASELINES` built from it (Llama: same depth and parameter count, SDPA; Mamba:
    same width and depth, state 16, expansion 2, HF's reference PyTorch path on CPU)."""
    if name not in BENCHMARKED:
        raise ValueError(f"Unknown model {name!r}: expected one of {', '.join(map(repr, BENCHMARKED))}.")
    torch.manual_seed(seed)
    config = benchmark_config(hidden_size, num_layers, vocab_size, chunk_size, codebook_size)
    reference = Reference(config, "causal_lm", MAX_LENGTH)
    return reference.longvq() if name == "longvq" else build_baseline(name, reference)


def benchmark_models(hidden_size=256, num_layers=4, vocab_size=256, chunk_size=256, codebook_size=256, seed=0):
    """LongVQ and Llama (see `benchmark_model`) for the decode benchmark, in eval mode."""
    sizes = {
        "hidden_size": hidden_size, "num_layers": num_layers, "vocab_size": vocab_size, "chunk_size": chunk_size,
        "codebook_size": codebook_size, "seed": seed,
    }  # fmt: skip
    return {name: benchmark_model(name, **sizes).eval() for name in ("longvq", "llama")}


# ---------------------------------------------------------------------------------------------------------------------
# Training throughput, peak memory and FLOP/s
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_TRAIN_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_MAMBA_LENGTHS = (256, 1024)  # HF Mamba's CPU path scans token by token: minutes per step beyond this
DEFAULT_CHECKPOINTING_LENGTHS = (1024, 16384, 65536)  # the "+ckpt" variants, for the memory comparison
SLOW_STEP_SECONDS = 30.0  # a warm-up step slower than this is the measurement (warm-up effects are noise there)
TRAIN_MODELS = ("longvq", "longvq+ckpt", "llama", "llama+ckpt", "mamba")  # "+ckpt": activation checkpointing on


@dataclass
class TrainResult:
    model: str
    length: int
    hidden_size: int
    parameters: int
    seconds_per_step: float  # median forward + backward wall time, batch 1
    tokens_per_second: float
    system_seconds_per_step: float  # kernel time (page faults) per step, both threads together
    peak_memory_bytes: int  # peak resident memory while training minus resident memory before the first step
    flops_per_step: float | None = None  # LongVQ only: `longvq_train_flops`
    achieved_flops: float | None = None  # flops_per_step / seconds_per_step
    compiled: bool = False  # `torch.compile(model, fullgraph=True, dynamic=False)`, inductor
    compile_seconds: float | None = None  # compiled only: the first step's time less a timed step's


def attention_multiply_adds(chunk_size: int, codebook_size: int, z_dim: int, h_dim: int) -> int:
    """Multiply-adds of VQ-attention per token: the logits over the 2C window keys and the S codewords (Z each) and the
    weighted sum over 2C window values and S memory means (H each)."""
    return (2 * chunk_size + codebook_size) * (z_dim + h_dim)


def longvq_train_flops(config: LongVQConfig, length: int) -> float:
    """FLOP model of one LongVQ forward + backward over `length` tokens (backward = 2x forward, so 3x forward).

    Counted: every matmul, 2 FLOPs per multiply-add. Per token and layer, the projections D->H (values),
    D->2D+Z+H (gates, shared, reset, hidden), H->D (output), D->F->D (FFN); the attention logits over the 2C window
    keys and the S codewords (Z each) and the weighted sum over 2C window values and S memory means (H each); plus
    the D->V LM head per token. Not counted: the EMA (its block scan, ~4 N + 2 P multiply-adds per token and
    channel), norms, activations,
    softmax and the per-block code statistics, so achieved/peak is a lower bound of the hardware use.
    """
    d, h, z = config.hidden_size, config.intermediate_size, config.shared_representation_size
    ffn = config.ffn_hidden_size or h
    projections = d * h + d * (2 * d + z + h) + h * d + 2 * d * ffn
    attention = attention_multiply_adds(config.chunk_size, config.codebook_size, z, h)
    per_token = config.num_hidden_layers * (projections + attention) + d * config.vocab_size
    return 3 * 2 * per_token * length


def _best_seconds(fn, repeats: int, device: str) -> float:
    """The best wall time of `fn()` over `repeats` runs after a warm-up one, synchronising a CUDA device."""
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_peak(size: int = 4096, repeats: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """This machine's matmul FLOP/s on `device` in `dtype` (default fp32 on the CPU): the best of `repeats`
    (size x size) @ (size x size) products."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / _best_seconds(lambda: a @ b, repeats, device)


def measure_attention_kernel(
    length: int = 16384, chunk_size: int = 256, codebook_size: int = 256, z_dim: int = 128, h_dim: int = 1024,
    repeats: int = 10,
) -> dict:  # fmt: skip
    """Seconds per forward + backward of causal block-wise VQ-attention over one row of `length` bf16 tokens on CUDA,
    through the Triton kernel and through the PyTorch path, each with its achieved FLOP/s
    (`attention_multiply_adds`, backward = 2x forward), and the measured bf16 matmul peak."""
    if not torch.cuda.is_available():
        raise ValueError("the kernel benchmark needs a CUDA device")
    if not ops_longvq.kernel_supports(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        raise ValueError("the kernel benchmark needs Triton (pip install triton)")
    device, dtype = "cuda", torch.bfloat16
    codebook = torch.randn(codebook_size, z_dim, device=device, dtype=dtype)
    codes = torch.randint(0, codebook_size, (1, length), device=device)
    query = torch.randn(1, length, z_dim, device=device, dtype=dtype, requires_grad=True)
    key = codebook[codes].requires_grad_()
    value = torch.randn(1, length, h_dim, device=device, dtype=dtype, requires_grad=True)
    table = torch.randn(4 * chunk_size - 1, device=device, requires_grad=True)  # causal offsets lie in (-C, 2C)
    mask = torch.ones(1, length, dtype=torch.bool, device=device)

    def step():
        out = ops_longvq._blockwise_attention(
            query, key, value, codes, codebook, mask, lambda offsets: table[offsets + 2 * chunk_size - 1], chunk_size,
            bidirectional=False,
        )  # fmt: skip
        out.backward(torch.ones_like(out))

    kernel_seconds = _best_seconds(step, repeats, device)
    with mock.patch.object(ops_longvq, "kernel_supports", lambda query: False):  # the PyTorch path, same tensors
        torch_seconds = _best_seconds(step, repeats, device)
    flops = 3 * 2 * attention_multiply_adds(chunk_size, codebook_size, z_dim, h_dim) * length
    return {
        "length": length, "kernel_seconds": kernel_seconds, "pytorch_seconds": torch_seconds,
        "kernel_flops": flops / kernel_seconds, "pytorch_flops": flops / torch_seconds,
        "bf16_matmul_peak": measure_matmul_peak(device=device, dtype=dtype),
    }  # fmt: skip


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_resident_bytes() -> None:
    """Return the allocator's free memory to the OS (glibc `malloc_trim`: freed tensors below its mmap threshold stay
    resident otherwise) and restart this process's high-water resident memory (Linux `clear_refs`) there."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_resident_bytes() -> int:
    """This process's high-water resident memory since the last `_reset_peak_resident_bytes` (Linux `VmHWM`)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _training_setup(name: str, length: int, hidden_size: int, num_layers: int, compile: bool, seed: int):
    """The benchmarked model `name` ("+ckpt": activation checkpointing on) in training mode, what to call it through
    (`torch.compile(fullgraph=True, dynamic=False)` if `compile`) and one random batch of `length` token ids."""
    base, _, checkpointing = name.partition("+")
    model = benchmark_model(base, hidden_size=hidden_size, num_layers=num_layers, seed=seed).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    call = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    return model, call, ids


def measure_train_point(
    name: str, length: int, hidden_size: int = 256, num_layers: int = 4, min_seconds: float = 3.0,
    max_steps: int = 5, seed: int = 0, compile: bool = False,
) -> TrainResult:
    """Time forward + backward of one model on one random batch of `length` tokens, in this process: one warm-up
    step, then steps until `min_seconds` have passed (at most `max_steps`); the median step is reported (a warm-up
    step slower than `SLOW_STEP_SECONDS` is reported itself, unless compiled). Peak memory is this process's
    high-water resident memory over the steps after the warm-up, less its resident memory before them (so neither
    the compiler's own memory nor a slow warm-up step's counts). `compile`: the model runs
    through `torch.compile(fullgraph=True, dynamic=False)` (inductor); the warm-up step compiles it, and its time
    less the median step is reported as the compile time (inductor's on-disk caches may shorten it on a rerun)."""
    base = name.partition("+")[0]
    model, call, ids = _training_setup(name, length, hidden_size, num_layers, compile, seed)

    def step():
        call(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    def timed_step():
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        step()
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before

    warm_up, warm_up_system = timed_step()
    _reset_peak_resident_bytes()
    baseline = _resident_bytes()  # after the warm-up step: the model and any compiled code, no activation
    times, system = ([warm_up], warm_up_system) if warm_up > SLOW_STEP_SECONDS and not compile else ([], 0.0)
    while len(times) < max(1, max_steps) and (sum(times) < min_seconds or not times):
        seconds, system_seconds = timed_step()
        times.append(seconds)
        system += system_seconds
    peak = _peak_resident_bytes() - baseline
    seconds = sorted(times)[len(times) // 2]
    flops = longvq_train_flops(model.config, length) if base == "longvq" else None
    return TrainResult(
        model=name, length=length, hidden_size=hidden_size, parameters=count_parameters(model),
        seconds_per_step=seconds, tokens_per_second=length / seconds, system_seconds_per_step=system / len(times),
        peak_memory_bytes=max(peak, 0), flops_per_step=flops, achieved_flops=flops / seconds if flops else None,
        compiled=compile, compile_seconds=warm_up - seconds if compile else None,
    )  # fmt: skip


def saved_elements(function, exclude=()) -> int:
    """Elements of the distinct storages autograd saves for backward while `function()` runs, those of the `exclude`
    tensors (parameters, buffers) not counted."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function()  # kept alive while counting: its graph holds every saved tensor
    elements = sum(count for pointer, count in saved.items() if pointer not in excluded)
    del output
    return elements


def saved_floats_per_token_layer(
    name: str, length: int, hidden_size: int = 256, num_layers: int = 4, compile: bool = False, seed: int = 0
) -> float:
    """Elements autograd keeps for backward per token and layer in one training forward of the benchmarked model
    `name` (`benchmark_model`) over `length` random tokens (`saved_elements`, parameters and buffers excluded).
    `compile`: through `torch.compile(fullgraph=True, dynamic=False)`, after a warm-up step that compiles (what the
    compiled graph saves, after inductor's own recomputation choices)."""
    model, call, ids = _training_setup(name, length, hidden_size, num_layers, compile, seed)
    if compile:
        call(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
    owned = (*model.parameters(), *model.buffers())
    elements = saved_elements(lambda: call(ids, labels=ids, use_cache=False).loss, exclude=owned)
    return elements / (length * model.config.num_hidden_layers)


def run_train_point(name: str, length: int, **kwargs) -> TrainResult:
    """`measure_train_point` in a fresh Python process, so that each point's peak memory is its own."""
    command = [sys.executable, "-m", "longvq.benchmark", "train-point", name, str(length), json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark point {name} @ {length} failed:\n{done.stderr[-2000:]}")
    return TrainResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def run_train(
    lengths=DEFAULT_TRAIN_LENGTHS, models=TRAIN_MODELS, mamba_lengths=DEFAULT_MAMBA_LENGTHS,
    checkpointing_lengths=DEFAULT_CHECKPOINTING_LENGTHS, max_llama_length=None, **kwargs,
) -> list[TrainResult]:
    """Every (model, length) point, shortest first; Mamba only at `mamba_lengths`, the checkpointing variants at
    `checkpointing_lengths`, Llama up to `max_llama_length`."""
    work = []
    for name in models:
        model_lengths = {"mamba": mamba_lengths}.get(name, checkpointing_lengths if "+ckpt" in name else lengths)
        if name.startswith("llama") and max_llama_length:
            model_lengths = [n for n in model_lengths if n <= max_llama_length]
        work += [(name, n) for n in model_lengths]
    work.sort(key=lambda point: (point[1], models.index(point[0])))
    results = []
    for name, length in (progress := tqdm(work, desc="train benchmark")):
        progress.set_postfix_str(f"{name} @ {length}")
        results.append(run_train_point(name, length, **kwargs))
    return results


def train_table(results: list[TrainResult]) -> str:
    """Markdown table: tokens/s and peak memory (MiB) of every model per length, and LongVQ's FLOP/s."""
    names = [n for n in TRAIN_MODELS if any(r.model == n for r in results)]
    by_key = {(r.model, r.length): r for r in results}
    header = "| length | " + " | ".join(f"{n} tok/s" for n in names) + " | "
    header += " | ".join(f"{n} MiB" for n in names) + " | LongVQ GFLOP/s |"
    lines = [header, "|" + "---:|" * (2 * len(names) + 2)]
    for length in sorted({r.length for r in results}):
        row = [by_key.get((n, length)) for n in names]
        speed = [f"{r.tokens_per_second:.0f}" if r else "-" for r in row]
        memory = [f"{r.peak_memory_bytes / 2**20:.0f}" if r else "-" for r in row]
        ours = by_key.get(("longvq", length))
        flops = f"{ours.achieved_flops / 1e9:.0f}" if ours and ours.achieved_flops else "-"
        lines.append(f"| {length} | " + " | ".join(speed + memory) + f" | {flops} |")
    return "\n".join(lines)


def train_targets(results: list[TrainResult], matmul_peak: float, flops_point: TrainResult | None = None) -> dict:
    """The training targets of the project as ratios from this run (None where a point was not measured)."""
    by_key = {(r.model, r.length): r for r in results}

    def ratio(a, b, length_a, length_b=None):
        first, second = by_key.get((a, length_a)), by_key.get((b, length_b or length_a))
        return first.tokens_per_second / second.tokens_per_second if first and second else None

    def memory_ratio(a, b, length):
        first, second = by_key.get((a, length)), by_key.get((b, length))
        return first.peak_memory_bytes / second.peak_memory_bytes if first and second else None

    targets = {
        "longvq_tokens_per_s_65536_over_1024": ratio("longvq", "longvq", 65536, 1024),
        "longvq_over_llama_tokens_per_s_at_1024": ratio("longvq", "llama", 1024),
        "longvq_over_llama_tokens_per_s_at_16384": ratio("longvq", "llama", 16384),
        "longvq_over_llama_tokens_per_s_at_65536": ratio("longvq", "llama", 65536),
        "longvq_over_mamba_tokens_per_s_at_1024": ratio("longvq", "mamba", 1024),
        "longvq_over_llama_peak_memory_at_16384": memory_ratio("longvq", "llama", 16384),
        "longvq_ckpt_over_llama_peak_memory_at_16384": memory_ratio("longvq+ckpt", "llama", 16384),
        "longvq_ckpt_over_llama_ckpt_peak_memory_at_16384": memory_ratio("longvq+ckpt", "llama+ckpt", 16384),
        "matmul_peak_gflops": matmul_peak / 1e9,
    }
    if flops_point is not None:
        key = f"longvq_d{flops_point.hidden_size}_at_{flops_point.length}_fraction_of_matmul_peak"
        targets[key] = flops_point.achieved_flops / matmul_peak
    return targets


def plot_train(results: list[TrainResult], path: str):
    """Log-log tokens/s and peak memory versus length, one line per model."""
    plt = pyplot()
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for name in TRAIN_MODELS:
        rows = [r for r in results if r.model == name and r.hidden_size == results[0].hidden_size]
        rows.sort(key=lambda r: r.length)
        if rows:
            lengths = [r.length for r in rows]
            speed.plot(lengths, [r.tokens_per_second for r in rows], marker="o", label=name)
            memory.plot(lengths, [max(r.peak_memory_bytes, 1) / 2**20 for r in rows], marker="o", label=name)
    panels = (speed, "Training throughput (fwd + bwd)", "tokens / s"), (memory, "Peak training memory", "MiB")
    _style_axes(plt, figure, path, *panels, "sequence length (tokens)")


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
    compiled: bool = False


@torch.inference_mode()
def measure_decode(
    model, context: int, steps: int = 32, warmup: int = 4, seed: int = 0, compile: bool = False
) -> tuple[float, int, float]:
    """Prefill `context` random tokens, then time single-token greedy steps (compiled with `compile`: the warm-up
    steps compile them; a model whose cache grows, Llama, then decodes into a `StaticCache` sized for the run).
    Returns (median ms per token, state bytes after the steps, prefill seconds)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    static = compile and model.config.model_type != "longvq"
    cache = StaticCache(config=model.config, max_cache_len=context + warmup + steps + 1) if static else None
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
    prefill = time.perf_counter() - start
    cache, token = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)
    step_call = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        out = step_call(token, use_cache=True, **{CACHE_NAME: cache})  # the cache argument's name in this transformers
        elapsed = time.perf_counter() - start
        cache, token = getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1)
        if step >= warmup:
            times.append(elapsed)
    times.sort()
    return 1e3 * times[len(times) // 2], state_bytes(cache), prefill


def run_decode(contexts=DEFAULT_CONTEXTS, steps=32, models=None, compile=False, **model_kwargs) -> list[DecodeResult]:
    models = models or benchmark_models(**model_kwargs)
    results = []
    work = [(name, context) for context in contexts for name in models]
    for name, context in tqdm(work, desc="decode benchmark"):
        ms, nbytes, prefill = measure_decode(models[name], context, steps, compile=compile)
        results.append(DecodeResult(name, context, ms, nbytes, prefill, compile))
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
    plt = pyplot()
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("longvq", "LongVQ (LongVQCache)"), ("llama", "Llama SDPA (KV cache)")):
        rows = sorted((r for r in results if r.model == name), key=lambda r: r.context)
        contexts = [r.context for r in rows]
        latency.plot(contexts, [r.ms_per_token for r in rows], marker="o", label=label)
        memory.plot(contexts, [r.state_bytes / 2**20 for r in rows], marker="o", label=label)
    panels = (latency, "Per-token decode latency", "ms / token"), (memory, "Decoding state", "MiB")
    _style_axes(plt, figure, path, *panels, "context length (tokens)")


def _style_axes(plt, figure, path, *panels_and_xlabel):
    """Log-log axes with titles, units, grid and legend; saves the figure to `path`."""
    *panels, xlabel = panels_and_xlabel
    for axis, title, unit in panels:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _print_targets(targets: dict):
    for name, value in targets.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")


def _train(args) -> dict:
    sizes = {"hidden_size": args.hidden_size, "num_layers": args.layers, "min_seconds": args.min_seconds}
    sizes["threads"] = args.threads
    if args.compile:
        sizes["compile"] = True
    results = run_train(
        args.lengths, tuple(args.models), args.mamba_lengths, args.checkpointing_lengths, args.max_llama_length, **sizes
    )
    flops_point = None
    if args.flops_hidden_size:
        flops_sizes = {**sizes, "hidden_size": args.flops_hidden_size}
        flops_point = run_train_point("longvq", args.flops_length, **flops_sizes)
    peak = measure_matmul_peak()
    targets = train_targets(results, peak, flops_point)
    plot_train(results, os.path.join(args.out, "train.png"))
    print(train_table(results))
    if flops_point is not None:
        print(
            f"\nLongVQ D={flops_point.hidden_size} at {flops_point.length}: "
            f"{flops_point.achieved_flops / 1e9:.0f} GFLOP/s "
            f"achieved, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s"
        )
    return {
        "results": [asdict(r) for r in results],
        "flops_point": asdict(flops_point) if flops_point else None,
        "targets": targets,
    }


def _decode(args) -> dict:
    results = run_decode(
        args.contexts, args.steps, compile=args.compile, hidden_size=args.hidden_size, num_layers=args.layers,
        chunk_size=args.chunk_size, codebook_size=args.codebook_size,
    )  # fmt: skip
    plot_decode(results, os.path.join(args.out, "decode.png"))
    print(decode_table(results))
    return {"results": [asdict(r) for r in results], "targets": decode_targets(results)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longvq-benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    modes = {
        "train": sub.add_parser("train", help="training tokens/s, peak memory and FLOP/s versus length"),
        "decode": sub.add_parser("decode", help="per-token decode latency and state bytes versus context length"),
        "all": sub.add_parser("all", help="train and decode, one summary"),
    }
    saved = sub.add_parser("saved", help="elements saved for backward per token and layer, LongVQ and Llama")
    saved.add_argument("--length", type=int, default=1024)
    saved.add_argument("--hidden-size", type=int, default=256)
    saved.add_argument("--layers", type=int, default=4)
    saved.add_argument("--compile", action="store_true", help="through torch.compile (fullgraph, static shapes)")
    kernel = sub.add_parser("kernel", help="CUDA: the Triton VQ-attention kernel against the PyTorch path")
    kernel.add_argument("--length", type=int, default=16384)
    kernel.add_argument("--repeats", type=int, default=10)
    for name, mode in modes.items():
        mode.add_argument("--hidden-size", type=int, default=256)
        mode.add_argument("--layers", type=int, default=4)
        mode.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
        mode.add_argument("--out", default="outputs/benchmark", help="folder for the JSON file and PNG plots")
        mode.add_argument(
            "--compile", action="store_true",
            help="every model through torch.compile(fullgraph=True, dynamic=False), inductor: training steps (compile "
            "times reported) and decoding steps (Llama with a StaticCache)",
        )  # fmt: skip
        if name in ("train", "all"):
            mode.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_TRAIN_LENGTHS))
            mode.add_argument("--models", nargs="+", default=list(TRAIN_MODELS), choices=TRAIN_MODELS)
            mode.add_argument("--mamba-lengths", type=int, nargs="+", default=list(DEFAULT_MAMBA_LENGTHS))
            mode.add_argument(
                "--checkpointing-lengths", type=int, nargs="+", default=list(DEFAULT_CHECKPOINTING_LENGTHS),
                help="lengths of the activation-checkpointing variants (longvq+ckpt, llama+ckpt)",
            )  # fmt: skip
            mode.add_argument("--max-llama-length", type=int, default=None, help="skip longer Llama points")
            mode.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per point (>= 1 step)")
            mode.add_argument("--flops-hidden-size", type=int, default=512, help="width of the FLOP/s point (0: skip)")
            mode.add_argument("--flops-length", type=int, default=16384)
        if name in ("decode", "all"):
            mode.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
            mode.add_argument("--steps", type=int, default=32, help="timed decoding steps per context (median)")
            mode.add_argument("--chunk-size", type=int, default=256)
            mode.add_argument("--codebook-size", type=int, default=256)
    point = sub.add_parser("train-point", help=argparse.SUPPRESS)  # one measurement, run by `run_train_point`
    point.add_argument("name")
    point.add_argument("length", type=int)
    point.add_argument("options", help="JSON keyword arguments of measure_train_point (plus threads)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.mode == "train-point":
        options = json.loads(args.options)
        threads = options.pop("threads", None)
        if threads:
            torch.set_num_threads(threads)
        print(json.dumps(asdict(measure_train_point(args.name, args.length, **options))))
        return
    if args.mode == "saved":
        sizes = {"hidden_size": args.hidden_size, "num_layers": args.layers, "compile": args.compile}
        result = {name: saved_floats_per_token_layer(name, args.length, **sizes) for name in ("longvq", "llama")}
        for name, floats in result.items():
            print(f"{name}: {floats:,.0f} elements saved for backward per token and layer at {args.length} tokens")
        return result
    if args.mode == "kernel":
        result = measure_attention_kernel(args.length, repeats=args.repeats)
        for path in ("kernel", "pytorch"):
            print(
                f"{path}: {result[f'{path}_seconds'] * 1e3:.2f} ms forward + backward at {args.length} tokens, "
                f"{result[f'{path}_flops'] / 1e12:.1f} TFLOP/s "
                f"(bf16 matmul peak {result['bf16_matmul_peak'] / 1e12:.0f} TFLOP/s)"
            )  # fmt: skip
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    report = {"args": vars(args), "threads": torch.get_num_threads()}
    if args.mode in ("train", "all"):
        report["train"] = _train(args)
    if args.mode in ("decode", "all"):
        report["decode"] = _decode(args)
    path = os.path.join(args.out, f"{args.mode}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print()
    for part in ("train", "decode"):
        if part in report:
            _print_targets(report[part]["targets"])
    print(f"\nwrote {path} and the PNG plots in {args.out}")


if __name__ == "__main__":
    main()
