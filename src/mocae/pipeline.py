"""``mocae run``: the whole method and its baselines as one resumable command.

Stages, each cached so that an interrupted run continues where it stopped:
1. experts: one LoRA expert per axis, plus the multi-task expert when listed (reused from
   ``$MOCAE_CACHE/experts`` for the same config; a half-trained one resumes from its checkpoint);
2. mocae: the router trained on held-out axis-labelled prompts, calibrators fitted on a split
   the router never saw, saved with ``save_pretrained``;
3. baselines: the H3Fusion router, the X-LoRA classifier and MoTE trained on the experts' data
   (merges and Arrow need no training and are built when evaluated);
4. eval: every system through the evaluation harness (finished systems are cached), the oracle
   composed from the single experts, efficiency per system in a child process of its own;
5. report: ``results.json``/``results.md``/plots in ``eval/``, ``summary.md``, the table printed.

The run directory (default ``runs/<preset>-<config hash>``) holds the resolved config, one
JSON per finished stage and the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mocae import AXES
from mocae.config import config_hash, load_config, resolve_preset
from mocae.evaluation.harness import EvalConfig
from mocae.experts.config import ExpertConfig
from mocae.mixture.fit import RouterFitConfig
from mocae.paths import atomic_write_json, atomic_write_text
from mocae.systems import SYSTEMS, BaselinesConfig, SystemName


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


class EfficiencySection(BaseModel):
    """Speed and memory per system, each in a fresh child process (its peak RSS is its own)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="measure decode speed and memory per system")
    batch_sizes: list[int] = Field([1], description="batch sizes to time")
    new_tokens: int = Field(32, gt=0, description="tokens decoded per timed run")
    repeats: int = Field(2, gt=0, description="timed runs per batch size (best reported, range beside it)")
    threads: int | None = Field(None, description="torch threads in the child (None: torch's default)")
    n_prompts: int = Field(8, gt=0, description="AlpacaEval instructions used as timing prompts")


class RunConfig(BaseModel):
    """A preset: what ``mocae run`` trains and evaluates."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="preset name, used in the run directory")
    backbone: str = Field("smollm2-135m", description="backbone for every stage")
    experts: ExpertsSection = Field(default_factory=ExpertsSection)
    router: RouterFitConfig = Field(default_factory=RouterFitConfig)
    router_input: Literal["embedding", "hidden"] = Field("embedding", description="sequence router input")
    feature_layer: int | None = Field(None, description="hidden router input: pooled layer (None = middle)")
    systems: list[SystemName] = Field(
        ["base", "expert_helpful", "expert_harmless", "expert_honest", "task_arithmetic", "mocae"],
        description=f"systems to build and evaluate, of: {', '.join(SYSTEMS)}")
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="what the harness measures (mocae eval)")
    efficiency: EfficiencySection = Field(default_factory=lambda: EfficiencySection())
    sanity: SanityConfig | None = Field(None, description="optional judge-free per-expert sanity table")

    @model_validator(mode="before")
    @classmethod
    def _in_process_efficiency_off(cls, data):
        # The harness' in-process efficiency would report one process' high-water RSS for all.
        if isinstance(data, dict) and isinstance(data.get("eval", {}), dict):
            data = {**data, "eval": {"efficiency": False, **data.get("eval", {})}}
        return data

    @model_validator(mode="after")
    def _check_systems(self):
        if len(set(self.systems)) != len(self.systems):
            raise ValueError("systems lists a system twice")
        if "oracle" in self.systems and not {f"expert_{a}" for a in AXES} <= set(self.systems):
            raise ValueError("'oracle' is composed from the single experts: list expert_helpful, "
                             "expert_harmless and expert_honest too")
        if self.eval.efficiency:
            raise ValueError("eval.efficiency must be false in a run: efficiency is measured per system in a "
                             "child process (the `efficiency` section)")
        return self

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
            "benign_sources": experts["harmless"].benign_sources,
            "union_caps": {a: c.max_examples for a, c in experts.items()},
        }, source=f"preset {self.name!r}, multitask")


def load_run_config(preset: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset by name (``configs/<name>.yaml``) or path, with ``key.path=value`` overrides."""
    return load_config(RunConfig, resolve_preset(preset), overrides)


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


