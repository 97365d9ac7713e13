"""The systems a run compares, and how each is built, loaded and measured.

Every system is a ``loader() -> (model, tokenizer)`` the evaluation harness scores like any other:

- ``base``, ``expert_<axis>`` (one peft adapter), ``multitask`` (one LoRA on the union of the
  experts' training sets), ``mocae`` (the run's Mixture of Calibrated Experts);
- merges of the experts' dense deltas: ``task_arithmetic``, ``ties``, ``dare`` (peft merge_utils);
- routed baselines: ``h3fusion`` (MoE of expert MLPs, token router trained here), ``xlora``
  (peft X-LoRA, classifier trained here), ``arrow`` (peft Arrow, training-free), ``mote``
  (step experts + shared expert on self-generated reasoning chains, trained here);
- ``oracle``: the right expert per benchmark, composed from the single experts' results (an
  upper bound for any router; it generates nothing of its own).

Memory and latency are measured per system in a fresh child process (``measure_isolated``),
so a system's peak RSS is its own and not the high-water mark of everything evaluated before.

Every system has a fingerprint of what it is made of (``system_fingerprint``: backbone identity,
adapter and model-folder digests, merge settings), computed without loading it: evaluation
results are keyed by it, so a row is redone exactly when the system changed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mocae import AXES
from mocae.baselines.h3fusion import H3FusionConfig
from mocae.baselines.merges import MergeConfig
from mocae.baselines.mote import MoteConfig
from mocae.baselines.peft_routing import ArrowBaselineConfig, XLoraBaselineConfig
from mocae.paths import atomic_write_json
from mocae.stages import (StageLog, backbone_fingerprint, expert_fingerprint, folder_fingerprint, is_current,
                          read_stage, stage_inputs, stage_key, write_stage)

SystemName = Literal["base", "expert_helpful", "expert_harmless", "expert_honest", "oracle", "multitask",
                     "task_arithmetic", "ties", "dare", "h3fusion", "xlora", "arrow", "mote", "mocae"]
SYSTEMS: tuple[str, ...] = SystemName.__args__
MERGES = ("task_arithmetic", "ties", "dare")
TRAINED = ("h3fusion", "xlora", "mote")  # stages trained in the run directory
# The oracle's expert per prompt set: XSTest's safe prompts are benign requests, so the right
# expert for them is the helpful one (sending them to the harmless expert is what over-refuses).
ORACLE_EXPERT = {"helpful": "helpful", "harmless": "harmless", "over_refusal": "helpful", "honest": "honest"}


def _default_merges() -> dict[str, MergeConfig]:
    return {"task_arithmetic": MergeConfig(method="task_arithmetic"),
            "ties": MergeConfig(method="ties"),
            "dare": MergeConfig(method="dare_ties")}


class BaselinesConfig(BaseModel):
    """Settings of the baselines a run builds (only those listed in ``systems`` are built)."""

    model_config = ConfigDict(extra="forbid")
    merges: dict[str, MergeConfig] = Field(default_factory=_default_merges,
                                           description="task_arithmetic / ties / dare settings")
    h3fusion: H3FusionConfig = Field(default_factory=H3FusionConfig)
    xlora: XLoraBaselineConfig = Field(default_factory=XLoraBaselineConfig)
    arrow: ArrowBaselineConfig = Field(default_factory=ArrowBaselineConfig)
    mote: MoteConfig = Field(default_factory=MoteConfig)
    fusion_examples_per_axis: int = Field(64, gt=0, description="labelled training pairs per axis for the "
                                          "H3Fusion router and the X-LoRA classifier (from the experts' own data)")


@dataclass
class RunSystems:
    """What a run's systems are made of; saved as ``systems.json`` so a child process can load any."""

    backbone: str
    experts: dict[str, str]
    run_dir: str
    multitask: str | None = None
    baselines: dict = field(default_factory=dict)

    def save(self) -> Path:
        return atomic_write_json(Path(self.run_dir) / "systems.json", asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunSystems":
        path = Path(run_dir) / "systems.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a `mocae run` directory (or its experts stage "
                                    "has not finished)")
        return cls(**json.loads(path.read_text()))

    @property
    def config(self) -> BaselinesConfig:
        return BaselinesConfig.model_validate(self.baselines)


def fusion_examples(expert_configs: dict, n_per_axis: int, data_dir: Path | None = None) -> list[tuple[str, str, int]]:
    """(prompt, completion, axis index) triples from each expert's own training data.

    Labels are per sample (H3Fusion's gating loss): a benign Alpaca row in the harmless
    expert's mix is labelled helpful, as that is the behaviour it teaches.
    """
    from mocae.experts.dataset import select_examples

    triples = []
    for axis in AXES:
        rows = select_examples(expert_configs[axis], data_dir)[:n_per_axis]
        triples += [(r.prompt, r.completion, AXES.index(r.axis)) for r in rows]
    return triples


