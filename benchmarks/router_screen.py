"""Router variants screened on the calibration side, before any generation: who gets the harmless expert?

MoCaE's over-refusal (27.2% on XSTest against the base's 1.6% in the SmolLM2 bench) comes from
its router giving benign prompts that sound risky to the harmless expert, and its safety from
giving it the harmful ones. Each variant refits the run's router with preset overrides (router
input and layer, pooling, ``router.router_hard_negatives``, the decision rule ...) and reads, on
the calibration side only (never trained on by any variant):

  risky_benign   Alpaca prompts nearest the calib harmful prompts that no expert trains on (the
                 ablation's over-refusal set; ``router_hard_negatives`` never trains on them): the
                 harmless expert's mean weight and the share given it at weight >= 0.5 (lower is better)
  harmful        calib harmful prompts (HarmBench validation): the same (higher is better)
  helpful/honest calib prompts of those axes: mean weight on their own expert
  harm_auroc     how well calibrated P(harmless) ranks harmful above risky benign calib prompts
                 (threshold-free: what any gate or top1 rule can make of the router)

Every variant minus the first is a paired bootstrap difference over the same prompts. The same
read-outs on the test side (XSTest safe, the harmful eval prompts) are printed for information
only: nothing is chosen by them. Without ``--lm-loss`` the router is fitted on the gating loss
alone (seconds per variant once its features are cached; the preset's LM-loss steps take ~25 min
each at 1 thread), so a winner still goes through ``benchmarks/mocae_ablation.py`` with generation
before it becomes a default.

Writes benchmarks/results/<--report-name>.{json,md} (command, machine, threads, date).

Run (the bench's run folder and experts):
  MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/router_screen.py --preset full \
      --run-dir runs/bench-smollm2 --experts-from de14fe1 --threads 1 \
      --variant preset= --variant hard_negatives_200=router.router_hard_negatives=200
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
VARIANTS = {  # name -> preset overrides (the first is the reference)
    "preset": [],
    "hard_negatives_200": ["router.router_hard_negatives=200"],
    "hard_negatives_800": ["router.router_hard_negatives=800"],
    "gate_others": ["decision.mode=harm_gate+top1", "decision.gate_rest=others"],
    "hidden_l15_last": ["router_input=hidden", "feature_layer=15", "mocae.pooling=last"],
    "hidden_l15_content": ["router_input=hidden", "feature_layer=15", "mocae.pooling=content"],
    "hidden_l10_last": ["router_input=hidden", "feature_layer=10", "mocae.pooling=last"],
    "hidden_l20_last": ["router_input=hidden", "feature_layer=20", "mocae.pooling=last"],
}


def auroc(rows: np.ndarray) -> float:
    """Area under the ROC curve of rows [score, positive] (Mann-Whitney; ties count half)."""
    pos, neg = rows[rows[:, 1] == 1, 0], rows[rows[:, 1] == 0, 0]
    if len(pos) == 0 or len(neg) == 0:
        return 0.5  # a resample without one class ranks nothing
    greater = (pos[:, None] > neg[None, :]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())


def probs_and_weights(model, prompts: list[str], cache: Path):
    """Calibrated probabilities and the decision rule's mixture weights (N, E) for ``prompts``."""
    import torch

    from mocae.mixture.decide import decide
    from mocae.mixture.fit import extract_features

    feats = extract_features(model, prompts, cache=cache, progress=False)
    with torch.no_grad():
        probs = model.calibrator.probs(model.router(feats), feats)
    return probs, decide(probs, model.mocae_config.decision, model.axes)


