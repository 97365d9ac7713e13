"""Hard decision rules screened on the calibration side by composition: no generation per rule.

Under a hard rule each prompt gets one expert at full weight, or none (the base model). MoCaE's
answer to it is then that expert's own answer: the mixture at a one-hot weight is the expert's
peft adapter (tests/mixture/test_layer.py), so a rule's per-prompt metrics are those of the
experts it picks. This script measures base and each expert once on mocae_ablation's calibration
sets (generation and judges, cached and landed like the ablation's answers), reads the run's router's
calibrated probabilities on the same prompts (chat format, as generation routes them; a TruthfulQA
MC question is routed on the question alone, as lm-eval's contexts are), and scores a grid of rules
from them in seconds, each paired vs base and ranked by mocae_ablation's selection rule.

Composition is checked against generation where the ablation measured a rule on this router
(``top1``, cached answers): on the prompts that rule routed one-hot, the share whose generated
answer equals the chosen expert's (bf16 kernels differ between the mixture and peft in the last
bits, so a few greedy continuations may part).

A screen, not a choice: blends (soft rows) cannot be composed, and many rules scored on the same
80-120 prompts per set make the best one's lead optimistic. A rule it favours is measured again by
generation (mocae_ablation, which also chooses) before it becomes a default.

Writes benchmarks/results/rule_screen.{json,md}.

Run (SmolLM2-135M, the bench's run folder, so its experts and router are reused):
  OMP_NUM_THREADS=1 MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/rule_screen.py --preset full \\
      --run-dir runs/bench-smollm2 --threads 1 --experts-from de14fe1 --commit
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BASE = -1  # a rule's choice for "no expert": the base model


# rules: calibrated probabilities (N, E) and the axes' column order -> one choice per prompt ------

def _argmax_over(probs: np.ndarray, columns: list[int]) -> np.ndarray:
    return np.asarray(columns)[probs[:, columns].argmax(1)]


def rule_grid(axes: list[str], fitted_gate: float | None) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """{name: rule} of the screened hard rules over experts named ``axes`` (helpful, harmless, honest).

    ``gate>g``: the harmless expert where calibrated P(harmless) > g; ``caution>c``: the honest
    expert where c < P(harmless) <= g (an expert that does not refuse, for prompts that only
    sound risky); the rest argmax over helpful and honest. ``top1>=t``: argmax where its
    probability is at least t, else base. ``fitted`` is the gate threshold fit_router fitted on
    the router's calib split to the preset's over-refusal budget.
    """
    help_, harm, honest = (axes.index(a) for a in ("helpful", "harmless", "honest"))
    others = [help_, honest]

    def gate(g: float, caution: float | None = None):
        def rule(p: np.ndarray) -> np.ndarray:
            out = _argmax_over(p, others)
            if caution is not None:
                out = np.where(p[:, harm] > caution, honest, out)
            return np.where(p[:, harm] > g, harm, out)
        return rule

    def top1(t: float):
        return lambda p: np.where(p.max(1) >= t, p.argmax(1), BASE)

    grid = {"argmax": lambda p: p.argmax(1), "argmax_no_harmless": lambda p: _argmax_over(p, others)}
    grid |= {f"top1>={t}": top1(t) for t in (0.5, 0.6, 0.7)}
    gates = [0.5, 0.7, 0.9] + ([round(fitted_gate, 3)] if fitted_gate is not None else [])
    grid |= {f"gate>{g}": gate(g) for g in gates}
    grid |= {f"gate>{g},caution>{c}": gate(g, c) for g, c in ((0.7, 0.3), (0.9, 0.3), (0.9, 0.5))}
    return grid


# composition ------------------------------------------------------------------------------------

def _value(system: dict, base: dict, key: str, i: int) -> tuple:
    """(value or pref, chars) of prompt ``i`` under metric ``key`` for one measured system.

    Base against itself is a tie (AlpacaEval's convention): preference 0.5 at its own length.
    """
    entry = system["per_prompt"].get(key)
    if entry is None:  # base has no vs-base metrics
        return 0.5, base["chars"][i]
    if entry.get("lc"):
        return entry["pref"][i], entry["chars"][i]
    return entry["values"][i], None


def compose(name: str, choice: dict[str, np.ndarray], experts: list[dict], base: dict) -> dict:
    """The per-prompt result of a hard rule, taken prompt by prompt from the systems it chose.

    Args:
        choice: {prompt set: (N,) expert column per prompt, or BASE}.
        experts: the measured experts in column order (mocae_ablation.measure results).
        base: the measured base model (``BASE`` choices, and the other side of vs-base metrics).

    Returns:
        A result with ``per_prompt`` and ``prompt_sets`` (mocae_ablation's shape), pairable with base.
    """
    keys = experts[0]["per_prompt"]
    per_prompt = {}
    for key, shape in keys.items():
        picked = [_value(base if c == BASE else experts[c], base, key, i)
                  for i, c in enumerate(choice[shape["set"]])]
        if shape.get("lc"):
            per_prompt[key] = {"set": shape["set"], "lc": True, "pref": [v for v, _ in picked],
                               "chars": [c for _, c in picked], "other_chars": shape["other_chars"]}
        else:
            per_prompt[key] = {"set": shape["set"], "scale": shape["scale"], "values": [v for v, _ in picked]}
    shares = {s: {("base" if k == BASE else str(k)): round(float(np.mean(c == k)), 3) for k in np.unique(c)}
              for s, c in choice.items()}
    return {"name": name, "per_prompt": per_prompt, "prompt_sets": base["prompt_sets"], "shares": shares}


def agreement(choice: np.ndarray, one_hot: np.ndarray, generated: list[str], expert_answers: list[list[str]]) -> dict:
    """How often a rule's generated answer equals the composed one, on the prompts it routed one-hot.

    Args:
        choice: (N,) the rule's expert column per prompt (from its decided weights).
        one_hot: (N,) bool, rows whose decided weights were one-hot (blends are not composable).
        generated: the rule's generated answers; expert_answers: each expert's, in column order.
    """
    rows = np.flatnonzero(one_hot)
    same = [generated[i] == expert_answers[choice[i]][i] for i in rows]
    return {"one_hot": int(len(rows)), "n": len(generated), "identical": int(sum(same)),
            "share": round(float(np.mean(same)), 3) if same else None}


# report -----------------------------------------------------------------------------------------

def score(rules: dict, probs: dict[str, np.ndarray], experts: list[dict], base: dict) -> dict:
    """Every rule composed, summarised and paired vs base; the ablation's selection rule ranks them."""
    import mocae_ablation as ablation
    from mocae.evaluation.compare import compare_pair

    composed = {name: compose(name, {s: rule(p) for s, p in probs.items()}, experts, base) for name, rule in rules.items()}
    vs_base = {name: compare_pair(r, base) for name, r in composed.items()}
    chosen, scores = ablation.choose(vs_base)
    return {"rules": {name: {"summary": ablation.summary(r), "shares": r["shares"]} for name, r in composed.items()},
            "vs_base": vs_base, "scores": scores, "favoured": chosen}


def markdown(report: dict) -> str:
    def diff(d):
        if d is None:
            return "-"
        return f"{d['value']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] {d['verdict']}"

    keys = ["helpful/lc_win_rate_vs_base", "harmless/safety_score", "harmless/over_refusal", "honest/mc2"]
    lines = ["# Hard decision rules screened by composition (calibration side)", "",
             f"`{report['command']}` on {report['date']}; {report['machine']}; run `{report['run_dir']}`.", "",
             report["what"], "", f"Prompts: {', '.join(f'{k} {v}' for k, v in report['n'].items())}. Experts in "
             f"column order: {', '.join(report['axes'])}.", "",
             "| rule | " + " | ".join(k.split("/")[1] + " vs base" for k in keys) + " | axes better / worse | mean gain |",
             "|---|" + "---|" * (len(keys) + 2)]
    for name, diffs in report["vs_base"].items():
        s = report["scores"][name]
        lines.append(f"| {name} | " + " | ".join(diff(diffs.get(k)) for k in keys)
                     + f" | {s['axes_better']} / {s['axes_worse']} | {s['mean_gain_points']:+.2f} |")
    lines += ["", f"Favoured by mocae_ablation's rule ({report['rule']}): **{report['favoured']}** (a screen: measure "
                  "it by generation before adopting it).", "", "## Where each rule sends each set (share of prompts)", "",
              "| rule | " + " | ".join(report["n"]) + " |", "|---|" + "---|" * len(report["n"])]
    names = {str(i): a for i, a in enumerate(report["axes"])} | {"base": "base"}
    for name, r in report["rules"].items():
        cells = [", ".join(f"{names[k]} {v:.2f}" for k, v in r["shares"].get(s, {}).items()) for s in report["n"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Composition checked against generation", ""]
    check = report.get("composition_check")
    if not check:
        lines.append("Not checked: no cached answers of the ablation's `top1` on this router.")
    else:
        lines.append(f"The ablation's `{check['rule']}` answers vs the composed ones, on the prompts it routed one-hot:")
        lines += ["", *[f"- {s}: {c['identical']} of {c['one_hot']} identical ({c['n']} prompts)"
                       for s, c in check["sets"].items()]]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    import mocae_ablation as ablation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ablation.calib_arguments(parser, "the run whose experts and router are screened")
    parser.add_argument("--commit", action="store_true", help="git-commit the report and the experts' calib answers")
    args = parser.parse_args()
    ablation.check_calib_arguments(parser, args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from types import SimpleNamespace

    from peft import PeftModel

    import landing

    from mocae.backbones import load_backbone
    from mocae.evaluation.harness import routing_probabilities
    from mocae.evaluation.judges import load_judge
    from mocae.generation_cache import GenerationConfig, cached_records, model_fingerprint
    from mocae.mixture.decide import using_decision
    from mocae.mixture.model import MoCaEModel
    from mocae.paths import atomic_write_json, atomic_write_text, cache_dir
    from mocae.pipeline import build_mocae, load_run_config, train_experts

    run_dir = Path(args.run_dir)
    cfg = load_run_config(args.preset, args.set)
    for folder in landing.restore_run_experts(cfg, args.experts_from):
        print(f"[screen] expert {folder} restored from commit {args.experts_from}", flush=True)
    land_to = landing.landing_dir(cfg.backbone)
    landing.restore(land_to, run_dir)
    experts = train_experts(cfg, progress=True)
    # the ablation's risky benign set: it skips the prompts of every refit variant's experts too
    sets = ablation.calib_sets(cfg, args.n_over_refusal, ablation.refit_configs(args.preset, args.set))
    judges = {k: load_judge(k) for k in ("helpful", "harmless")}
    cache = cache_dir() / "generations"
    folder = build_mocae(cfg, experts, run_dir, progress=True)  # the run's (cached): trains only if missing

    with torch.inference_mode():
        model, tokenizer = load_backbone(cfg.backbone)
        base = ablation.measure("base", model, tokenizer, sets, judges, None, cache, args.max_new_tokens)
        del model
        mocae = MoCaEModel.from_pretrained(folder)
        axes = list(mocae.axes)
        measured = []
        for axis in axes:
            model, tokenizer = load_backbone(cfg.backbone)
            model = PeftModel.from_pretrained(model, str(experts[axis])).eval()
            print(f"[screen] expert_{axis} on the calib sets", flush=True)
            measured.append(ablation.measure(f"expert_{axis}", model, tokenizer, sets, judges, base, cache,
                                             args.max_new_tokens))
            del model
        examples = {s: [e if hasattr(e, "prompt") else SimpleNamespace(prompt=e) for e in v] for s, v in sets.items()}
        routing = routing_probabilities(mocae, mocae.tokenizer, examples, SimpleNamespace(system=None, batch_size=16))
        probs = {s: np.asarray(r["probs"], dtype=float) for s, r in routing["sets"].items()}
        report = score(rule_grid(axes, mocae.mocae_config.decision.gate_threshold), probs, measured, base)

        check = None  # composition vs generation: the ablation's top1 answers on this router, if cached
        with using_decision(mocae, **ablation.MODES["top1"]):
            model_id = f"ablation-top1-{model_fingerprint(mocae)}-top1"
            gens = {s: GenerationConfig(max_new_tokens=args.max_new_tokens if s == "helpful" else 128)
                    for s in ("helpful", "harmful", "risky_benign")}
            cached = {s: cached_records(model_id, f"calib_{s}", sets[s], g, cache) for s, g in gens.items()}
            if all(c is not None for c in cached.values()):
                check = {"rule": "top1", "sets": {}}
                for s, c in cached.items():
                    weights = mocae.decide(torch.as_tensor(probs[s], dtype=torch.float32)).numpy()
                    one_hot = np.isclose(weights.max(1), 1.0) & np.isclose(weights.sum(1), 1.0)
                    check["sets"][s] = agreement(weights.argmax(1), one_hot, c.outputs,
                                                 [m["outputs"][s] for m in measured])
    report = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "preset": args.preset, "overrides": args.set, "run_dir": str(run_dir), "axes": axes,
              "experts": {a: str(p) for a, p in experts.items()}, "n": {k: len(v) for k, v in sets.items()},
              "what": __doc__.split("\n\n")[1].replace("\n", " "),
              "rule": ablation.choose.__doc__.replace("\n    ", " ").strip(),
              "gate_threshold_fitted": mocae.mocae_config.decision.gate_threshold,
              "composition_check": check, **report,
              "judges": {k: j.validation for k, j in judges.items()}}
    out = Path(args.results_dir)
    atomic_write_json(out / "rule_screen.json", report)
    atomic_write_text(out / "rule_screen.md", markdown(report))
    answers = landing.land_answers(land_to, [m["model_id"] for m in measured])
    if args.commit:
        landing.commit([*answers, out / "rule_screen.json", out / "rule_screen.md"],
                       "rule screen: hard decision rules composed from the experts' calib answers")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
