"""Train one per-axis LoRA expert with trl's SFTTrainer, resumably and fast on CPU.

An expert lives in ``$MOCAE_CACHE/experts/<backbone>/<axis>-<key>/``: a plain peft adapter
folder (``PeftModel.from_pretrained`` loads it) plus ``training.json`` and ``stage.json``. The key
covers the config, the backbone and the data files the expert reads (content hashes, and the
split rules' version), so an expert trained on other data is never reused. ``training.json`` is
written last, so its presence means "finished": the same key is then reused, not retrained.
While training, checkpoints go to ``checkpoints/`` inside that folder; a killed run (kill -9
included) resumes from the newest complete checkpoint.

Speed on CPU comes from two settings measured in ``benchmarks/train_speed.py``: bf16 autocast
(weights stay fp32) and best-fit packing of examples into full rows (no padding; transformers
keeps packed examples from attending to each other through ``position_ids``).

The device is ``mocae.device``'s (CUDA when available, else the CPU). Under ``accelerate launch``
(several processes, e.g. ``--num_processes 2 --cpu`` over gloo) the same call trains data-parallel:
every rank trains, the main process alone writes the adapter and its records, the others wait
for it and return the same folder.
"""

from __future__ import annotations

import contextlib
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from mocae.config import config_hash
from mocae.data import loaders
from mocae.experts.config import ExpertConfig, MultitaskConfig
from mocae.experts.dataset import data_counts, select_examples, to_sft_rows
from mocae.errors import read_json
from mocae.experts.checks import check_adapter
from mocae.paths import atomic_write_json, cache_dir
from mocae.stages import backbone_fingerprint, data_fingerprint, stage_inputs, stage_key, write_stage

TRAINING_FILE = "training.json"


def training_files(cfg: ExpertConfig) -> list[str]:
    """The data files (relative to the data directory) that ``cfg``'s expert trains on."""
    if isinstance(cfg, MultitaskConfig):
        return sorted({f for axis in cfg.union_caps for f in training_files(cfg.axis_config(axis))})
    if cfg.axis == "helpful":
        if getattr(cfg, "trainer", "sft") == "dpo":  # GPT-4's judgements, sided by THE AlpacaEval split
            from mocae.data.judge_files import ALPACA_EVAL_ANNOTATIONS

            return sorted([loaders.ALPACA, loaders.ALPACA_EVAL, ALPACA_EVAL_ANNOTATIONS])
        return [loaders.ALPACA]
    if cfg.axis == "honest":
        return [loaders.TRUTHFULQA]
    files = {loaders.SAFETY_REFUSALS}
    if cfg.benign_fraction > 0:
        files |= {loaders.ALPACA for s in cfg.benign_sources if s.startswith("alpaca")}
        files |= {loaders.TRUTHFULQA for s in cfg.benign_sources if s == "truthfulqa"}
    return sorted(files)


def expert_inputs(cfg: ExpertConfig, data_dir: Path | None = None) -> dict:
    """Everything that determines the expert: config, backbone identity, data file digests."""
    return stage_inputs(config=cfg, backbone=backbone_fingerprint(cfg.backbone),
                        data=data_fingerprint(training_files(cfg), data_dir))


def expert_dir(cfg: ExpertConfig, root: Path | None = None, data_dir: Path | None = None) -> Path:
    """The folder that holds (or will hold) the expert trained with ``cfg`` on ``data_dir``'s files."""
    backbone = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.backbone).strip("_")
    key = stage_key(expert_inputs(cfg, data_dir))[:12]
    return (root or cache_dir() / "experts") / backbone / f"{cfg.axis}-{key}"


def is_trained(path: Path) -> bool:
    """True when ``path`` holds a finished expert."""
    return (path / TRAINING_FILE).is_file() and (path / "adapter_config.json").is_file()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (the last file the Trainer saves).

    A checkpoint without it was cut off mid-save (e.g. kill -9) and is removed.
    """
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return path
        shutil.rmtree(path, ignore_errors=True)
    return None


def lora_config(cfg: ExpertConfig):
    """The peft LoraConfig for ``cfg``."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), layers_to_transform=cfg.layers,
        bias="none", task_type="CAUSAL_LM",
    )