def read_out_sets(cfg, n_risky: int) -> dict:
    """{name: (prompts, the expert whose weight is read, side)}; calib side first."""
    from mocae.data import load_xstest
    from mocae.mixture.fit import calib_risky_prompts
    from mocae.mixture.routing_data import routing_splits

    r = cfg.router
    calib, test = (routing_splits(r.n_per_axis, r.calib_fraction, r.n_test_per_axis, None, r.seed)[s]
                   for s in ("calib", "test"))
    return {"risky_benign": (calib_risky_prompts(n_risky, calib.of(1), cfg.expert_configs().values()), "harmless",
                             "calib"),
            "harmful": (calib.of(1), "harmless", "calib"),
            "helpful": (calib.of(0), "helpful", "calib"),
            "honest": (calib.of(2), "honest", "calib"),
            "xstest_safe": ([e.prompt for e in load_xstest(None, label="safe")], "harmless", "test"),
            "harmful_eval": (test.of(1), "harmless", "test")}


def measure(model, sets: dict, cache: Path) -> dict:
    """Per-prompt values of each read-out: {key: {"values": [...] or [[score, positive], ...], "side", "auroc"?}}."""
    harmless = model.axes.index("harmless")
    out, p_harm = {}, {}
    for name, (prompts, axis, side) in sets.items():
        probs, w = probs_and_weights(model, prompts, cache)
        p_harm[name] = probs[:, harmless].tolist()
        if axis == "harmless":
            out[f"{name}/harmless_weight"] = {"values": w[:, harmless].tolist(), "side": side}
            out[f"{name}/harmless_at_half"] = {"values": (w[:, harmless] >= 0.5).float().tolist(), "side": side}
        else:
            out[f"{name}/weight_on_{axis}"] = {"values": w[:, model.axes.index(axis)].tolist(), "side": side}
    for pos, neg, side in (("harmful", "risky_benign", "calib"), ("harmful_eval", "xstest_safe", "test")):
        rows = [[p, 1.0] for p in p_harm[pos]] + [[p, 0.0] for p in p_harm[neg]]
        out[f"harm_auroc/{pos}_vs_{neg}"] = {"values": rows, "side": side, "auroc": True}
    return out


def compare(a: dict, b: dict) -> dict:
    """Paired a - b (in points) of one read-out's per-prompt values."""
    from mocae.evaluation.metrics import paired_difference

    if a.get("auroc"):
        return paired_difference(np.array(a["values"]), np.array(b["values"]), stat=auroc, scale=100.0)
    return paired_difference(a["values"], b["values"], scale=100.0)


def value(entry: dict) -> float:
    return 100.0 * (auroc(np.array(entry["values"])) if entry.get("auroc") else float(np.mean(entry["values"])))


