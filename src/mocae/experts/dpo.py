"""Train one per-axis LoRA expert on preference pairs with trl's DPOTrainer, resumably.

Same folder, cache and resume rules as the SFT experts (``mocae.experts.train``): the expert is
a plain peft adapter folder in ``expert_dir(cfg)`` plus ``training.json`` (written last: its
presence means "finished"); checkpoints go to ``checkpoints/`` every ``save_steps`` and an
interrupted run resumes from the newest complete one.

The reference model is the base model itself: the LoRA is created by the trainer from
``peft_config``, so trl computes reference log-probabilities with the adapter disabled (no second
model in memory). With ``dpo_init: sft_twin`` the LoRA starts from the SFT twin's adapter instead
(SFT then DPO) and the twin is the reference: trl copies the starting adapter to a frozen "ref".
trl names the trained adapter "default"; only it is saved, as a root-level adapter, so
``PeftModel.from_pretrained(base, path, adapter_name=<axis>)`` loads it under the expert's name.

``rpo_alpha`` adds trl's "sft" loss term (mean NLL of the chosen answer) with that weight: trl
1.16 has no ``rpo_alpha`` argument; ``loss_type=["sigmoid", "sft"]`` with
``loss_weights=[1, rpo_alpha]`` is the same objective.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from mocae.config import config_hash
from mocae.data import inject_axis_prompt
from mocae.experts.config import ExpertConfig
from mocae.experts.preference import pair_counts, preference_rows
from mocae.experts.checks import check_adapter
from mocae.experts.train import (TRAINING_FILE, _peak_rss_mb, _right_padded, _tokens_seen, expert_dir, expert_inputs,
                                 is_trained, latest_checkpoint, lora_config, main_process_writes, train_expert,
                                 trainer_args)
from mocae.stages import stage_key, write_stage
from mocae.paths import atomic_write_json

TRAINER = "dpo"


def dpo_config(cfg: ExpertConfig, output_dir: Path, progress: bool = True):
    """trl DPOConfig for ``cfg``: device and bf16 autocast as the SFT experts, frequent checkpoints."""
    from trl import DPOConfig

    loss_type, loss_weights = (["sigmoid"], None) if cfg.rpo_alpha is None else \
        (["sigmoid", "sft"], [1.0, float(cfg.rpo_alpha)])
    return DPOConfig(
        **trainer_args(cfg, output_dir, progress),  # gradient_checkpointing: trl defaults it to True
        beta=cfg.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
    )


def to_dpo_rows(rows: list[dict], inject_prompt: bool) -> list[dict]:
    """Conversational prompt/chosen/rejected rows; trl applies the chat template as SFT does.

    The injected instruction (AlignX) goes in the user turn, as in ``experts.dataset.to_sft_rows``.
    """
    out = []
    for r in rows:
        prompt = inject_axis_prompt(r["prompt"], r["axis"]) if inject_prompt else r["prompt"]
        out.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        })
    return out


def train_dpo_expert(
    cfg: ExpertConfig,
    root: Path | None = None,
    data_dir: Path | None = None,
    progress: bool = True,
    model_and_tokenizer=None,
    callbacks: list | None = None,
) -> Path:
    """Train (or reuse) the DPO expert described by ``cfg`` (``cfg.trainer == "dpo"``).

    Args: as ``mocae.experts.train.train_expert``.

    Returns:
        The expert's adapter folder.

    Raises:
        ValueError: ``cfg.trainer`` is not "dpo", no pairs, or an eval-side prompt reached a builder.
    """
    from datasets import Dataset
    from trl import DPOTrainer

    from mocae.backbones import load_backbone

    if cfg.trainer != TRAINER:
        raise ValueError(f"train_dpo_expert needs trainer 'dpo', got {cfg.trainer!r}")
    inputs = expert_inputs(cfg, data_dir)
    out = expert_dir(cfg, root, data_dir)
    if is_trained(out):
        check_adapter(out, cfg.backbone, cfg.axis)  # reused, so checked (as SFT experts are)
        return out
    model, tokenizer = model_and_tokenizer or load_backbone(cfg.backbone)
    # Before the LoRA exists: the harmless pairs need the base model's own answers (cached).
    rows = preference_rows(cfg, data_dir, root=root, model_and_tokenizer=(model, tokenizer), progress=progress)
    twin = train_expert(cfg.sft_twin(), root=root, data_dir=data_dir, progress=progress) if cfg.uses_twin() else None
    peft_config = lora_config(cfg)
    if cfg.dpo_init == "sft_twin":
        from peft import PeftModel

        # SFT then DPO: the twin's adapter is the trainable "default"; trl copies it to a frozen "ref"
        # adapter and scores the reference with it (the twin, not the base model).
        model, peft_config = PeftModel.from_pretrained(model, str(twin), is_trainable=True), None
    tokenizer = _right_padded(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expert_config.json").write_text(cfg.model_dump_json(indent=2))
    checkpoints = out / "checkpoints"
    resume_from = latest_checkpoint(checkpoints)

    torch.manual_seed(cfg.seed)
    trainer = DPOTrainer(
        model=model, args=dpo_config(cfg, checkpoints, progress), processing_class=tokenizer,
        train_dataset=Dataset.from_list(to_dpo_rows(rows, cfg.inject_prompt)), peft_config=peft_config,
        callbacks=callbacks,
    )
    tokens_before = _tokens_seen(resume_from)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    with main_process_writes(trainer) as main:  # data-parallel: one process writes the expert
        if main:
            _write_expert(trainer, cfg, out, inputs, rows, resume_from, tokens, wall, twin.name if twin else None)
    return out


def _write_expert(trainer, cfg, out: Path, inputs: dict, rows, resume_from, tokens: int, wall: float,
                  twin: str | None = None) -> None:
    """The adapter, ``stage.json`` and ``training.json`` (last: its presence means finished)."""
    trainer.model.save_pretrained(out, selected_adapters=["default"])
    history = trainer.state.log_history
    steps = [h for h in history if "loss" in h and "step" in h]
    record = {
        "axis": cfg.axis,
        "backbone": cfg.backbone,
        "trainer": TRAINER,
        "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg),
        "key": stage_key(inputs),
        "inputs": inputs,
        "beta": cfg.beta,
        "rpo_alpha": cfg.rpo_alpha,
        "harmless_chosen": cfg.harmless_chosen if cfg.axis == "harmless" else None,
        "dpo_init": cfg.dpo_init,
        "sft_twin": twin,  # the SFT expert whose answers made the pairs or that DPO started from, if any
        "data": {"pairs": len(rows), "by_source": pair_counts(rows), "preference_sources": cfg.pair_sources(),
                 "pairs_trained": len(trainer.train_dataset)},
        "steps": trainer.state.global_step,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in steps],
        "reward_accuracy_curve": [{"step": h["step"], "accuracy": h["rewards/accuracies"]}
                                  for h in steps if "rewards/accuracies" in h],
        "reward_margin_curve": [{"step": h["step"], "margin": h["rewards/margins"]}
                                for h in steps if "rewards/margins" in h],
        "final_reward_accuracy": _tail_mean([h["rewards/accuracies"] for h in steps if "rewards/accuracies" in h]),
        # the keys the pipeline's experts.json copies from every expert's record (as SFT writes them)
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


def _tail_mean(values: list[float], n: int = 10) -> float | None:
    """Mean of the last ``n`` logged values (a single step's batch accuracy is noisy)."""
    tail = values[-n:]
    return round(sum(tail) / len(tail), 4) if tail else None