def train_baselines(cfg: RunConfig, run, progress: bool = True) -> None:
    """Stage 3: train the fusion stages of the routed baselines the run lists."""
    from mocae.systems import TRAINED, fusion_examples, train_fusion

    names = [n for n in cfg.systems if n in TRAINED]
    if not names:
        return
    examples = {}  # by examples per axis: H3Fusion and X-LoRA share one selection
    for name in names:
        n = cfg.baselines.mote.examples_per_axis if name == "mote" else cfg.baselines.fusion_examples_per_axis
        if n not in examples:
            examples[n] = fusion_examples(cfg.expert_configs(), n)
        train_fusion(name, run, examples[n], progress)


def measure_systems(cfg: RunConfig, run_dir: Path, prompts: list[str]) -> dict:
    """Stage 4b: efficiency of each system in its own child process, cached per system."""
    from mocae.systems import measure_isolated

    out = {}
    key = config_hash(cfg.efficiency)
    for name in cfg.systems:
        if name == "oracle":
            continue
        cached = run_dir / "efficiency" / f"{name}-{key}.json"
        if not cached.is_file():
            print(f"[efficiency] {name}", flush=True)
            e = cfg.efficiency
            atomic_write_json(cached, measure_isolated(name, run_dir, prompts, e.batch_sizes, e.new_tokens,
                                                       e.repeats, e.threads))
        out[name] = json.loads(cached.read_text())
    return out


def relative_change(results: dict, system: str = "mocae", reference: str = "base") -> dict:
    """Change of ``system`` over ``reference`` on every metric of the three axes.

    Returns:
        {"axis/metric": {"reference", "system", "absolute", "relative_pct", "better"}}; relative_pct
        is None when the reference is 0; lower-is-better metrics (over-refusal, reference NLL)
        count a decrease as better.
    """
    lower_better = ("over_refusal", "reference_nll")
    out = {}
    systems = results["systems"]
    if system not in systems or reference not in systems:
        return out
    for axis in ("helpful", "harmless", "honest"):
        mine, theirs = systems[system]["metrics"].get(axis, {}), systems[reference]["metrics"].get(axis, {})
        for name, metric in mine.items():
            if name not in theirs or "value" not in metric or name == "output_length_chars":
                continue
            a, b = theirs[name]["value"], metric["value"]
            better = b < a if name.startswith(lower_better) else b > a
            out[f"{axis}/{name}"] = {"reference": a, "system": b, "absolute": round(b - a, 4),
                                     "relative_pct": round((b - a) / abs(a) * 100, 2) if a else None,
                                     "better": better if a != b else None}
    return out


def evaluate_run(cfg: RunConfig, run, run_dir: Path, progress: bool = True) -> dict:
    """Stage 4 + 5: every system through the harness, the oracle, efficiency; writes the report."""
    from mocae.evaluation.efficiency import efficiency_metrics
    from mocae.evaluation.harness import eval_prompts, evaluate
    from mocae.evaluation.report import write_results
    from mocae.systems import load_system, oracle_result

    loaders = {name: (lambda name=name: load_system(name, run)) for name in cfg.systems if name != "oracle"}
    out = run_dir / "eval"
    results = evaluate(loaders, cfg.eval, out, progress=progress)
    if "oracle" in cfg.systems:
        results["systems"]["oracle"] = oracle_result(results)
    if cfg.efficiency.enabled:
        prompts = [e.prompt for e in eval_prompts(cfg.eval)["alpaca_eval"][:cfg.efficiency.n_prompts]]
        for name, measured in measure_systems(cfg, run_dir, prompts).items():
            system = results["systems"][name]
            system["efficiency"] = measured
            system["metrics"]["efficiency"] = {**efficiency_metrics(measured), **{
                k: {"value": measured[k], "n": 1, "ci": [measured[k], measured[k]]}
                for k in ("weights_mb", "rss_after_load_mb")}}
    results["systems"] = {n: results["systems"][n] for n in cfg.systems}  # the preset's order
    results["relative_change_mocae_vs_base_pct"] = relative_change(results)
    results["paths"] = write_results(results, out)
    return results