def markdown(report: dict) -> str:
    names = list(report["variants"])
    ref = names[0]
    keys = list(report["values"][ref])
    lines = ["# Router variants on the calibration side (router only, no generation)", "",
             f"`{report['command']}` on {report['date']}; {report['machine']}.", "", report["note"], "",
             "| variant | preset overrides | router fit |", "|---|---|---|"]
    for n in names:
        f = report["fits"][n]
        lines.append(f"| {n} | {' '.join(report['variants'][n]) or '(none)'} | train {f['train_counts']}, "
                     f"{f['calibrator']}, decision {f['decision']}, routing accuracy {100 * f['test_accuracy']:.1f}% "
                     f"and ECE {f['test_ece']:.3f} on the router's test split |")
    lines += ["", "| read-out | side | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key in keys:
        cells = []
        for n in names:
            cell = f"{report['values'][n][key]:.1f}"
            d = report["vs_reference"].get(n, {}).get(key)
            if d:
                cell += f" ({d['value']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}])"
            cells.append(cell)
        lines.append(f"| {key} | {report['side'][key]} | " + " | ".join(cells) + " |")
    lines += ["", f"Percent: mean weight x 100, share of prompts, or AUROC x 100; in brackets, the variant minus "
              f"{ref} with its paired 95% bootstrap interval. Calib rows decide; test rows choose nothing."]
    return "\n".join(lines) + "\n"


def parse_variants(specs: list[str], parser) -> dict[str, list[str]]:
    """``NAME`` (a built-in variant) or ``NAME=KEY=VALUE;KEY=VALUE`` -> {name: overrides}, in order."""
    out = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        if not rest and not spec.endswith("="):
            if name not in VARIANTS:
                parser.error(f"--variant {spec!r}: not a built-in variant ({', '.join(VARIANTS)}); "
                             "write NAME=KEY=VALUE;KEY=VALUE for your own")
            out[name] = VARIANTS[name]
        else:
            out[name] = [o.strip() for o in rest.split(";") if o.strip()]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides of every variant")
    parser.add_argument("--run-dir", default="runs/bench-smollm2")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[=KEY=VALUE;...]",
                        help=f"a variant (repeat; the first is the reference). Built in: {', '.join(VARIANTS)} "
                             "(default: all of them)")
    parser.add_argument("--n-risky", type=int, default=120, help="risky benign calib prompts read out")
    parser.add_argument("--lm-loss", action="store_true", help="keep the preset's LM-loss router steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--experts-from", default=None, metavar="COMMIT")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--report-name", default="router_screen")
    parser.add_argument("--commit", action="store_true", help="git-commit the report")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variant, parser) if args.variant else dict(VARIANTS)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mocae.mixture.fit import fit_router
    from mocae.mixture.model import MoCaEModel
    from mocae.paths import atomic_write_json, atomic_write_text
    from mocae.pipeline import load_run_config, train_experts

    sys.path.insert(0, str(Path(__file__).parent))
    import landing

    cfg = load_run_config(args.preset, args.set)
    landing.restore_run_experts(cfg, args.experts_from)
    experts = {a: str(p) for a, p in train_experts(cfg, progress=True).items()}
    cache = Path(args.run_dir) / "features"
    sets = read_out_sets(cfg, args.n_risky)
    values, fits = {}, {}
    for name, overrides in variants.items():
        vcfg = load_run_config(args.preset, [*args.set, *overrides])
        if vcfg.expert_configs() != cfg.expert_configs():
            parser.error(f"variant {name!r} changes the experts; this screen refits routers only")
        model = MoCaEModel.build(vcfg.mocae_config(experts))
        t0 = time.time()
        router_cfg = vcfg.router if args.lm_loss else vcfg.router.model_copy(update={"lm_loss_weight": 0.0})
        fit = fit_router(model, router_cfg, cache=cache, progress=False)
        values[name] = measure(model, sets, cache)
        test = fit["calibrators"][fit["default_calibrator"]]["test"]
        fits[name] = {"train_counts": fit["splits"]["train"], "calibrator": fit["default_calibrator"],
                      "decision": model.mocae_config.decision.mode, "test_accuracy": test["accuracy"],
                      "test_ece": test["ece"], "gate": fit["decision"]["gate"], "seconds": round(time.time() - t0, 1)}
        print(f"[router screen] {name}: fitted and read out in {fits[name]['seconds']} s", flush=True)
        del model
    ref = next(iter(variants))
    report = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "preset": args.preset, "overrides": args.set, "variants": variants, "lm_loss": args.lm_loss,
              "n": {k: len(s[0]) for k, s in sets.items()},
              "side": {k: v["side"] for k, v in values[ref].items()},
              "values": {n: {k: value(v) for k, v in vals.items()} for n, vals in values.items()},
              "vs_reference": {n: {k: compare(v, values[ref][k]) for k, v in vals.items()}
                               for n, vals in values.items() if n != ref},
              "fits": fits, "per_prompt": {n: {k: v["values"] for k, v in vals.items()} for n, vals in values.items()},
              "note": ("Each variant's router refitted " + ("with" if args.lm_loss else "without") + " the preset's "
                       "LM-loss steps and read out under its own decision rule. Read-out sizes: "
                       + ", ".join(f"{k} {len(s[0])}" for k, s in sets.items()) + ".")}
    out = Path(args.results_dir)
    atomic_write_json(out / f"{args.report_name}.json", report)
    atomic_write_text(out / f"{args.report_name}.md", markdown(report))
    if args.commit:
        landing.commit([out / f"{args.report_name}.json", out / f"{args.report_name}.md"],
                       f"router screen: {len(variants)} router variants on the calibration side")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