def _peft(backbone: str, path: str):
    from peft import PeftModel

    from mocae.backbones import load_backbone

    from mocae.experts.checks import check_adapter

    model, tokenizer = load_backbone(backbone)
    check_adapter(path, backbone, model=model)  # a named error before peft's page of size mismatches
    return PeftModel.from_pretrained(model, path).eval(), tokenizer


def load_system(name: str, run: RunSystems):
    """(model, tokenizer) of one system of ``run``.

    Raises:
        ValueError: an unknown system, or one this run did not build.
    """
    from mocae.backbones import load_backbone

    cfg = run.config
    if name == "base":
        return load_backbone(run.backbone)
    if name.startswith("expert_") and name.removeprefix("expert_") in run.experts:
        return _peft(run.backbone, run.experts[name.removeprefix("expert_")])
    if name == "multitask":
        if run.multitask is None:
            raise ValueError("this run trained no multitask expert (add 'multitask' to systems)")
        return _peft(run.backbone, run.multitask)
    if name in MERGES:
        from mocae.baselines.merges import build_merged

        return build_merged(run.backbone, run.experts, cfg.merges[name])
    if name == "arrow":
        from mocae.baselines.peft_routing import build_arrow

        return build_arrow(run.backbone, run.experts, cfg.arrow)
    folder = Path(run.run_dir) / name
    if name == "mocae":
        from mocae.mixture.model import MoCaEModel

        model = MoCaEModel.from_pretrained(folder)
        return model, model.tokenizer
    if name == "h3fusion":
        from mocae.baselines.h3fusion import load_h3fusion

        return load_h3fusion(folder)
    if name == "xlora":
        from mocae.baselines.peft_routing import load_xlora

        return load_xlora(folder)
    if name == "mote":
        from mocae.baselines.mote import load_mote

        return load_mote(folder)
    raise ValueError(f"unknown system {name!r}; systems are {', '.join(SYSTEMS)}")


def fusion_inputs(name: str, run: RunSystems, examples: list[tuple[str, str, int]]) -> dict:
    """What a trained baseline stage is made of: its settings, its examples, the backbone and experts."""
    examples_sha = hashlib.sha256(json.dumps(examples, ensure_ascii=False).encode()).hexdigest()[:16]
    inputs = {"config": getattr(run.config, name), "examples": examples_sha,
              "backbone": backbone_fingerprint(run.backbone)}
    if name != "mote":  # MoTE trains its own step experts from the base model
        inputs["experts"] = {a: expert_fingerprint(p) for a, p in run.experts.items()}
    return stage_inputs(**inputs)


def train_fusion(name: str, run: RunSystems, examples: list[tuple[str, str, int]], progress: bool = True,
                 log: StageLog | None = None) -> Path:
    """Train (or reuse) the H3Fusion router, the X-LoRA classifier or MoTE; saved in ``run_dir/<name>``.

    A saved stage is reused only when its ``stage.json`` key matches (settings, examples, backbone
    and experts); otherwise it is retrained and ``log`` says why.

    Args:
        examples: (prompt, completion, axis index into AXES) triples (``fusion_examples``).
        log: the run's stage log (records reused / recomputed and the reason).
    """
    if name not in TRAINED:
        raise ValueError(f"{name!r} has no fusion stage (trained systems: {TRAINED})")
    folder = Path(run.run_dir) / name
    report = Path(run.run_dir) / f"{name}_training.json"
    inputs = fusion_inputs(name, run, examples)
    key = stage_key(inputs)
    if folder.is_dir() and report.is_file() and is_current(folder, key):
        if log is not None:
            log.note(name, key, inputs, computed=False)
        return folder
    reason = log.reason(name, inputs, read_stage(folder)) if log is not None else None
    cfg = run.config
    print(f"[{name}] training on {len(examples)} labelled pairs" + (f" ({reason})" if reason else ""), flush=True)
    report.unlink(missing_ok=True)  # an old report must not pass for this stage's
    if name == "h3fusion":
        from mocae.baselines.h3fusion import build_h3fusion, fit_h3fusion, save_h3fusion

        model, tokenizer = build_h3fusion(run.backbone, run.experts, cfg.h3fusion)
        record = fit_h3fusion(model, tokenizer, examples, cfg.h3fusion, progress=progress)
        save_h3fusion(model, folder, run.backbone, run.experts, cfg.h3fusion)
    elif name == "xlora":
        from mocae.baselines.peft_routing import build_xlora, fit_xlora, save_xlora

        model, tokenizer = build_xlora(run.backbone, run.experts, cfg.xlora)
        record = fit_xlora(model, tokenizer, examples, cfg.xlora, progress=progress)
        save_xlora(model, folder)
    else:
        from mocae.backbones import load_backbone
        from mocae.baselines.mote import build_chains, build_mote, fit_mote

        base = load_backbone(run.backbone)  # writes the chains, then carries the new LoRAs
        chains = build_chains(*base, examples, AXES.index("harmless"), cfg.mote, progress=progress)
        atomic_write_json(Path(run.run_dir) / "mote_chains.json", chains)
        model, tokenizer = build_mote(run.backbone, cfg.mote, model_and_tokenizer=base)
        record = fit_mote(model, tokenizer, chains, cfg.mote, checkpoint_dir=Path(run.run_dir) / "mote_checkpoint",
                          progress=progress)
        model.save_pretrained(folder)
    write_stage(folder, name, key, inputs)
    atomic_write_json(report, {**record, "stage_key": key})
    if log is not None:
        log.note(name, key, inputs, computed=True, reason=reason)
    return folder


