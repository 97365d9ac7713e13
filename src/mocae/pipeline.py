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
JSON per finished stage and the report. Every stage is keyed by what made it
(``mocae.stages``): its config, the fingerprints of the experts / router / backbone it reads and
the data files' digests. Re-running a folder after a config change recomputes exactly the stages
whose key changed, says which and why (printed, and in ``stages.json``), and reuses the rest; a
changed backbone is refused unless ``force`` (every stage would be recomputed under the old name).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from mocae import AXES
from mocae.config import ConfigError, config_hash, load_config, resolve_preset
from mocae.errors import read_cached_json
from mocae.evaluation.harness import EvalConfig
from mocae.experts.config import ExpertConfig
from mocae.mixture.decide import DecisionConfig
from mocae.mixture.fit import RouterFitConfig
from mocae.paths import atomic_write_json, atomic_write_text
from mocae.stages import (STAGE_FILE, StageLog, backbone_fingerprint, change_reason, changed_fields, data_fingerprint,
                          experts_fingerprint, folder_fingerprint, is_current, lookup, read_stage, stage_inputs,
                          stage_key, write_stage)
from mocae.systems import SYSTEMS, BaselinesConfig, SystemName, spec_for


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
    decision: DecisionConfig = Field(default_factory=DecisionConfig, description=(
        "MoCaE routing mode: soft blend, top1, harm gate (threshold fitted on calib to gate_budget) or gate+top1"))
    mocae: dict = Field(default_factory=dict, description=(
        "the run's other MoCaEConfig fields, e.g. routing (sequence/token/static), pooling, top_k, "
        "token_temperature, static_weights, merge_single_request; checked when the preset loads. fit_router "
        "trains sequence routers only: a token router is saved as initialised (all-zero), a static one as its weights"))
    systems: list[SystemName] = Field(
        ["base", "expert_helpful", "expert_harmless", "expert_honest", "task_arithmetic", "mocae"],
        description=f"systems to build and evaluate, of: {', '.join(SYSTEMS)}")
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="what the harness measures (mocae eval)")
    efficiency: EfficiencySection = Field(default_factory=lambda: EfficiencySection())
    sanity: SanityConfig | None = Field(None, description="optional judge-free per-expert sanity table")
    contamination: Literal["exact", "full"] = Field(
        "exact", description="the contamination check run before anything trains: 'exact' (normalised "
                             "matches, seconds) or 'full' (plus MiniLM near duplicates, ~15 CPU minutes on a fresh "
                             "cache, then cached)")

    @model_validator(mode="before")
    @classmethod
    def _in_process_efficiency_off(cls, data):
        # The harness' in-process efficiency would report one process' high-water RSS for all.
        if isinstance(data, dict) and isinstance(data.get("eval", {}), dict):
            data = {**data, "eval": {"efficiency": False, **data.get("eval", {})}}
        return data

    @field_validator("mocae")
    @classmethod
    def _mocae_fields_set_once(cls, fields):
        elsewhere = sorted(set(fields) & {"backbone", "experts", "router_input", "feature_layer", "decision",
                                          "calibrator"})
        if elsewhere:
            raise ValueError(f"{elsewhere}: set outside the mocae section (by the run's own fields of that name; "
                             "the calibrator by router.default_calibrator)")
        return fields

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if not self.mocae:  # added after runs were keyed: left out when empty, so their run and stage keys hold
            data.pop("mocae", None)
        return data

    @field_validator("systems")
    @classmethod
    def _some_systems(cls, systems):
        if not systems:
            raise ValueError(f"systems is empty: list at least one system to build and evaluate, of: "
                             f"{', '.join(SYSTEMS)}")
        return systems

    @model_validator(mode="after")
    def _check_systems(self):
        if len(set(self.systems)) != len(self.systems):
            raise ValueError("systems lists a system twice")
        for name in self.systems:
            missing = [n for n in spec_for(name).requires if n not in self.systems]
            if missing:
                raise ValueError(f"{name!r} is {spec_for(name).description}: list {', '.join(missing)} too")
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


    def mocae_config(self, experts: dict[str, str]):
        """The run's MoCaEConfig over these expert folders (axis -> path)."""
        from mocae.config import validate_config
        from mocae.mixture.model import MoCaEConfig

        return validate_config(MoCaEConfig, {
            "backbone": self.backbone, "experts": experts, "router_input": self.router_input,
            "feature_layer": self.feature_layer, "decision": self.decision.model_copy(), **self.mocae,
        }, source=f"preset {self.name!r}, mocae")

    def multitask_config(self):
        """The multi-task SFT baseline: the shared expert settings on the union of the experts' data."""
        from mocae.config import validate_config
        from mocae.experts.config import DPO_FIELDS, MultitaskConfig

        experts = self.expert_configs()
        shared = {k: v for k, v in self.experts.all.items() if k not in DPO_FIELDS}  # multi-task is SFT only
        return validate_config(MultitaskConfig, {
            "backbone": self.backbone, **shared,
            "benign_fraction": experts["harmless"].benign_fraction,
            "benign_sources": experts["harmless"].benign_sources,
            "union_caps": {a: c.max_examples for a, c in experts.items()},
        }, source=f"preset {self.name!r}, multitask")


