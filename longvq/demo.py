"""The main demo (`longvq-demo`): train a small byte-level LongVQ language model on the embedded corpus on CPU for a
fixed number of steps, report validation bits per byte and codebook health, sample text, and save a checkpoint.

    longvq-demo                    # 250 steps (about a minute on a busy 2-core CPU), outputs in outputs/demo
    longvq-demo --steps 600 --out runs/longer

The tokenizer is `byte_tokenizer()`: ids 0-255 are the UTF-8 bytes, 256 is `<pad>` and 257 is `<|endoftext|>`. The
corpus is read as documents (its chapters), each preceded by `<|endoftext|>`, so the model learns that token too; the
last 10% of the ids (inside the last chapter: bytes only) is held out for validation. The run is a fixed amount of
work, on one CPU thread by default (more threads made each step several times slower on a busy 2-core machine), so
its numbers depend on the seed, not on how fast or busy the machine is.

The output folder is a ready checkpoint: `model.safetensors`, `config.json` and `generation_config.json` (pad, bos and
eos ids), the tokenizer files, plus `metrics.json` and `validation_curve.png`. With `longvq` imported,
`pipeline("text-generation", model=<out>)` and `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(<out>)` load it.
"""

import argparse
import json
import math
import os
import re
import time
from importlib import resources

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from .configuration_longvq import LongVQConfig
from .modeling_longvq import LongVQForCausalLM
from .tokenization import byte_tokenizer

PROMPT = "The lighthouse keeper"
DEFAULT_STEPS = 250


def corpus_documents() -> list[str]:
    """The embedded corpus split into documents: its title page and each chapter."""
    text = resources.files("longvq").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    return re.split(r"\n\n(?=Chapter \d+\.)", text)


def load_corpus(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The corpus as one 1-D tensor of ids: every document's bytes, each document preceded by the end-of-text id."""
    ids = []
    for document in corpus_documents():
        ids += [tokenizer.eos_token_id, *tokenizer(document)["input_ids"]]
    return torch.tensor(ids, dtype=torch.long)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LongVQForCausalLM:
    """A 2-layer model whose vocabulary is the tokenizer's (bytes + `<pad>` + `<|endoftext|>`)."""
    torch.manual_seed(seed)
    # Dropout because the corpus is small: without it the model starts memorising the training part within a minute.
    config = LongVQConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        shared_representation_size=64, ema_projection_size=16, codebook_size=64, chunk_size=64, dropout=0.1,
        hidden_dropout=0.1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LongVQForCausalLM(config)


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warmup over the first steps, then cosine decay to 10% of the peak at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: LongVQForCausalLM, windows: torch.Tensor) -> dict:
    """Validation bits per byte (mean next-byte NLL / ln 2) and per-layer codebook usage/perplexity, in eval mode."""
    model.eval()
    out = model(input_ids=windows, use_cache=False)
    nll = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten())
    model.train()
    return {
        "bpb": nll.item() / math.log(2),
        "usage": out.codebook_usage.tolist(),
        "perplexity": out.codebook_perplexity.tolist(),
    }


@torch.no_grad()
def sample(
    model: LongVQForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new_tokens: int, seed: int
) -> str:
    """Sample at temperature 0.8 with `generate()`, which decodes with the constant-size LongVQCache."""
    model.eval()
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=0)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def save_curve(history: list, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["bpb"] for h in history], marker="o", label="validation")
    ax.plot(steps[1:], [h["train_bpb"] for h in history[1:]], alpha=0.6, label="training (recent mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("LongVQ byte-level LM on the embedded corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=_positive_int, default=DEFAULT_STEPS,
        help=f"optimizer steps (default {DEFAULT_STEPS}, about a minute on a busy 2-core CPU)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("outputs", "demo"), help="output directory")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--seq-len", type=_positive_int, default=256)
    parser.add_argument("--lr", type=_positive_float, default=6e-3)
    parser.add_argument("--eval-every", type=_positive_int, default=25, help="steps between validation evaluations")
    parser.add_argument("--sample-bytes", type=_positive_int, default=200)
    parser.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch CPU threads (default 1: fastest for this small model on a shared machine)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = byte_tokenizer()
    data = load_corpus(tokenizer)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    if len(train) <= args.seq_len or len(val) < args.seq_len:
        parser.error(f"--seq-len {args.seq_len} is too long for the corpus ({len(val)} validation ids)")
    starts = range(0, len(val) - args.seq_len + 1, args.seq_len)
    val_windows = torch.stack([val[s : s + args.seq_len] for s in starts])  # fixed, contiguous, non-overlapping
    model = build_model(tokenizer, args.seed)
    model.train()
    print(
        f"corpus: {len(data)} ids ({len(corpus_documents())} documents; train {len(train)}, validation {len(val)} = "
        f"{len(val_windows)} windows of {args.seq_len}); model: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, vocabulary {model.config.vocab_size}, {model.config.num_hidden_layers} layers, codebook "
        f"{model.config.codebook_size}, chunk {model.config.chunk_size}; {args.steps} steps on {args.threads} thread(s)"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)

    history = [{"step": 0, "seconds": 0.0, **evaluate(model, val_windows)}]
    print(f"step     0 | val {history[0]['bpb']:.3f} bits/byte")
    recent_losses = []
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), unit="step", desc="training")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, args.steps, args.lr, warmup_steps=20)
        offsets = torch.randint(0, len(train) - args.seq_len + 1, (args.batch_size,), generator=generator)
        batch = torch.stack([train[o : o + args.seq_len] for o in offsets.tolist()])
        out = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_losses.append(out.loss.item())
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(model, val_windows)
            train_bpb = sum(recent_losses) / len(recent_losses) / math.log(2)
            history.append({"step": step, "seconds": time.perf_counter() - start, "train_bpb": train_bpb, **metrics})
            recent_losses = []
            usage = " ".join(f"{u:.0%}" for u in metrics["usage"])
            perplexity = " ".join(f"{p:.1f}" for p in metrics["perplexity"])
            bar.write(
                f"step {step:5d} | train {train_bpb:.3f} | val {metrics['bpb']:.3f} bits/byte | val codebook usage per "
                f"layer {usage}, perplexity {perplexity} (of {model.config.codebook_size})"
            )
    bar.close()
    train_seconds = time.perf_counter() - start

    first, last = history[0], history[-1]
    throughput = args.steps * args.batch_size * args.seq_len / train_seconds
    print(f"\ntrained {args.steps} steps in {train_seconds:.1f} s ({throughput:,.0f} training bytes/s)")
    print(f"validation bits/byte: first {first['bpb']:.3f} -> last {last['bpb']:.3f}")
    print(
        "validation codebook usage per layer: " + " ".join(f"{u:.0%}" for u in last["usage"])
        + ", perplexity: " + " ".join(f"{p:.1f}" for p in last["perplexity"])
    )  # fmt: skip
    text = sample(model, tokenizer, PROMPT, args.sample_bytes, seed=args.seed)
    print(f"\nsample (temperature 0.8):\n{text}\n")

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    save_curve(history, os.path.join(args.out, "validation_curve.png"))
    summary = {"args": vars(args), "steps": args.steps, "train_seconds": train_seconds, "history": history}
    summary["sample"] = text
    with open(os.path.join(args.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"saved the model, tokenizer, validation_curve.png and metrics.json to {args.out}")


if __name__ == "__main__":
    main()