def trainer_args(cfg: ExpertConfig, output_dir: Path, progress: bool = True) -> dict:
    """The transformers TrainingArguments every expert trainer (SFT, DPO) shares: the resolved device
    (``mocae.device``), bf16 autocast, cosine schedule, a checkpoint every ``save_steps`` (the resume
    point), per-step logging."""
    from mocae.device import resolve

    return dict(
        output_dir=str(output_dir),
        use_cpu=resolve().type == "cpu",
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_length,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=not progress,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def sft_config(cfg: ExpertConfig, output_dir: Path, progress: bool = True):
    """trl SFTConfig for ``cfg``: CPU, bf16 autocast, packing, frequent checkpoints."""
    from trl import SFTConfig

    return SFTConfig(
        **trainer_args(cfg, output_dir, progress),
        packing=cfg.packing,
        packing_strategy="bfd",
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        completion_only_loss=True,
    )


def _expert_trainer_class():
    """SFTTrainer with the model's own masked loss instead of trl's fused LM head.

    trl 1.16 scores every position with a tiled LM-head kernel and recomputes it in backward,
    and logs entropy/accuracy per step; on CPU that costs ~3x. The loss is the same token-mean
    cross-entropy over completion tokens (labels are -100 on the prompt and padding).
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class ExpertTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "completion_mask"}
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return ExpertTrainer


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_expert(
    cfg: ExpertConfig,
    root: Path | None = None,
    data_dir: Path | None = None,
    progress: bool = True,
    model_and_tokenizer=None,
    callbacks: list | None = None,
) -> Path:
    """Train (or reuse) the expert described by ``cfg``.

    Args:
        cfg: the expert's config.
        root: experts root (default ``$MOCAE_CACHE/experts``).
        data_dir: dataset directory (default ``$MOCAE_DATA_DIR``, else the Hub).
        progress: show progress bars.
        model_and_tokenizer: an already loaded ``(model, tokenizer)`` of ``cfg.backbone``.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Returns:
        The expert's adapter folder.

    Raises:
        LoadError: a finished expert in the cache is damaged (the message says how to retrain it).
    """
    if getattr(cfg, "trainer", "sft") == "dpo":  # preference-trained expert (issue 14): mocae.experts.dpo
        from mocae.experts.dpo import train_dpo_expert

        return train_dpo_expert(cfg, root=root, data_dir=data_dir, progress=progress,
                                model_and_tokenizer=model_and_tokenizer, callbacks=callbacks)
    from datasets import Dataset

    from mocae.backbones import load_backbone

    inputs = expert_inputs(cfg, data_dir)
    out = expert_dir(cfg, root, data_dir)
    if is_trained(out):
        # Reused, so checked: a damaged or foreign adapter is reported by the stage that owns it.
        check_adapter(out, cfg.backbone, cfg.axis)
        return out
    examples = select_examples(cfg, data_dir)
    rows = to_sft_rows(examples, cfg.axis, cfg.inject_prompt)
    model, tokenizer = model_and_tokenizer or load_backbone(cfg.backbone)
    # Training pads on the right; generation elsewhere pads on the left.
    tokenizer = _right_padded(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_config.json").write_text(cfg.model_dump_json(indent=2))
    checkpoints = out / "checkpoints"
    resume_from = latest_checkpoint(checkpoints)

    torch.manual_seed(cfg.seed)
    trainer = _expert_trainer_class()(
        model=model, args=sft_config(cfg, checkpoints, progress), processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows), peft_config=lora_config(cfg), callbacks=callbacks,
    )
    tokens_before = _tokens_seen(resume_from)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen - tokens_before

    with main_process_writes(trainer) as main:
        if main:
            _write_expert(trainer, cfg, out, inputs, examples, resume_from, tokens, wall)
    return out


def _write_expert(trainer, cfg, out: Path, inputs: dict, examples, resume_from, tokens: int, wall: float) -> None:
    """The adapter, ``stage.json`` and ``training.json`` (last: its presence means finished)."""
    trainer.model.save_pretrained(out)
    record = {
        "axis": cfg.axis,
        "backbone": cfg.backbone,
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "key": stage_key(inputs),
        "inputs": inputs,
        "data": {"examples": len(examples), "by_source": data_counts(examples),
                 "packed_rows": len(trainer.train_dataset)},
        "steps": trainer.state.global_step,
        "loss_curve": [
            {"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h
        ],
        "tokens_trained": int(trainer.state.num_input_tokens_seen),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "wall_time_s": round(wall, 1),
        "resumed_from": resume_from.name if resume_from else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_stage(out, f"experts/{cfg.axis}", stage_key(inputs), inputs)
    atomic_write_json(out / TRAINING_FILE, record)  # last: its presence means finished
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


@contextlib.contextmanager
def main_process_writes(trainer):
    """Yields True on the process that writes a trained expert (the only one, or the main one of an
    ``accelerate launch``); every rank leaves the block only once that process has written it."""
    try:
        yield trainer.accelerator.is_main_process
    finally:
        trainer.accelerator.wait_for_everyone()


def _right_padded(tokenizer):
    import copy

    tok = copy.copy(tokenizer)
    tok.padding_side = "right"
    return tok


def _tokens_seen(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    state = read_json(checkpoint / "trainer_state.json", f"rm -r {checkpoint} (training resumes from the one before)")
    return int(state.get("num_input_tokens_seen", 0))

