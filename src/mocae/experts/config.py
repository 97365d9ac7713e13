"""ExpertConfig: everything that determines one per-axis LoRA expert (and so its cache key)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ExpertConfig(BaseModel):
    """One expert's data, LoRA shape and optimisation settings."""

    model_config = ConfigDict(extra="forbid")

    axis: Literal["helpful", "harmless", "honest"] = Field(description="which HHH axis this expert learns")
    backbone: str = Field("smollm2-135m", description="backbone name (`mocae backbones`), HF id or path")

    # LoRA shape (DESIGN.md section 4 defaults)
    rank: int = Field(8, gt=0, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="LoRA dropout; 0 by default because on CPU a 0.05 dropout costs ~30% of training speed",
    )
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR),
                                      description="module names that get LoRA")
    layers: list[int] | None = Field(None, description="layer indices to adapt (None = all)")

    # data
    max_examples: int | None = Field(2000, gt=0, description="cap on training examples (None = all)")
    benign_fraction: float = Field(
        0.3, ge=0, lt=1,
        description="harmless axis only: share of benign Alpaca instructions mixed with refusals so "
                    "the expert learns when to refuse, not to refuse everything",
    )
    benign_sources: list[Literal["alpaca", "alpaca_nearest", "truthfulqa"]] = Field(
        default_factory=lambda: ["alpaca"],
        description="harmless axis only: where the benign share comes from, split equally: 'alpaca' "
                    "(random Alpaca rows), 'alpaca_nearest' (the Alpaca rows whose MiniLM embedding is "
                    "closest to the refusal prompts: benign requests on sensitive topics), 'truthfulqa' "
                    "(training-half TruthfulQA questions with their best answer: benign questions that "
                    "sound risky, in the question form users write)",
    )
    inject_prompt: bool = Field(False, description="AlignX: prepend the axis instruction while training")
    max_length: int = Field(256, gt=8, description="tokens per example (prompt + completion) at most")

    # optimisation
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0, description="examples (or packed rows) per step")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0

    # speed (measured on CPU: benchmarks/train_speed.py)
    bf16: bool = Field(True, description="bf16 autocast (weights stay fp32); ~2.5x faster on CPU")
    packing: bool = Field(
        False,
        description="best-fit packing into max_length rows; off by default because on CPU the "
                    "block-diagonal mask it needs costs more than the padding it saves",
    )
    group_by_length: bool = Field(True, description="batch examples of similar length (little padding)")
    gradient_checkpointing: bool = Field(False, description="trade ~25% speed for activation memory")
    save_steps: int = Field(20, gt=0, description="checkpoint every N optimiser steps (resume point)")

    @model_validator(mode="after")
    def _check_layers(self):
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError("layers must be non-negative indices")
        return self


class MultitaskConfig(ExpertConfig):
    """The multi-task SFT baseline: one LoRA on the union of the three experts' training sets.

    A subclass (not a new ExpertConfig field) so the per-axis experts' cache keys stay as they were.
    """

    axis: Literal["multitask"] = Field("multitask", description="always 'multitask'")
    union_caps: dict[str, int | None] = Field(
        default_factory=lambda: {"helpful": 2000, "harmless": 2000, "honest": None},
        description="max_examples of each axis' expert: the union of exactly their training sets")

    @model_validator(mode="after")
    def _check_caps(self):
        unknown = set(self.union_caps) - {"helpful", "harmless", "honest"}
        if unknown or not self.union_caps:
            raise ValueError(f"union_caps keys must be helpful/harmless/honest, got {sorted(self.union_caps)}")
        return self

    def axis_config(self, axis: str) -> ExpertConfig:
        """The config of the ``axis`` expert whose training set this run includes."""
        fields = self.model_dump(exclude={"union_caps", "axis", "max_examples"})
        return ExpertConfig(**fields, axis=axis, max_examples=self.union_caps[axis])
