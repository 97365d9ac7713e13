"""ExpertConfig: everything that determines one per-axis LoRA expert (and so its cache key)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Preference pairs each axis can train on with trainer "dpo" (``mocae.experts.preference``). The
# first listed are the defaults. On-policy helpful pairs (the base model's samples ranked by a
# scorer that is not the evaluation judge) are the planned extension: add "on_policy" here and a
# builder in preference.py.
PREFERENCE_SOURCES: dict[str, tuple[str, ...]] = {
    "helpful": ("alpaca_eval_gpt4",),
    "harmless": ("refusal_over_compliance", "answer_over_refusal"),
    "honest": ("truthfulqa",),
}
# Fields that only matter when trainer == "dpo". They are left out of an SFT config's dump, so an
# SFT expert's config hash (its cache key) is what it was before DPO existed.
DPO_FIELDS = ("trainer", "beta", "rpo_alpha", "preference_sources", "max_pairs", "pairs_per_question",
              "base_answer_tokens", "harmless_chosen", "dpo_init", "twin_learning_rate")
# DPO fields added after DPO experts were trained and cached: dumped only when the SFT twin is used.
TWIN_FIELDS = ("harmless_chosen", "dpo_init", "twin_learning_rate")


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

    # preference training (trainer "dpo"; DESIGN.md section 4). learning_rate, epochs, batch_size,
    # max_length and the LoRA shape above apply to it too; max_examples and packing do not.
    trainer: Literal["sft", "dpo"] = Field(
        "sft",
        description="'sft': trl SFTTrainer on prompt/completion rows; 'dpo': trl DPOTrainer on preference "
                    "pairs (mocae.experts.preference) with the base model (adapter off) as reference",
    )
    beta: float = Field(0.1, gt=0, le=10, description="dpo only: DPO beta (higher = stay closer to the base)")
    rpo_alpha: float | None = Field(
        None, gt=0, le=100,
        description="dpo only: weight of an SFT (NLL) term on the chosen answer (RPO; trl 1.16's 'sft' loss "
                    "term). None = plain DPO, the measured honest recipe. DESIGN.md: harmless DPO without it "
                    "degenerated (off-policy chosen answers); set e.g. 1.0 there",
    )
    preference_sources: list[str] | None = Field(
        None,
        description="dpo only: which pairs to build, per axis (None = all of the axis): helpful "
                    "'alpaca_eval_gpt4' (GPT-4's AlpacaEval judgements on judge-train instructions, winner over "
                    "loser); honest 'truthfulqa' (training-half correct over incorrect answers); harmless "
                    "'refusal_over_compliance' (a refusal over the base model's compliant answer on harmful "
                    "training prompts) and 'answer_over_refusal' (the base model's answer over a refusal on "
                    "benign_sources prompts; benign_fraction sets their share)",
    )
    max_pairs: int | None = Field(2000, gt=0, description="dpo only: cap on preference pairs (None = all)")
    pairs_per_question: int = Field(
        3, gt=0, le=50, description="dpo, honest only: correct/incorrect pairs per TruthfulQA question at most")
    base_answer_tokens: int = Field(
        128, gt=0, le=2048,
        description="dpo, harmless only: max new tokens of the base model's own (greedy, cached) answers")
    harmless_chosen: Literal["dataset", "sft_twin"] = Field(
        "dataset",
        description="dpo, harmless only: where the refusals come from. 'dataset': safety-tuned-llamas' written "
                    "refusal is chosen on harmful prompts and a generic refusal rejected on benign ones (off-policy: "
                    "measured to leave this backbone's refusals unchanged). 'sft_twin': the greedy answers of this "
                    "expert's SFT twin (`sft_twin()`, trained first, cached): its refusal is chosen on harmful "
                    "prompts (prompts it answers make no pair) and its refusal is rejected on benign ones where it "
                    "refuses them (its over-refusals), so both sides are in the model's own words (DESIGN section 4)",
    )
    dpo_init: Literal["zero", "sft_twin"] = Field(
        "zero",
        description="dpo only: 'zero': a fresh LoRA, with the base model (adapter off) as the DPO reference; "
                    "'sft_twin': SFT then DPO, the usual pipeline: the LoRA starts from the SFT twin's adapter "
                    "and the twin is the reference (trl keeps a frozen 'ref' copy), so DPO edits what SFT learned "
                    "(e.g. pushes down the SFT harmless expert's refusals of benign prompts) instead of starting over",
    )
    twin_learning_rate: float = Field(
        2e-4, gt=0, description="dpo with the SFT twin (harmless_chosen or dpo_init 'sft_twin') only: the twin's "
                                "learning rate (the DPO learning rate is usually far lower than SFT's)")

    @model_validator(mode="after")
    def _check_layers(self):
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError("layers must be non-negative indices")
        return self

    @model_validator(mode="after")
    def _check_dpo(self):
        if self.trainer != "dpo":
            defaults = type(self).model_fields
            set_knobs = [k for k in DPO_FIELDS[1:] if getattr(self, k) != defaults[k].get_default(call_default_factory=True)]
            if set_knobs:
                raise ValueError(f"{', '.join(set_knobs)} only apply when trainer is 'dpo' (trainer is {self.trainer!r})")
            return self
        if self.packing:
            raise ValueError("packing is SFT only: DPO batches chosen/rejected pairs (set packing: false)")
        if self.harmless_chosen != "dataset" and self.axis != "harmless":
            raise ValueError(f"harmless_chosen applies to the harmless axis only (axis is {self.axis!r})")
        if not self.uses_twin() and self.twin_learning_rate != type(self).model_fields["twin_learning_rate"].default:
            raise ValueError("twin_learning_rate only applies when harmless_chosen or dpo_init is 'sft_twin'")
        if self.preference_sources is not None:
            allowed = PREFERENCE_SOURCES.get(self.axis, ())
            unknown = [s for s in self.preference_sources if s not in allowed]
            if unknown or not self.preference_sources or len(set(self.preference_sources)) != len(self.preference_sources):
                raise ValueError(f"preference_sources for axis {self.axis!r} must be a non-empty list of distinct "
                                 f"names from {list(allowed)}, got {self.preference_sources}")
        return self

    def pair_sources(self) -> list[str]:
        """The preference sources this (dpo) expert trains on: ``preference_sources`` or all of its axis."""
        return list(self.preference_sources) if self.preference_sources is not None \
            else list(PREFERENCE_SOURCES.get(self.axis, ()))

    def uses_twin(self) -> bool:
        """True when this (dpo) expert reads its SFT twin: for its refusals or as its starting point."""
        return self.trainer == "dpo" and "sft_twin" in (self.harmless_chosen, self.dpo_init)

    def sft_twin(self) -> ExpertConfig:
        """The SFT expert on this config's data and LoRA shape (trainer 'sft', ``twin_learning_rate``).

        A DPO expert with ``harmless_chosen='sft_twin'`` takes its refusals from the twin's answers. With
        the DPO-only fields dropped, the twin is the SFT expert a preset with the same fields trains
        (same cache key), so a run that has one does not train it again.
        """
        data = self.model_dump()
        for key in DPO_FIELDS:
            data.pop(key, None)
        return ExpertConfig(**{**data, "learning_rate": self.twin_learning_rate})

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if not isinstance(data, dict):
            return data
        if self.trainer == "sft":  # SFT cache keys stay as before DPO existed
            for key in DPO_FIELDS:
                data.pop(key, None)
        elif not self.uses_twin():  # DPO cache keys stay as before the SFT twin existed
            for key in TWIN_FIELDS:
                data.pop(key, None)
        return data


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
        if self.trainer != "sft":
            raise ValueError("the multi-task baseline is SFT only: set trainer 'dpo' per axis, not for multitask")
        return self

    def axis_config(self, axis: str) -> ExpertConfig:
        """The config of the ``axis`` expert whose training set this run includes."""
        fields = self.model_dump(exclude={"union_caps", "axis", "max_examples"})
        return ExpertConfig(**fields, axis=axis, max_examples=self.union_caps[axis])
