"""The command `longvq-train-clm`: train a byte-level LongVQ causal LM on the embedded corpus with `train_causal_lm`,
in one process or many, and write a results JSON.

    longvq-train-clm --output_dir runs/clm --max_steps 500
    torchrun --nproc_per_node 2 -m longvq.training --output_dir runs/clm                    # DDP (gloo on CPU)
    accelerate launch --multi_gpu --num_processes 8 -m longvq.training --output_dir runs/clm    # DDP on 8 GPUs
    accelerate launch --config_file fsdp.yaml -m longvq.training --output_dir runs/clm          # FSDP

(`python -m longvq.training` is the same command; launchers start it with `-m`.) On a machine without GPUs,
`accelerate launch --multi_gpu --num_processes 2` runs 2 CPU processes over gloo (`accelerate launch --cpu
--num_processes 2` starts a single process unless MPI is configured). Process 0 writes `results.json` (losses, eval
loss / bits per byte, codebook fingerprint) into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from ..cli import parse_overrides
from ..modeling_longvq import LongVQForCausalLM
from .codebooks import codebook_summary
from .recipes import train_causal_lm


def _parse_overrides(text: str | None) -> dict:
    """`"dropout=0.1,chunk_size=64"` (the --config_overrides option) -> {"dropout": 0.1, "chunk_size": 64}."""
    return parse_overrides(filter(None, (part.strip() for part in (text or "").split(","))))


def build_parser() -> argparse.ArgumentParser:
    """The command line of `longvq-train-clm`."""
    parser = argparse.ArgumentParser(
        prog="longvq-train-clm",
        description="Train a byte-level LongVQ causal LM on the embedded corpus with the transformers Trainer. Runs "
        "unchanged as `longvq-train-clm`, `python -m longvq.training`, `accelerate launch --multi_gpu "
        "--num_processes N -m longvq.training` (DDP; on a machine without GPUs it runs N CPU processes over gloo) or "
        "`torchrun --nproc_per_node N -m longvq.training`. (`accelerate launch --cpu --num_processes N` starts a "
        "single process unless MPI is configured.)",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None, help="local LongVQForCausalLM folder to start from")
    parser.add_argument("--config_overrides", default=None, help="e.g. 'hidden_size=128,chunk_size=64,dropout=0.1'")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--lr_scheduler_type", default="cosine")
    parser.add_argument("--warmup_steps", type=int, default=0)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--eval_steps", type=int, default=None)
    parser.add_argument("--save_steps", type=int, default=None)
    parser.add_argument("--save_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None, help="checkpoint folder, or 'latest'")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--torch_compile", action="store_true",
        help="compile the model (TrainingArguments.torch_compile: one graph for the fixed-length blocks, inductor)",
    )  # fmt: skip
    parser.add_argument("--use_cpu", action="store_true", help="train on CPU even when a GPU is available")
    parser.add_argument("--no_save_model", action="store_true", help="do not write the final model")
    parser.add_argument("--results_file", default="results.json", help="written into --output_dir by process 0")
    parser.add_argument(
        "--rank_codebooks", action="store_true",
        help="every process writes its codebook fingerprint to <output_dir>/codebooks/rank<k>.json",
    )  # fmt: skip
    return parser


def main(argv=None):
    """`longvq-train-clm` (also `python -m longvq.training`): train, evaluate, save, and write a results JSON
    (process 0)."""
    args = build_parser().parse_args(argv)
    # train_causal_lm turns DDP's buffer broadcast off on purpose (see there); torch now flags the argument's name.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    model = None
    if args.model_name_or_path:
        if not os.path.isdir(args.model_name_or_path):
            raise FileNotFoundError(f"--model_name_or_path {args.model_name_or_path!r} is not a checkpoint folder")
        model = LongVQForCausalLM.from_pretrained(args.model_name_or_path, **_parse_overrides(args.config_overrides))
    resume = True if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    run = train_causal_lm(
        args.output_dir,
        model=model,
        config=None if model is not None else _parse_overrides(args.config_overrides),
        block_size=args.block_size,
        seed=args.seed,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        optim=args.optim,
        activation_checkpointing=args.activation_checkpointing,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        resume_from_checkpoint=resume,
        save_final_model=not args.no_save_model,
        bf16=args.bf16,
        torch_compile=args.torch_compile,
        **({"use_cpu": True} if args.use_cpu else {}),
    )
    trainer, training_args = run.trainer, run.trainer.args
    codebooks = codebook_summary(trainer.model)
    if args.rank_codebooks:
        folder = os.path.join(args.output_dir, "codebooks")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{training_args.process_index}.json"), "w", encoding="utf-8") as f:
            json.dump({"rank": training_args.process_index, **codebooks}, f, indent=2)
    if trainer.is_world_process_zero():
        losses = run.losses
        results = {
            "world_size": training_args.world_size,
            "global_batch_size": training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * training_args.world_size,
            "steps": trainer.state.global_step,
            "train_loss": run.train_metrics.get("train_loss"),
            "final_train_loss": losses[-1] if losses else None,
            "losses": losses,
            "eval_loss": run.eval_metrics.get("eval_loss"),
            "eval_bpb": run.eval_metrics.get("eval_bpb"),
            "eval_perplexity": run.eval_metrics.get("eval_perplexity"),
            "codebooks": codebooks,
            "args": vars(args),
        }
        with open(os.path.join(args.output_dir, args.results_file), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        shown = {
            k: "n/a" if results[k] is None else f"{results[k]:.4f}"
            for k in ("final_train_loss", "eval_loss", "eval_bpb")
        }
        print(
            f"steps {results['steps']} | final train loss {shown['final_train_loss']} | eval loss "
            f"{shown['eval_loss']} | eval {shown['eval_bpb']} bits/byte | {args.output_dir}"
        )
    run.trainer.accelerator.wait_for_everyone()
    return run



__all__ = ["build_parser", "main"]
