"""Training speed: a plain fp32 peft + transformers Trainer loop vs mocae's expert trainer.

Same backbone, same helpful-expert examples, same number of optimiser steps, one process:
  (a) baseline: fp32, LoRA dropout 0.05 (DESIGN.md default), examples in random order padded
      per batch (DataCollatorForSeq2Seq), transformers Trainer;
  (b) ours: mocae.experts.train_expert (trl SFTTrainer, bf16 autocast, length-grouped batches,
      no LoRA dropout, the model's own masked loss).
Throughput counts real (non-padding) tokens per second of training wall time.

Run:  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/train_speed.py [--steps 25]
Writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def baseline_tokens_per_s(cfg, examples, steps: int) -> tuple[float, int]:
    """Plain peft + Trainer, fp32, padded random batches. Returns (tokens/s, real tokens)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from mocae.backbones import load_backbone

    model, tokenizer = load_backbone(cfg.backbone)
    tokenizer.padding_side = "right"

    def encode(ex):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                               tokenize=False, add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(ex.completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = (p + c)[: cfg.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": ([-100] * len(p) + c)[: cfg.max_length]}

    data = Dataset.from_list([encode(ex) for ex in examples])
    real_tokens = sum(len(x) for x in data["input_ids"])
    model = get_peft_model(model, LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.05, target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, use_cpu=True, per_device_train_batch_size=cfg.batch_size, max_steps=steps,
            learning_rate=cfg.learning_rate, logging_steps=5, save_strategy="no", report_to=[],
            seed=cfg.seed, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return real_tokens / wall, real_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--backbone", default="smollm2-135m")
    args = parser.parse_args()

    from mocae.experts.config import ExpertConfig
    from mocae.experts.dataset import select_examples
    from mocae.experts.train import train_expert

    cfg = ExpertConfig(axis="helpful", backbone=args.backbone, max_examples=args.steps * 8,
                       batch_size=8, max_length=256, epochs=1, save_steps=10_000)
    examples = select_examples(cfg)
    base_tps, base_tokens = baseline_tokens_per_s(cfg, examples, args.steps)
    print(f"baseline: {base_tps:.1f} tokens/s over {base_tokens} tokens", flush=True)

    with tempfile.TemporaryDirectory() as root:
        out = train_expert(cfg, root=Path(root))
        record = json.loads((out / "training.json").read_text())
    assert record["steps"] == args.steps, f"ours ran {record['steps']} steps, baseline {args.steps}"
    ours = record["tokens_per_s"]
    print(f"ours: {ours:.1f} tokens/s over {record['tokens_trained']} tokens", flush=True)

    result = {
        "baseline_tokens_per_s": round(base_tps, 1),
        "ours_tokens_per_s": ours,
        "ratio": round(ours / base_tps, 2),
        "steps": args.steps,
        "backbone": args.backbone,
        "date": time.strftime("%Y-%m-%d"),
        "examples": len(examples),
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "baseline": "fp32 peft LoRA (r=8, alpha=16, dropout 0.05, all linear) + transformers Trainer, "
                    "random order, padded per batch",
        "ours": "mocae train_expert: trl SFTTrainer, bf16 autocast, group_by_length, dropout 0, masked LM loss",
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "command": "python " + " ".join(sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
