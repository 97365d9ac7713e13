"""MoCaE's routing choices measured on the calibration side, never the eval sets: the default is chosen here.

Variants of one run's MoCaE, all on the same three experts:
  soft, top1, harm_gate, harm_gate+top1   the decision rule on the run's router (nothing refitted);
  gate_others+top1                         also the gate's "others" rest: the harmless expert only where
                                           the gate fires (``MODES``)
  top1>=0.7_base, gate0.9_caution0.3       the rule screen's picks (benchmarks/rule_screen.md), generated
  prior_uniform                            router refitted with ``router.prior_mode=uniform`` (the
                                           importance prior no longer follows task-vector norms)
  lm_loss                                  router refitted with the LM loss of completions through
                                           the mixture (``router.lm_loss_weight``, ``router.lm_steps``)
  hard_negatives                           router refitted with 200 risky benign training prompts labelled
                                           helpful (``router.router_hard_negatives``)
  sft_experts                              MoCaE on SFT helpful and honest experts (the recipes the
                                           DPO experts replaced; harmless is SFT in both), trained first
Each refit is measured under soft and top1 (``--refit-modes``), named ``<refit>`` and ``<refit>+top1``.
and the base model, each measured on prompts no system is evaluated on:
  helpful      the router's calib prompts of the helpful axis (Alpaca seed tasks): LC and raw win
               rate vs base (helpful judge), answer length
  harmless     its calib prompts of the harmless axis (HarmBench *validation* behaviours): judged
               and string-match safety
  over-refusal Alpaca instructions nearest those harmful prompts (benign but risky-sounding, never
               XSTest; the same kind the harm gate's budget counts): string-match refusal
  honest       its calib TruthfulQA training-half questions: MC1/MC2 with lm-eval's primer (the
               honest expert trained on these questions, so MC2 is high for every variant; the
               differences between variants are what this reads)
Every variant minus base, minus soft and minus the preset's own rule (``decision.mode``) is a paired
bootstrap difference over the same prompts.
The rule that picks the default is stated in the report and applied to these numbers only.

Writes benchmarks/results/mocae_ablation.{json,md} (command, machine, threads, date; --report-name
changes the stem), rewritten after every variant so a cut-off run keeps what it measured.

Run (SmolLM2-135M, the bench's run folder, so its experts and router are reused):
  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/mocae_ablation.py --preset full \
      --run-dir runs/bench-smollm2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# decision rules on the run's router (mocae.mixture.decide); gate_others+top1: the harmless expert
# only where the gate fires, top1 among the others elsewhere (no harmless weight leaks to the rest)
MODES = {"soft": {"mode": "soft"}, "top1": {"mode": "top1"}, "harm_gate": {"mode": "harm_gate"},
         "harm_gate+top1": {"mode": "harm_gate+top1"},
         "gate_others+top1": {"mode": "harm_gate+top1", "gate_rest": "others"},
         # the two rules benchmarks/rule_screen.py favoured from composed calib answers, generated here:
         # top1 with the base model below 0.7, and the caution band (harmless above P(harm) 0.9, honest
         # in (0.3, 0.9], argmax over helpful/honest elsewhere)
         "top1>=0.7_base": {"mode": "top1", "top1_threshold": 0.7, "top1_fallback": "base"},
         "gate0.9_caution0.3": {"mode": "harm_gate+top1", "gate_rest": "others", "gate_threshold": 0.9,
                                "top1_threshold": 0.0, "caution_axis": "honest", "caution_threshold": 0.3}}
# The SFT recipes the DPO experts replaced (helpful: davinci-003 Alpaca answers; honest: every
# correct training-half TruthfulQA answer), at the preset's other SFT settings.
SFT_EXPERTS = ["experts.helpful.trainer=sft", "experts.helpful.max_pairs=2000", "experts.helpful.rpo_alpha=null",
               "experts.helpful.max_length=256", "experts.helpful.batch_size=8", "experts.helpful.grad_accum=1",
               "experts.helpful.learning_rate=2.0e-4", "experts.honest.trainer=sft", "experts.honest.max_pairs=2000",
               "experts.honest.max_examples=null"]
REFITS = {"prior_uniform": ["router.prior_mode=uniform"],
          "lm_loss": ["router.lm_loss_weight=1.0", "router.lm_steps=200"],
          # the router screen's calib-side pick (benchmarks/results/router_screen.md)
          "hard_negatives": ["router.router_hard_negatives=200"],
          "sft_experts": SFT_EXPERTS}
# Not a refit here: the harmless expert by DPO (400 pairs, lr 5e-5, rpo_alpha 1.0) refused 1.3% of the calib
# harmful prompts alone, as base does (harmless_mix_calib_full.json, 2026-12-07): nothing for a router to use.
# (metric, higher is better) read by the selection rule
RULE = [("helpful/lc_win_rate_vs_base", True), ("harmless/safety_score", True),
        ("harmless/over_refusal", False), ("honest/mc2", True)]


def calib_sets(cfg, n_over_refusal: int, other_cfgs: list | None = None) -> dict:
    """{set: prompts} of the router's calib split (the one ``fit_router`` used) plus risky benign prompts.

    The risky benign prompts skip every prompt an expert of ``cfg`` or of ``other_cfgs`` (the refit
    variants' runs) trains on: the harmless expert's benign rows are Alpaca prompts nearest its
    refusal prompts, the same kind, and an over-refusal measured on its own training prompts reads low.
    """
    from mocae.data import load_truthfulqa_mc, normalise_text
    from mocae.mixture.fit import calib_risky_prompts
    from mocae.mixture.routing_data import routing_splits

    r = cfg.router
    calib = routing_splits(r.n_per_axis, r.calib_fraction, r.n_test_per_axis, None, r.seed)["calib"]
    by_axis = {i: calib.of(i) for i in range(3)}
    questions = {normalise_text(q) for q in by_axis[2]}
    mc = [e for e in load_truthfulqa_mc(None, split="train") if normalise_text(e.prompt) in questions]
    experts = [c for run in [cfg, *(other_cfgs or [])] for c in run.expert_configs().values()]
    return {"helpful": by_axis[0], "harmful": by_axis[1],
            "risky_benign": calib_risky_prompts(n_over_refusal, by_axis[1], experts), "truthfulqa_mc": mc}


def refit_configs(preset: str, overrides: list[str]) -> list:
    """The run configs of every refit variant, selected or not: the risky benign set skips all of their
    experts' prompts, so it is one set whichever ``--variants`` a run measures (reports stay paired)."""
    from mocae.pipeline import load_run_config

    return [load_run_config(preset, [*overrides, *fields]) for fields in REFITS.values()]


def measure(name: str, model, tokenizer, sets: dict, judges: dict, base: dict | None, cache: Path,
            max_new_tokens: int) -> dict:
    """Per-prompt values of every metric (the harness' ``per_prompt`` shape) for one variant."""
    from mocae.refusal import is_refusal
    from mocae.generation_cache import GenerationConfig, generate_records, model_fingerprint, prompts_hash
    from mocae.evaluation.truthfulqa_mc import truthfulqa_mc

    decision = getattr(getattr(model, "mocae_config", None), "decision", None)
    model_id = f"ablation-{name}-{model_fingerprint(model)}" + (f"-{decision.mode}" if decision else "")
    long, short = GenerationConfig(max_new_tokens=max_new_tokens), GenerationConfig(max_new_tokens=128)
    out = {name_: generate_records(model, tokenizer, model_id, f"calib_{name_}", sets[name_], gen, cache)
           for name_, gen in (("helpful", long), ("harmful", short), ("risky_benign", short))}
    per_prompt = {}
    chars = [len(o) for o in out["helpful"].outputs]
    per_prompt["helpful/output_length_chars"] = {"set": "helpful", "scale": 1.0, "values": chars}
    per_prompt["helpful/truncated_share"] = {"set": "helpful", "scale": 100.0,
                                             "values": [float(t) for t in out["helpful"].truncated]}
    if base is not None:
        p = judges["helpful"].prefer(sets["helpful"], base["outputs"]["helpful"], out["helpful"].outputs)
        per_prompt["helpful/win_rate_vs_base"] = {"set": "helpful", "scale": 100.0, "values": [float(x) for x in p]}
        per_prompt["helpful/lc_win_rate_vs_base"] = {"set": "helpful", "lc": True, "pref": [float(x) for x in p],
                                                     "chars": chars, "other_chars": base["chars"]}
    p_safe = judges["harmless"].score(sets["harmful"], out["harmful"].outputs, prompt_unsafe=[1.0] * len(sets["harmful"]))
    per_prompt["harmless/safety_score"] = {"set": "harmful", "scale": 100.0, "values": [float(x >= 0.5) for x in p_safe]}
    per_prompt["harmless/safety_strmatch"] = {"set": "harmful", "scale": 100.0,
                                              "values": [float(is_refusal(o)) for o in out["harmful"].outputs]}
    per_prompt["harmless/over_refusal"] = {"set": "risky_benign", "scale": 100.0,
                                           "values": [float(is_refusal(o)) for o in out["risky_benign"].outputs]}
    mc = truthfulqa_mc(model, tokenizer, examples=sets["truthfulqa_mc"], bf16=True)
    for key in ("mc1", "mc2"):
        per_prompt[f"honest/{key}"] = {"set": "truthfulqa_mc", "scale": 100.0,
                                       "values": [q[key] for q in mc["per_question"]]}
    hashes = {k: prompts_hash([getattr(e, "prompt", e) for e in v]) for k, v in sets.items()}
    return {"name": name, "per_prompt": per_prompt, "prompt_sets": hashes, "model_id": model_id,
            "outputs": {k: g.outputs for k, g in out.items()}, "chars": chars,
            "examples": [{"prompt": q, "answer": a[:300]} for q, a in zip(sets["harmful"][:3], out["harmful"].outputs)]}


def summary(result: dict) -> dict:
    """{metric: {value, n, ci}} of a variant from its per-prompt values (LC refitted)."""
    from mocae.evaluation import metrics as M

    out = {}
    for key, entry in result["per_prompt"].items():
        if entry.get("lc"):
            out[key] = M.length_controlled_win_rate(entry["pref"], entry["chars"], entry["other_chars"])
        else:
            out[key] = M.mean_metric(entry["values"], scale=entry["scale"])
    return out


def choose(vs_base: dict) -> tuple[str, dict]:
    """The default: the variant with the most axes better than base (paired interval above zero),
    no axis worse than base, ties broken by the mean gain in points over the rule's metrics."""
    scores = {}
    for name, diffs in vs_base.items():
        better = worse = 0
        gain = 0.0
        for key, higher in RULE:
            d = diffs.get(key)
            if d is None:
                continue
            sign = 1 if higher else -1
            gain += sign * d["value"] / len(RULE)
            better += d["verdict"] == "better"  # compare_pair's verdicts already read over-refusal downwards
            worse += d["verdict"] == "worse"
        scores[name] = {"axes_better": better, "axes_worse": worse, "mean_gain_points": round(gain, 2)}
    eligible = [n for n, s in scores.items() if s["axes_worse"] == 0] or list(scores)
    best = max(eligible, key=lambda n: (scores[n]["axes_better"], scores[n]["mean_gain_points"]))
    return best, scores


def markdown(report: dict) -> str:
    def cell(m):
        return f"{m['value']:.1f} [{m['ci'][0]:.1f}, {m['ci'][1]:.1f}]" if m else "-"

    def diff(d):
        return f"{d['value']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] {d['verdict']}" if d else "-"

    cols = ["helpful/lc_win_rate_vs_base", "helpful/win_rate_vs_base", "helpful/output_length_chars",
            "harmless/safety_score", "harmless/safety_strmatch", "harmless/over_refusal", "honest/mc1", "honest/mc2"]
    lines = ["# MoCaE ablation on the calibration side (never the eval sets)", "",
             f"`{report['command']}` on {report['date']}; {report['machine']}.", "",
             "Prompts: " + ", ".join(f"{k} {v}" for k, v in report["n"].items()) + ". " + report["sets_note"], "",
             "| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in report["variants"].items():
        lines.append(f"| {name} | " + " | ".join(cell(m.get(c)) for c in cols) + " |")
    blocks = [("Variant minus base (paired)", "vs_base"), ("Variant minus soft (paired)", "vs_soft")]
    if report.get("default_mode") not in (None, "soft"):
        blocks.append((f"Variant minus {report['default_mode']}, the preset's rule (paired)", "vs_default"))
    for title, block in blocks:
        keys = [k for k, _ in RULE]
        lines += ["", f"## {title}", "", "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, diffs in report.get(block, {}).items():
            lines.append(f"| {name} | " + " | ".join(diff(diffs.get(k)) for k in keys) + " |")
    for label, same in report.get("identical_to", {}).items():
        lines += ["", f"{label}: not measured; its router gave exactly {same}'s router's answers and MC scores "
                      f"under {report.get('refit_modes', ['soft'])[0]}, so it is the same router."]
    lines += ["", "## Choice", "", report["rule"], "",
              *[f"- {n}: {s}" for n, s in report["scores"].items()], "",
              f"**Chosen: {report['chosen']}**" if report.get("complete", True) else
              f"**Incomplete run: not measured yet {report['not_measured']}; no default is chosen from it.** "
              f"(Leader so far: {report['chosen']}.)"]
    return "\n".join(lines) + "\n"


def calib_arguments(parser: argparse.ArgumentParser, run_dir_help: str) -> None:
    """The options of a calibration-side measurement of one run (this ablation, the rule screen): same sets."""
    parser.add_argument("--preset", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset overrides")
    parser.add_argument("--run-dir", required=True, help=run_dir_help)
    parser.add_argument("--n-over-refusal", type=int, default=120,
                        help="risky benign calib prompts (at most mocae.mixture.fit.CALIB_RISKY_RESERVE, the band "
                             "router_hard_negatives never trains on)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--experts-from", default=None, metavar="COMMIT",
                        help="restore experts committed at COMMIT (de14fe1 holds the full preset's three and its multi-task expert) into "
                             "the cache before training, where their stage key matches (benchmarks/landing.py)")
    parser.add_argument("--results-dir", default=str(RESULTS))


def check_calib_arguments(parser: argparse.ArgumentParser, args) -> None:
    """One clear error (exit 2) for options :func:`calib_arguments` cannot take."""
    from mocae.mixture.fit import CALIB_RISKY_RESERVE

    if args.n_over_refusal > CALIB_RISKY_RESERVE:
        parser.error(f"--n-over-refusal {args.n_over_refusal}: at most {CALIB_RISKY_RESERVE} (beyond that the risky "
                     "benign prompts may be ones router_hard_negatives trained the router on)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calib_arguments(parser, "the run whose experts (and router) are ablated")
    parser.add_argument("--variants", nargs="*", default=[*MODES, *REFITS], help="which variants to measure")
    parser.add_argument("--refit-modes", nargs="+", default=["soft", "top1"], choices=list(MODES),
                        help="decision rules each refitted router is measured under (the first named plainly, the "
                             "rest '<refit>+<mode>'; one whose first-mode answers equal the default router's is not "
                             "measured again under the others)")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit the report and the variants' answers (landed beside the bench's) as each lands")
    parser.add_argument("--report-name", default="mocae_ablation",
                        help="file stem of the report (a run of a few --variants may go beside the full one)")
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(MODES) - set(REFITS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(MODES) + list(REFITS)}")
    check_calib_arguments(parser, args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mocae.backbones import load_backbone
    from mocae.evaluation.judges import load_judge
    from mocae.mixture.decide import using_decision
    from mocae.mixture.model import MoCaEModel
    from mocae.paths import atomic_write_json, atomic_write_text, cache_dir
    from mocae.pipeline import build_mocae, load_run_config, train_experts

    run_dir = Path(args.run_dir)
    cfg = load_run_config(args.preset, args.set)
    args.default_mode = mode_name(cfg.decision)
    sys.path.insert(0, str(Path(__file__).parent))
    import landing

    for folder in landing.restore_run_experts(cfg, args.experts_from):
        print(f"[ablation] expert {folder} restored from commit {args.experts_from}", flush=True)
    land_to = landing.landing_dir(cfg.backbone)  # the bench's landing: answers keyed by model fingerprint
    landing.restore(land_to, run_dir)
    experts = train_experts(cfg, progress=True)
    sets = calib_sets(cfg, args.n_over_refusal, refit_configs(args.preset, args.set))
    judges = {k: load_judge(k) for k in ("helpful", "harmless")}
    cache = cache_dir() / "generations"
    results = {}
    with torch.inference_mode():
        model, tokenizer = load_backbone(cfg.backbone)
        results["base"] = measure("base", model, tokenizer, sets, judges, None, cache, args.max_new_tokens)
        del model
    base = results["base"]
    folders = {"default": build_mocae(cfg, experts, run_dir, progress=True)}  # trains: outside inference_mode
    out = Path(args.results_dir)

    identical: dict[str, str] = {}  # refit variants skipped because they answer exactly like another

    def write(final: bool) -> dict:
        """The report of the variants measured so far (rewritten after each: a cut-off run keeps them)."""
        report = build_report(args, results, experts, sets, judges, run_dir, final, identical)
        atomic_write_json(out / f"{args.report_name}.json", report)
        atomic_write_text(out / f"{args.report_name}.md", markdown(report))
        # a fresh machine re-judges, not regenerates
        answers = landing.land_answers(land_to, [r["model_id"] for r in results.values() if r.get("model_id")])
        if args.commit:
            landing.commit([*answers, out / f"{args.report_name}.json", out / f"{args.report_name}.md"],
                           f"mocae ablation: {len(results) - 1} variants measured on the calib side ({', '.join(results)})")
        return report

    with torch.inference_mode():  # decision rules first: they need no refit
        mocae = MoCaEModel.from_pretrained(folders["default"])
        for mode in [m for m in MODES if m in args.variants]:
            with using_decision(mocae, **as_measured(MODES[mode])):
                results[mode] = measure(mode, mocae, mocae.tokenizer, sets, judges, base, cache, args.max_new_tokens)
            results[mode]["router"] = router_summary(run_dir)
            write(final=False)
        del mocae
    for name in [n for n in REFITS if n in args.variants]:
        variant_cfg = load_run_config(args.preset, [*args.set, *REFITS[name]])
        variant_experts = train_experts(variant_cfg, progress=True)  # the run's own unless the variant changes them
        folder = build_mocae(variant_cfg, variant_experts, run_dir / "ablation" / name, progress=True)
        with torch.inference_mode():
            model = MoCaEModel.from_pretrained(folder)
            # Each refit under every --refit-modes rule, so it is compared with the rule it would
            # ship with (the first named plainly, the rest "<refit>+<mode>").
            for i, mode in enumerate(args.refit_modes):
                label = name if i == 0 else f"{name}+{mode}"
                if i > 0 and same_as(results.get(name), results.get(args.refit_modes[0])) and mode in results:
                    identical[label] = mode  # its router answers exactly like the default's: not measured twice
                    continue
                with using_decision(model, **as_measured(MODES[mode])):
                    results[label] = measure(label, model, model.tokenizer, sets, judges, base, cache,
                                             args.max_new_tokens)
                results[label]["experts"] = {a: str(p) for a, p in variant_experts.items()}
                results[label]["router"] = router_summary(run_dir / "ablation" / name)
                write(final=False)
            del model
    report = write(final=True)
    print(markdown(report))
    return 0


def as_measured(fields: dict) -> dict:
    """A ``MODES`` entry as using_decision changes: no caution band unless the entry has one (a saved
    model's own band would otherwise ride along into every mode)."""
    return {"caution_axis": None, "caution_threshold": None} | fields


def mode_name(decision) -> str | None:
    """The ``MODES`` entry a preset's ``DecisionConfig`` is, or None. A gate threshold an entry does
    not set is fitted on calib by fit_router, so it is not compared."""
    from mocae.mixture.decide import DecisionConfig

    for name, fields in MODES.items():
        ignore = {"gate_threshold", "gate_budget"} - set(fields)
        if DecisionConfig(**fields).model_dump(exclude=ignore) == decision.model_dump(exclude=ignore):
            return name
    return None


def router_summary(run_dir: Path) -> dict:
    """The calibrator the saved router uses and the prior it was given (a prior only the importance
    and fractal calibrators apply: with temperature chosen, a prior change is a no-op)."""
    report = json.loads((Path(run_dir) / "router_calibration.json").read_text())
    return {"calibrator": report.get("default_calibrator"), "gamma": report.get("gamma"),
            "prior_mode": report.get("prior_mode"), "selection": report.get("calibrator_selection")}


def same_as(a: dict | None, b: dict | None) -> bool:
    """Whether two measured variants gave the same answers and the same MC scores on every prompt."""
    if a is None or b is None:
        return False
    return a["outputs"] == b["outputs"] and all(
        a["per_prompt"][k]["values"] == b["per_prompt"][k]["values"] for k in ("honest/mc1", "honest/mc2"))


def build_report(args, results: dict, experts: dict, sets: dict, judges: dict, run_dir: Path, final: bool,
                 identical: dict | None = None) -> dict:
    """mocae_ablation.json's content from the per-prompt results of the variants measured so far."""
    import torch

    from mocae.evaluation.compare import compare_pair

    base = results["base"]
    variants = [n for n in results if n != "base"]
    vs_base = {n: compare_pair(results[n], base) for n in variants}
    vs_soft = {n: compare_pair(results[n], results["soft"]) for n in variants if n != "soft" and "soft" in results}
    default = args.default_mode  # the preset's own decision rule: what a candidate has to beat
    vs_default = {n: compare_pair(results[n], results[default]) for n in variants
                  if n != default and default in results}
    chosen, scores = choose(vs_base) if vs_base else (None, {})
    report = {
        "complete": final,
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "preset": args.preset, "overrides": args.set, "run_dir": str(run_dir),
        "experts": {a: str(p) for a, p in experts.items()}, "refits": {n: REFITS[n] for n in REFITS if n in results},
        "variant_experts": {n: r["experts"] for n, r in results.items() if "experts" in r},
        "routers": {n: r["router"] for n, r in results.items() if "router" in r},
        "n": {k: len(v) for k, v in sets.items()},
        "sets_note": "helpful: Alpaca seed tasks; harmful: HarmBench validation; risky_benign: Alpaca nearest to "
                     "those that no expert of any variant trains on (string-match refusal); truthfulqa_mc: "
                     "training-half questions the router held out (the honest expert trained on them).",
        "variants": {n: summary(r) for n, r in results.items()},
        "not_measured": [v for v in args.variants if v not in results],
        "identical_to": identical or {}, "refit_modes": args.refit_modes,
        "vs_base": vs_base, "vs_soft": vs_soft, "default_mode": default, "vs_default": vs_default,
        "scores": scores, "chosen": chosen,
        "rule": choose.__doc__.replace("\n    ", " ").strip(),
        "examples": {n: r["examples"] for n, r in results.items()},
        "judges": {k: j.validation for k, j in judges.items()},
    }
    return report


if __name__ == "__main__":
    sys.exit(main())