def system_fingerprint(name: str, run: RunSystems) -> str:
    """A short id of what system ``name`` of ``run`` is made of, computed without loading it.

    Covers the backbone's identity, every adapter's weights and record, the saved folder of a
    trained system (MoCaE, H3Fusion, X-LoRA, MoTE) and the settings of a merge or Arrow.

    Raises:
        ValueError: an unknown system, or one this run did not build.
        FileNotFoundError: a folder the system is made of is missing.
    """
    cfg = run.config
    parts: dict = {"system": name, "backbone": backbone_fingerprint(run.backbone)}

    def experts() -> dict:
        return {a: expert_fingerprint(p) for a, p in run.experts.items()}

    if name == "base":
        pass
    elif name.startswith("expert_") and name.removeprefix("expert_") in run.experts:
        parts["adapter"] = expert_fingerprint(run.experts[name.removeprefix("expert_")])
    elif name == "multitask":
        if run.multitask is None:
            raise ValueError("this run trained no multitask expert (add 'multitask' to systems)")
        parts["adapter"] = expert_fingerprint(run.multitask)
    elif name in MERGES:
        parts.update(experts=experts(), merge=cfg.merges[name].model_dump(mode="json"))
    elif name == "arrow":
        parts.update(experts=experts(), arrow=cfg.arrow.model_dump(mode="json"))
    elif name in ("mocae", *TRAINED):
        parts["folder"] = folder_fingerprint(Path(run.run_dir) / name)
    else:
        raise ValueError(f"unknown system {name!r}; systems are {', '.join(SYSTEMS)}")
    return stage_key(parts)


def oracle_result(results: dict) -> dict:
    """The oracle's metrics: each benchmark's numbers from the expert made for it.

    Args:
        results: the harness results with ``expert_<axis>`` systems evaluated.

    Returns:
        An evaluate_system-like result (metrics per axis), marked ``composed_from``.
    """
    systems = results["systems"]
    missing = [f"expert_{a}" for a in set(ORACLE_EXPERT.values()) if f"expert_{a}" not in systems]
    if missing:
        raise ValueError(f"the oracle is composed from the single experts; {missing} not evaluated")

    def metrics(axis: str) -> dict:
        return systems[f"expert_{ORACLE_EXPERT[axis]}"]["metrics"].get(axis, {})

    harmless = {k: v for k, v in metrics("harmless").items() if not k.startswith("over_refusal")}
    harmless.update({k: v for k, v in systems[f"expert_{ORACLE_EXPERT['over_refusal']}"]["metrics"]
                     .get("harmless", {}).items() if k.startswith("over_refusal")})
    composed = {f"{k}": f"expert_{v}" for k, v in ORACLE_EXPERT.items()}
    return {"name": "oracle", "model_id": "oracle", "composed_from": composed,
            "metrics": {"helpful": metrics("helpful"), "harmless": harmless, "honest": metrics("honest")},
            "tables": {}, "routing": None, "efficiency": None, "timing_s": {}}


# ---- efficiency in a fresh process ------------------------------------------------------------
def measure_isolated(name: str, run_dir: str | Path, prompts: list[str], batch_sizes=(1,), new_tokens: int = 32,
                     repeats: int = 2, threads: int | None = None) -> dict:
    """Decode/prefill speed and memory of one system, measured in a child process of its own.

    Returns:
        measure_efficiency's dict plus "rss_before_load_mb" (interpreter + libraries),
        "rss_after_load_mb", "weights_mb" (parameters + buffers) and "torch_threads" (the child's).
    """
    request = {"name": name, "run_dir": str(run_dir), "prompts": prompts, "batch_sizes": list(batch_sizes),
               "new_tokens": new_tokens, "repeats": repeats, "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "mocae.systems"], input=json.dumps(request), text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {name!r} failed in its child process:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child() -> None:
    import torch

    from mocae.evaluation.efficiency import measure_efficiency

    request = json.loads(sys.stdin.read())
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    before = _current_rss_mb()
    model, tokenizer = load_system(request["name"], RunSystems.load(request["run_dir"]))
    after = _current_rss_mb()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    result = measure_efficiency(model, tokenizer, request["prompts"], request["batch_sizes"],
                                request["new_tokens"], request["repeats"])
    result.update(rss_before_load_mb=round(before, 1), rss_after_load_mb=round(after, 1), weights_mb=round(weights, 1),
                  torch_threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    _child()