def load_run_config(preset: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset by name (the packaged ``mocae/configs/<name>.yaml``) or path, with ``key.path=value`` overrides.

    The whole config is validated, the per-axis expert and multi-task configs included.

    Raises:
        ConfigError: naming the file and field at fault.
    """
    from mocae.backbones import UnknownBackbone, check_backbone_name

    cfg = load_config(RunConfig, resolve_preset(preset), overrides)
    try:  # before anything loads: an unknown name would otherwise mean a network retry loop
        check_backbone_name(cfg.backbone)
    except UnknownBackbone as err:
        raise ConfigError(f"preset {cfg.name!r}, field 'backbone': {err}") from None
    cfg.expert_configs()
    cfg.multitask_config()
    cfg.mocae_config({axis: "" for axis in AXES})  # its fields, before anything trains
    return cfg


EVAL_PRESETS = ("quick", "full")


def load_eval_config(preset: str | Path) -> EvalConfig:
    """EvalConfig from a preset name (quick, full -> ``configs/eval_<name>.yaml``) or a YAML path."""
    return load_config(EvalConfig, resolve_preset(f"eval_{preset}" if preset in EVAL_PRESETS else preset))


class StaleRunError(ConfigError):
    """A run folder made with a config whose change would invalidate every stage in it."""


def check_run_dir(cfg: RunConfig, run_dir: Path, force: bool = False) -> list[str]:
    """Compare ``cfg`` with the config a run folder was made with.

    Returns:
        The dotted fields that differ, as ``field: old -> new`` (empty for a new folder).

    Raises:
        StaleRunError: the backbone differs and ``force`` is not set.
    """
    path = run_dir / "config.json"
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(f"{path} is unreadable ({err}); every stage is checked against its own key", stacklevel=2)
        return []
    current = cfg.model_dump(mode="json")
    changed = [f"{f}: {lookup(previous, f)!r} -> {lookup(current, f)!r}" for f in changed_fields(previous, current)]
    if any(c.startswith("backbone:") for c in changed) and not force:
        raise StaleRunError(f"{run_dir} was made with another backbone, so none of its stages fit this config "
                            f"({'; '.join(changed)}): choose another --run-dir, or pass --force to recompute "
                            "every stage in this folder")
    return changed


def train_experts(cfg: RunConfig, progress: bool = True, log: StageLog | None = None) -> dict[str, Path]:
    """Stage 1: train or reuse the three experts. Returns their adapter folders by axis."""
    paths = {}
    for axis, expert_cfg in cfg.expert_configs().items():
        size = (f"DPO, {expert_cfg.max_pairs or 'all'} pairs max" if expert_cfg.trainer == "dpo"
                else f"SFT, {expert_cfg.max_examples or 'all'} examples max")
        print(f"[experts] {axis}: {size}, rank {expert_cfg.rank}", flush=True)
        paths[axis] = _expert_stage(f"experts/{axis}", expert_cfg, log, progress)
    return paths


def _expert_stage(name: str, expert_cfg, log: StageLog | None, progress: bool) -> Path:
    """Train or reuse one expert (its folder is keyed by its inputs) and log which it was."""
    from mocae.experts.train import expert_dir, expert_inputs, is_trained, train_expert

    inputs = expert_inputs(expert_cfg)
    existed = is_trained(expert_dir(expert_cfg))
    path = train_expert(expert_cfg, progress=progress)
    if log is not None:
        log.note(name, stage_key(inputs), inputs, computed=not existed)
    return path


def mocae_inputs(cfg: RunConfig, experts: dict[str, Path]) -> dict:
    """What the router stage is made of: its settings, the backbone, the experts and its data files."""
    from mocae.mixture.fit import router_data_files

    mocae = {"mocae": cfg.mocae} if cfg.mocae else {}  # absent when empty: earlier keys hold
    unset = {"router_hard_negatives"} if not cfg.router.router_hard_negatives else set()  # likewise
    return stage_inputs(config={"router": cfg.router.model_dump(mode="json", exclude=unset),
                                "router_input": cfg.router_input, "feature_layer": cfg.feature_layer, "backbone": cfg.backbone,
                                "decision": cfg.decision, **mocae},
                        backbone=backbone_fingerprint(cfg.backbone),
                        experts=experts_fingerprint(experts),
                        data=data_fingerprint(router_data_files(cfg.router)))


def build_mocae(cfg: RunConfig, experts: dict[str, Path], run_dir: Path, progress: bool = True,
                log: StageLog | None = None) -> Path:
    """Stage 2: fit the router and calibrators on the experts; save to ``run_dir/mocae``.

    Reused only when ``mocae/stage.json`` carries this stage's key (see :func:`mocae_inputs`).
    """
    from mocae.mixture.fit import fit_router, format_calibration_table
    from mocae.mixture.model import MoCaEModel

    out = run_dir / "mocae"
    inputs = mocae_inputs(cfg, experts)
    key = stage_key(inputs)
    if is_current(out, key) and (run_dir / "router_calibration.json").is_file():
        if log is not None:
            log.note("mocae", key, inputs, computed=False)
        return out
    record = read_stage(out)
    reason = log.reason("mocae", inputs, record) if log is not None else change_reason(record, inputs)
    keep_router = _only_decision_changed(record, out, run_dir / "router_calibration.json", inputs)
    if keep_router:
        model = MoCaEModel.from_pretrained(out)
        model.mocae_config.decision = cfg.decision
    else:
        model = MoCaEModel.build(cfg.mocae_config({a: str(p) for a, p in experts.items()}))
    routing = model.mocae_config.routing
    if keep_router and routing == "sequence":
        # Training the router never reads the decision (but for the gate axis, which picks the router's
        # hard negatives): the fitted router is what a refit would give; only the calibrators and the
        # decision's threshold are fitted again on calib, in seconds instead of the router's steps.
        print(f"[mocae] only the decision changed ({reason}): the fitted router is kept, the decision refitted "
              "on calib", flush=True)
        previous = json.loads((run_dir / "router_calibration.json").read_text())
        report = fit_router(model, cfg.router, cache=run_dir / "features", progress=progress, plot_dir=run_dir,
                            train=False)
        report |= {k: previous[k] for k in ("router_loss", "lm_loss_through_mixture") if k in previous}
        report["router_kept_from"] = record["key"]
    elif routing == "sequence":
        print(f"[mocae] fitting the router and calibrators ({reason})", flush=True)
        report = fit_router(model, cfg.router, cache=run_dir / "features", progress=progress, plot_dir=run_dir)
    else:  # fit_router trains sequence routers only
        print(f"[mocae] {routing} routing: saved as built, nothing to fit ({reason})", flush=True)
        report = {"routing": routing, "fitted": False, "calibrators": {}}
    (out / STAGE_FILE).unlink(missing_ok=True)  # a save cut off midway must not pass for the old stage
    model.save_pretrained(out)
    atomic_write_json(run_dir / "router_calibration.json", report)
    write_stage(out, "mocae", key, inputs)  # last: the folder and its report are complete
    if log is not None:
        log.note("mocae", key, inputs, computed=True, reason=reason)
    print(format_calibration_table(report), flush=True)
    return out


def _only_decision_changed(record: dict | None, out: Path, report: Path, inputs: dict) -> bool:
    """Whether the saved MoCaE stage in ``out`` (its stage ``record``) differs from ``inputs`` only in
    what router training does not read (decision fields but ``gate_axis``; the gate threshold's
    fitting settings), with its report beside it."""
    from mocae.mixture.model import ROUTER_FILE

    if record is None or not report.is_file() or not (out / ROUTER_FILE).is_file():
        return False
    changed = changed_fields(record.get("inputs", {}), inputs)
    return bool(changed) and all(f in DECISION_ONLY_ROUTER_FIELDS or
                                 (f.startswith("config.decision.") and f != "config.decision.gate_axis")
                                 for f in changed)


# router settings only the decision's threshold fit reads, never router training
DECISION_ONLY_ROUTER_FIELDS = ("config.router.fit_gate_threshold", "config.router.gate_hard_negatives")


def trained_stages(cfg: RunConfig, run, experts: dict[str, Path], run_dir: Path, progress: bool = True,
                   log: StageLog | None = None) -> dict[str, tuple[str, Callable[[], Path]]]:
    """{name: (stage key, build)} of the run's trained systems: MoCaE and the fusion baselines.

    The key (what ``stage.json`` will hold) is known before anything trains, so an evaluation
    cached under it is found without building the system (``run_pipeline(lazy=True)``).
    """
    from mocae.systems import TRAINED, examples_per_axis, fusion_examples, fusion_inputs, train_fusion

    stages = {}
    if "mocae" in cfg.systems:
        stages["mocae"] = (stage_key(mocae_inputs(cfg, experts)),
                           lambda: build_mocae(cfg, experts, run_dir, progress, log))
    examples = {}  # by examples per axis: H3Fusion and X-LoRA share one selection
    for name in [n for n in cfg.systems if n in TRAINED]:
        n = examples_per_axis(name, cfg.baselines)
        if n not in examples:
            examples[n] = fusion_examples(cfg.expert_configs(), n)
        stages[name] = (stage_key(fusion_inputs(name, run, examples[n])),
                        lambda name=name, ex=examples[n]: train_fusion(name, run, ex, progress, log=log))
    return stages


def train_baselines(cfg: RunConfig, run, progress: bool = True, log: StageLog | None = None) -> None:
    """Stage 3: train the fusion stages of the routed baselines the run lists."""
    baselines_only = cfg.model_copy(update={"systems": [n for n in cfg.systems if n != "mocae"]})
    for _, build in trained_stages(baselines_only, run, {}, Path(run.run_dir), progress, log).values():
        build()


def _read_measured(path: Path) -> dict | None:
    """A cached efficiency record, or None; a damaged file warns, naming it."""
    record = read_cached_json(path, "efficiency cache", "measuring again")
    if record is not None and "weights_mb" not in record:
        warnings.warn(f"efficiency cache {path} is not an efficiency record; measuring again", stacklevel=2)
        return None
    return record


def measure_systems(cfg: RunConfig, run_dir: Path, prompts: list[str], fingerprints: dict[str, str] | None = None,
                    log: StageLog | None = None) -> dict:
    """Stage 4b: efficiency of each system in its own child process, cached per system and fingerprint.

    Args:
        fingerprints: {name: system_fingerprint}; default: computed from ``run_dir/systems.json``.
    """
    from mocae.systems import RunSystems, is_composed, measure_isolated, system_fingerprint

    if fingerprints is None:
        run = RunSystems.load(run_dir)
        fingerprints = {n: system_fingerprint(n, run) for n in cfg.systems if not is_composed(n)}
    out = {}
    e = cfg.efficiency
    for name in cfg.systems:
        if is_composed(name):  # no model of its own to measure
            continue
        inputs = stage_inputs(efficiency=e, system=fingerprints[name], prompts=prompts)
        key = stage_key(inputs)[:12]
        cached = run_dir / "efficiency" / f"{name}-{key}.json"
        record = _read_measured(cached)
        computed = record is None
        if computed:
            print(f"[efficiency] {name}", flush=True)
            record = measure_isolated(name, run_dir, prompts, e.batch_sizes, e.new_tokens, e.repeats, e.threads)
            atomic_write_json(cached, record)
        if log is not None:
            log.note(f"efficiency/{name}", key, inputs, computed=computed)
        out[name] = record
    counts = {n: r.get("torch_threads") for n, r in out.items()}
    if len(set(counts.values())) > 1:
        warnings.warn(f"efficiency of these systems was measured with different torch thread counts: {counts}; "
                      "set efficiency.threads to compare them at one count", stacklevel=2)
    return out


def relative_change(results: dict, system: str = "mocae", reference: str = "base") -> dict:
    """Change of ``system`` over ``reference`` on every metric of the three axes, with its paired interval.

    Returns:
        {"axis/metric": {"reference", "system", "absolute", "relative_pct", "ci", "verdict"}}: ``ci`` is
        the 95% paired bootstrap interval of the difference (``results["comparisons"]``, None where no
        per-prompt values were kept) and ``verdict`` says "better" or "worse" only where it excludes
        zero, "within noise" otherwise (lower is better for over-refusal and NLLs; answer length and
        truncated share are "higher" / "lower"); relative_pct is None when the reference is 0.
    """
    from mocae.evaluation.compare import compare_pair

    out = {}
    systems = results["systems"]
    if system not in systems or reference not in systems:
        return out
    paired = (results.get("comparisons") or {}).get(f"{system}-{reference}")
    if paired is None:
        cfg = results.get("config") or {}
        paired = compare_pair(systems[system], systems[reference], cfg.get("n_boot", 1000), cfg.get("seed", 0))
    for axis in ("helpful", "harmless", "honest"):
        mine, theirs = systems[system]["metrics"].get(axis, {}), systems[reference]["metrics"].get(axis, {})
        for name, metric in mine.items():
            if name not in theirs or "value" not in metric or metric.get("paired"):
                continue  # a within-system paired difference (jailbreak - plain) is not a level
            a, b = theirs[name]["value"], metric["value"]
            diff = paired.get(f"{axis}/{name}")
            out[f"{axis}/{name}"] = {"reference": a, "system": b, "absolute": round(b - a, 4),
                                     "relative_pct": round((b - a) / abs(a) * 100, 2) if a else None,
                                     "ci": None if diff is None else [round(c, 4) for c in diff["ci"]],
                                     "verdict": "no paired interval" if diff is None else diff["verdict"]}
    return out


def evaluate_run(cfg: RunConfig, run, run_dir: Path, progress: bool = True, log: StageLog | None = None,
                 stages: dict | None = None) -> dict:
    """Stage 4 + 5: every system through the harness, the oracle, efficiency; writes the report.

    Each system's row is keyed by its fingerprint (``system_fingerprint``: what it is made of),
    so a changed expert or router re-evaluates exactly the systems built from it.

    Args:
        stages: ``trained_stages`` not built yet: each is built only if its evaluation is not
            cached (and before efficiency, which measures the folders).
    """
    from mocae.evaluation.efficiency import efficiency_metrics
    from mocae.evaluation.harness import eval_prompts, evaluate
    from mocae.evaluation.report import write_results
    from mocae.systems import is_composed, load_system, spec_for, system_fingerprint

    stages = stages or {}
    names = [name for name in cfg.systems if not is_composed(name)]

    def load(name: str):
        if name in stages:
            stages[name][1]()  # reused at once when already built
        return load_system(name, run)

    loaders = {name: (lambda name=name: load(name)) for name in names}
    fingerprints = {name: system_fingerprint(name, run, stage=stages[name][0] if name in stages else None)
                    for name in names}
    out = run_dir / "eval"
    results = evaluate(loaders, cfg.eval, out, progress=progress, fingerprints=fingerprints)
    for name, entry in results["evaluated"].items():
        if log is not None:
            log.note(f"eval/{name}", entry["key"], entry["inputs"], computed=not entry["reused"])
    for name in cfg.systems:
        if is_composed(name):  # the oracle: from the single experts' rows
            results["systems"][name] = spec_for(name).compose(results)
    if cfg.efficiency.enabled:
        for _, build in stages.values():
            build()
        prompts = [e.prompt for e in eval_prompts(cfg.eval)["alpaca_eval"][:cfg.efficiency.n_prompts]]
        for name, measured in measure_systems(cfg, run_dir, prompts, fingerprints, log).items():
            system = results["systems"][name]
            system["efficiency"] = measured
            system["metrics"]["efficiency"] = {**efficiency_metrics(measured), **{
                k: {"value": measured[k], "n": 1, "ci": [measured[k], measured[k]]}
                for k in ("weights_mb", "rss_after_load_mb")}}
    results["systems"] = {n: results["systems"][n] for n in cfg.systems}  # the preset's order
    results["relative_change_mocae_vs_base_pct"] = relative_change(results)
    results["recomputed_stages"] = log.recomputed if log is not None else {}
    results["paths"] = write_results(results, out)
    return results


def run_pipeline(preset: str | Path = "quick", run_dir: str | Path | None = None, progress: bool = True,
                 overrides: list[str] | None = None, force: bool = False, lazy: bool = False) -> Path:
    """Run (or continue) a preset end to end.

    Re-running a folder with a changed config recomputes the stages whose inputs changed and
    reuses the others; ``stages.json`` and the printed log say which and why.

    Args:
        overrides: ``key.path=value`` strings applied to the preset (they change the run's hash).
        force: reuse ``run_dir`` even though it was made with another backbone.
        lazy: build a trained system (MoCaE, H3Fusion, X-LoRA, MoTE) only when its evaluation is
            not cached under its stage key: a sitting on a fresh machine that restored the results
            (benchmarks/bench.py) does not retrain what it will not evaluate. The run folder then
            lacks those systems' folders.

    Returns:
        The run directory.

    Raises:
        ConfigError: an invalid config (nothing is written), or a backbone change without ``force``.
    """
    from mocae.evaluation.report import format_results_table, format_run_summary
    from mocae.mixture.fit import format_calibration_table
    from mocae.systems import RunSystems

    cfg = load_run_config(preset, overrides)
    from mocae.data.contamination import ensure_clean
    from mocae.paths import resolve_root

    if resolve_root(None) is None:  # Hub users: the check compares local files only
        print("[contamination] no MOCAE_DATA_DIR: the check reads local data files, so it is skipped "
              "(run `mocae data check` on a local copy)", flush=True)
    else:  # nothing trains before the data is proven clean (cached by the files' fingerprint)
        ensure_clean(exact_only=cfg.contamination == "exact")
    run_dir = Path(run_dir or Path("runs") / f"{cfg.name}-{config_hash(cfg)}")
    changed = check_run_dir(cfg, run_dir, force)
    if changed:
        print(f"[stages] {run_dir} was made with another config ({'; '.join(changed)}): the stages that read "
              "those fields are recomputed", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.model_dump(mode="json"))
    log = StageLog(run_dir)
    start = time.time()

    experts = train_experts(cfg, progress, log)
    multitask = None
    if "multitask" in cfg.systems:
        print("[experts] multitask: the union of the three training sets", flush=True)
        multitask = _expert_stage("experts/multitask", cfg.multitask_config(), log, progress)
    else:  # record a trained one anyway: runs sharing this directory may list it
        from mocae.experts.train import expert_dir, is_trained

        found = expert_dir(cfg.multitask_config())
        multitask = found if is_trained(found) else None
    trained = {**experts, **({"multitask": multitask} if multitask else {})}
    records = {a: json.loads((p / "training.json").read_text()) for a, p in trained.items()}
    atomic_write_json(run_dir / "experts.json", {
        a: {"path": str(p), **{k: records[a].get(k) for k in ("key", "data", "steps", "tokens_per_s", "wall_time_s",
                                                               "peak_rss_mb", "torch_threads")}}
        for a, p in trained.items()
    })
    run = RunSystems(backbone=cfg.backbone, experts={a: str(p) for a, p in experts.items()}, run_dir=str(run_dir),
                     multitask=str(multitask) if multitask else None,
                     baselines=cfg.baselines.model_dump(mode="json"))
    run.save()

    stages = trained_stages(cfg, run, experts, run_dir, progress, log)
    if not lazy or cfg.sanity is not None:  # the sanity table reads the MoCaE folder
        for _, build in stages.values():
            build()
        stages = {}
    if cfg.sanity is not None:
        from mocae.evaluation.sanity import evaluate_experts

        mocae_dir = run_dir / "mocae" if "mocae" in cfg.systems else None
        # The sanity cache is per system name: a folder per key keeps a changed expert from reusing it.
        key = stage_key(stage_inputs(sanity=cfg.sanity, backbone=backbone_fingerprint(cfg.backbone),
                                     experts=experts_fingerprint(experts),
                                     mocae=folder_fingerprint(mocae_dir) if mocae_dir else None))
        atomic_write_json(run_dir / "sanity.json", evaluate_experts(
            cfg.backbone, experts, cfg.sanity, cache=run_dir / "sanity" / key, progress=progress, mocae_dir=mocae_dir))

    results = evaluate_run(cfg, run, run_dir, progress, log, stages=stages)
    table = format_results_table(results)
    sections = []
    if (run_dir / "router_calibration.json").is_file():
        calibration = json.loads((run_dir / "router_calibration.json").read_text())
        if calibration["calibrators"]:  # none for a token or static router
            sections.append(("Router calibration", format_calibration_table(calibration)))
    summary = format_run_summary(results, cfg.name, run_dir, sections)
    atomic_write_text(run_dir / "summary.md", summary)
    print(f"\n{table}\n\nrun directory: {run_dir}  ({time.time() - start:.0f} s)")
    print(log.summary(), flush=True)
    return run_dir
