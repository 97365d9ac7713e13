"""``mocae run``: the whole method as one resumable command.

Stages, each cached so that an interrupted run continues where it stopped:
1. experts: one LoRA expert per axis (reused from ``$MOCAE_CACHE/experts`` when the same
   config was trained before; a half-trained expert resumes from its last checkpoint);
2. mocae: the Mixture of Calibrated Experts: router trained on held-out axis-labelled prompts,
   calibrators fitted on a split the router never saw, saved with ``save_pretrained``;
3. sanity: the base model, each expert and MoCaE on held-out prompts of every axis
   (string-match refusal on harmful and on safe XSTest prompts, TruthfulQA MC1/MC2 on the
   eval half, reference NLL on AlpacaEval).

The run directory (default ``runs/<preset>-<config hash>``) holds the resolved config, one
JSON per finished stage and ``summary.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mocae import AXES
from mocae.config import config_hash, load_config, resolve_preset
from mocae.experts.config import ExpertConfig
from mocae.mixture.fit import RouterFitConfig
from mocae.paths import atomic_write_json, atomic_write_text


class ExpertsSection(BaseModel):
    """Expert settings: ``all`` applies to every axis, then each axis' own overrides."""

    model_config = ConfigDict(extra="forbid")
    all: dict = Field(default_factory=dict, description="ExpertConfig fields shared by all axes")
    helpful: dict = Field(default_factory=dict)
    harmless: dict = Field(default_factory=dict)
    honest: dict = Field(default_factory=dict)


class SanityConfig(BaseModel):
    """Held-out prompts per axis for the quick per-expert sanity table."""

    model_config = ConfigDict(extra="forbid")
    n_harmful: int = Field(40, gt=0, description="HarmBench test prompts (standard behaviours)")
    n_xstest_safe: int = Field(40, gt=0, description="safe XSTest prompts (over-refusal)")
    n_truthfulqa: int = Field(40, gt=0, description="TruthfulQA eval-half questions for MC1/MC2")
    max_new_tokens: int = Field(48, gt=0, description="answer budget; refusals show in the first words")
    batch_size: int = Field(16, gt=0)


class RunConfig(BaseModel):
    """A preset: what ``mocae run`` trains and evaluates."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="preset name, used in the run directory")
    backbone: str = Field("smollm2-135m", description="backbone for every stage")
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    router: RouterFitConfig = Field(default_factory=RouterFitConfig)
    router_input: Literal["embedding", "hidden"] = Field("embedding", description="sequence router input")
    feature_layer: int | None = Field(None, description="hidden router input: pooled layer (None = middle)")
    sanity: SanityConfig = Field(default_factory=SanityConfig)

    def expert_configs(self) -> dict[str, ExpertConfig]:
        """One validated ExpertConfig per axis."""
        from mocae.config import validate_config

        return {
            axis: validate_config(
                ExpertConfig,
                {"backbone": self.backbone, **self.experts.all, **getattr(self.experts, axis), "axis": axis},
                source=f"preset {self.name!r}, experts.{axis}",
            )
            for axis in AXES
        }


    def multitask_config(self):
        """The multi-task SFT baseline: the shared expert settings on the union of the experts' data."""
        from mocae.config import validate_config
        from mocae.experts.config import MultitaskConfig

        experts = self.expert_configs()
        return validate_config(MultitaskConfig, {
            "backbone": self.backbone, **self.experts.all,
            "benign_fraction": experts["harmless"].benign_fraction,
            "union_caps": {a: c.max_examples for a, c in experts.items()},
        }, source=f"preset {self.name!r}, multitask")


def load_run_config(preset: str | Path) -> RunConfig:
    """Load a preset by name (``configs/<name>.yaml``) or path."""
    return load_config(RunConfig, resolve_preset(preset))


def train_experts(cfg: RunConfig, progress: bool = True) -> dict[str, Path]:
    """Stage 1: train or reuse the three experts. Returns their adapter folders by axis."""
    from mocae.experts.train import train_expert

    paths = {}
    for axis, expert_cfg in cfg.expert_configs().items():
        print(f"[experts] {axis}: {expert_cfg.max_examples} examples max, rank {expert_cfg.rank}", flush=True)
        paths[axis] = train_expert(expert_cfg, progress=progress)
    return paths


def build_mocae(cfg: RunConfig, experts: dict[str, Path], run_dir: Path, progress: bool = True) -> Path:
    """Stage 2: fit the router and calibrators on the experts; save to ``run_dir/mocae``."""
    from mocae.mixture.fit import fit_router, format_calibration_table
    from mocae.mixture.model import MoCaEConfig, MoCaEModel

    out = run_dir / "mocae"
    if (out / "mocae_config.json").is_file() and (run_dir / "router_calibration.json").is_file():
        return out
    print("[mocae] fitting the router and calibrators", flush=True)
    model = MoCaEModel.build(MoCaEConfig(
        backbone=cfg.backbone, experts={a: str(p) for a, p in experts.items()},
        router_input=cfg.router_input, feature_layer=cfg.feature_layer))
    report = fit_router(model, cfg.router, cache=run_dir / "features", progress=progress, plot_dir=run_dir)
    model.save_pretrained(out)
    atomic_write_json(run_dir / "router_calibration.json", report)
    print(format_calibration_table(report), flush=True)
    return out


def run_pipeline(preset: str | Path = "quick", run_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run (or continue) a preset end to end.

    Returns:
        The run directory.
    """
    from mocae.evaluation.sanity import evaluate_experts, format_sanity_table

    cfg = load_run_config(preset)
    run_dir = Path(run_dir or Path("runs") / f"{cfg.name}-{config_hash(cfg)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    start = time.time()

    experts = train_experts(cfg, progress)
    expert_records = {a: json.loads((p / "training.json").read_text()) for a, p in experts.items()}
    atomic_write_json(run_dir / "experts.json", {
        a: {"path": str(p), **{k: expert_records[a][k] for k in
                               ("data", "steps", "tokens_per_s", "wall_time_s", "peak_rss_mb")}}
        for a, p in experts.items()
    })

    mocae_dir = build_mocae(cfg, experts, run_dir, progress)
    calibration = json.loads((run_dir / "router_calibration.json").read_text())

    sanity = evaluate_experts(cfg.backbone, experts, cfg.sanity, cache=run_dir / "sanity",
                              progress=progress, mocae_dir=mocae_dir)
    atomic_write_json(run_dir / "sanity.json", sanity)
    from mocae.mixture.fit import format_calibration_table

    table = format_sanity_table(sanity)
    atomic_write_text(run_dir / "summary.md", f"# mocae run: {cfg.name}\n\n{table}\n\n"
                      f"## Router calibration\n\n{format_calibration_table(calibration)}\n")
    print(f"\n{table}\n\nrun directory: {run_dir}  ({time.time() - start:.0f} s)")
    return run_dir