def run_pipeline(preset: str | Path = "quick", run_dir: str | Path | None = None, progress: bool = True,
                 overrides: list[str] | None = None) -> Path:
    """Run (or continue) a preset end to end.

    Args:
        overrides: ``key.path=value`` strings applied to the preset (they change the run's hash).

    Returns:
        The run directory.
    """
    from mocae.evaluation.report import format_results_table
    from mocae.experts.train import train_expert
    from mocae.mixture.fit import format_calibration_table
    from mocae.systems import RunSystems

    cfg = load_run_config(preset, overrides)
    from mocae.data.contamination import ensure_clean

    ensure_clean()  # nothing trains before the data is proven clean (cached by the files' fingerprint)
    run_dir = Path(run_dir or Path("runs") / f"{cfg.name}-{config_hash(cfg)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    start = time.time()

    experts = train_experts(cfg, progress)
    multitask = None
    if "multitask" in cfg.systems:
        print("[experts] multitask: the union of the three training sets", flush=True)
        multitask = train_expert(cfg.multitask_config(), progress=progress)
    else:  # record a trained one anyway: runs sharing this directory may list it
        from mocae.experts.train import expert_dir, is_trained

        found = expert_dir(cfg.multitask_config())
        multitask = found if is_trained(found) else None
    trained = {**experts, **({"multitask": multitask} if multitask else {})}
    records = {a: json.loads((p / "training.json").read_text()) for a, p in trained.items()}
    atomic_write_json(run_dir / "experts.json", {
        a: {"path": str(p), **{k: records[a][k] for k in ("data", "steps", "tokens_per_s", "wall_time_s",
                                                           "peak_rss_mb")}}
        for a, p in trained.items()
    })
    run = RunSystems(backbone=cfg.backbone, experts={a: str(p) for a, p in experts.items()}, run_dir=str(run_dir),
                     multitask=str(multitask) if multitask else None,
                     baselines=cfg.baselines.model_dump(mode="json"))
    run.save()

    if "mocae" in cfg.systems:
        build_mocae(cfg, experts, run_dir, progress)
    train_baselines(cfg, run, progress)
    if cfg.sanity is not None:
        from mocae.evaluation.sanity import evaluate_experts

        mocae_dir = run_dir / "mocae" if "mocae" in cfg.systems else None
        atomic_write_json(run_dir / "sanity.json", evaluate_experts(
            cfg.backbone, experts, cfg.sanity, cache=run_dir / "sanity", progress=progress, mocae_dir=mocae_dir))

    results = evaluate_run(cfg, run, run_dir, progress)
    table = format_results_table(results)
    parts = [f"# mocae run: {cfg.name}", "", f"Run directory `{run_dir}`; full report: `eval/results.md`.", "",
             table, ""]
    if results["relative_change_mocae_vs_base_pct"]:
        parts += ["## MoCaE vs base", "", "| metric | base | mocae | change | relative | better |",
                  "|---|---|---|---|---|---|"]
        for k, v in results["relative_change_mocae_vs_base_pct"].items():
            rel = "-" if v["relative_pct"] is None else f"{v['relative_pct']:+.1f}%"
            better = {True: "yes", False: "no", None: "same"}[v["better"]]
            parts.append(f"| {k} | {v['reference']:.3f} | {v['system']:.3f} | {v['absolute']:+.3f} | {rel} | {better} |")
        parts.append("")
    if (run_dir / "router_calibration.json").is_file():
        calibration = json.loads((run_dir / "router_calibration.json").read_text())
        parts += ["## Router calibration", "", format_calibration_table(calibration), ""]
    atomic_write_text(run_dir / "summary.md", "\n".join(parts))
    print(f"\n{table}\n\nrun directory: {run_dir}  ({time.time() - start:.0f} s)")
    return run_dir
