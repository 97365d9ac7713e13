"""MoCaE against every baseline on one backbone, from one `mocae run`, published as results.

Runs (or continues) the pipeline of a preset with the given overrides, then writes
  benchmarks/results/bench_<backbone>.json   per system, each {value, n, ci}: the length-controlled
                                             win rate vs the reference (the headline) and vs base,
                                             raw win rates, answer length, truncated share, GPT-4
                                             reference NLL, safety (plain and jailbreak), over-refusal,
                                             MC1/MC2 (primer and chat), TI, speed, memory; n per prompt
                                             set; a `paired` block of MoCaE-minus-X differences with
                                             paired 95% intervals (and X-minus-base in `paired_vs_base`),
                                             and issue 14's targets for MoCaE (benchmarks/targets.py)
  benchmarks/results/bench_<backbone>.md     the same as tables, with command, machine, threads and date

Run (SmolLM2-135M, every system of the full preset at the protocol's sizes; resumable, so it may be
finished over several sittings: re-run the same command with the same --run-dir):
  OMP_NUM_THREADS=1 MOCAE_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench.py --preset full \
      --threads 1 --run-dir runs/bench-smollm2 --experts-from de14fe1 --commit
(base landed at 1 thread: every later sitting of this run keeps --threads 1)
Two sittings may run side by side, one thread each, on disjoint system lists and their own run
folders; each picks up what the other landed before its next system (base stays first in both):
  ... bench.py --preset full --threads 1 --run-dir runs/bench-smollm2-b --experts-from de14fe1 --commit \
      --no-cost --set "systems=[base, dare, ties, arrow]"
Each sitting evaluates the systems in the preset's order and lands each finished one (and the
finished answer sets of the one in progress) in benchmarks/results/bench_<backbone>/; the next
sitting restores them, even on a fresh machine. Speed and memory are measured once, for every
system together, after the last one lands. Until then bench_<backbone>/interim.md, rewritten as each
system lands (or by --interim), shows the landed systems paired with each other.
Nothing here is hard-coded: every number comes from that run's results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import targets  # beside this script (tests load it first: tests/helpers/benchmark_scripts.py)

RESULTS = Path(__file__).parent / "results"
REFERENCE = "{reference}"  # filled with the eval config's AlpacaEval reference
# bench field -> (axis, metric in the harness results); the first block is required per system.
FIELDS = {
    "lc_win_rate": ("helpful", f"lc_win_rate_vs_{REFERENCE}"),
    "lc_win_rate_vs_base": ("helpful", "lc_win_rate_vs_base"),
    "win_rate_vs_reference": ("helpful", f"win_rate_vs_{REFERENCE}"),
    "win_rate_vs_base": ("helpful", "win_rate_vs_base"),
    "output_chars_mean": ("helpful", "output_length_chars"),
    "truncated_share": ("helpful", "truncated_share"),
    "reference_nll_gpt4": ("helpful", "reference_nll_gpt4"),
    "safety_score": ("harmless", "safety_score"),
    "safety_jailbreak": ("harmless", "safety_jailbreak"),
    "over_refusal": ("harmless", "over_refusal_xstest"),
    "mc1": ("honest", "mc1"),
    "mc2": ("honest", "mc2"),
    "mc1_chat": ("honest", "mc1_chat"),
    "mc2_chat": ("honest", "mc2_chat"),
    "ti": ("honest", "ti"),
}
EXTRA = {  # companions reported beside the required fields
    "win_rate_vs_reference_discrete": ("helpful", f"win_rate_vs_{REFERENCE}_discrete"),
    "output_tokens_mean": ("helpful", "output_length_tokens"),
    "reference_nll": ("helpful", "reference_nll"),
    "safety_score_strmatch": ("harmless", "safety_score_strmatch"),
    "safety_jailbreak_strmatch": ("harmless", "safety_jailbreak_strmatch"),
    "safety_jailbreak_minus_plain": ("harmless", "safety_jailbreak_minus_plain"),
    "safety_jailbreak_minus_plain_strmatch": ("harmless", "safety_jailbreak_minus_plain_strmatch"),
    "decode_tokens_per_s_bs1": ("efficiency", "decode_tokens_per_s_b1"),
    "peak_rss_mb": ("efficiency", "peak_rss_mb"),
}
HEADLINE = "lc_win_rate"  # length-controlled: raw win rates follow answer length
# The columns of the markdown tables (every field is in the JSON).
TABLE = ["lc_win_rate", "lc_win_rate_vs_base", "win_rate_vs_reference", "win_rate_vs_base", "output_chars_mean",
         "truncated_share", "reference_nll_gpt4", "safety_score", "safety_jailbreak", "over_refusal", "mc1", "mc2",
         "mc1_chat", "mc2_chat", "ti"]
PAIRED = ["lc_win_rate", "lc_win_rate_vs_base", "reference_nll_gpt4", "safety_score", "safety_jailbreak",
          "over_refusal", "mc2", "mc2_chat", "ti"]


def _fields(reference: str) -> dict[str, tuple[str, str]]:
    return {f: (axis, key.replace(REFERENCE, reference)) for f, (axis, key) in {**FIELDS, **EXTRA}.items()}


def _pick(metric: dict | None, keys=("value", "n", "ci", "digits", "verdict")) -> dict | None:
    if metric is None:
        return None
    return {k: metric[k] for k in keys if k in metric}


def n_per_set(system: dict) -> dict[str, int]:
    """{prompt set: prompts evaluated} from a system's per-prompt values."""
    out: dict[str, int] = {}
    for entry in (system.get("per_prompt") or {}).values():
        out[entry["set"]] = len(entry.get("values", entry.get("pref", [])))
    return dict(sorted(out.items()))


def system_row(name: str, system: dict, systems: dict, reference: str = "text_davinci_003") -> dict:
    """The bench fields of one system (None where the run did not measure one, with a note).

    Args:
        name, system: one system of the run's results.json.
        systems: all of them (the oracle borrows expert_helpful's cost).
        reference: the AlpacaEval reference of the eval config (the LC headline is against it).
    """
    fields = _fields(reference)
    metrics = system["metrics"]
    row = {field: _pick(metrics.get(axis, {}).get(key)) for field, (axis, key) in fields.items()}
    notes = []
    if name == "base":
        for field in ("win_rate_vs_base", "lc_win_rate_vs_base"):
            if row[field] is None and row["win_rate_vs_reference"]:
                row[field] = {"value": 50.0, "n": row["win_rate_vs_reference"]["n"], "ci": [50.0, 50.0]}
        notes.append("win rates vs base of base are 50 by definition (AlpacaEval: a tie with itself)")
    if name == "oracle":
        source = systems["expert_helpful"]["metrics"].get("efficiency", {})
        for field in ("decode_tokens_per_s_bs1", "peak_rss_mb"):
            row[field] = _pick(source.get(fields[field][1]))
        notes.append("oracle: each benchmark's numbers from its own expert (composed, not generated); its cost is "
                     "one peft adapter's (expert_helpful's measurement) plus a perfect router that does not exist; "
                     "it has no per-prompt values, so no paired differences")
    row["n_per_set"] = n_per_set(system)
    row["torch_threads"] = system.get("torch_threads")
    row["notes"] = notes
    return row


def paired_block(comparisons: dict, systems: dict, reference: str = "text_davinci_003", focus: str = "mocae",
                 base: str = "base") -> dict:
    """MoCaE-minus-X (``paired``) and X-minus-base (``paired_vs_base``) in bench field names.

    Args:
        comparisons: results.json's "comparisons" ({"a-b": {"axis/metric": diff}}).
        systems: results.json's systems (every other system gets an entry, with a note if unpaired).

    Returns:
        {"paired": {X: {field: {value, n, ci, verdict}}}, "paired_vs_base": {X: {...}}}.
    """
    keys = {f"{axis}/{key}": field for field, (axis, key) in _fields(reference).items()}

    def rename(diffs: dict | None) -> dict:
        if diffs is None:
            return {"note": "no paired interval: this system kept no per-prompt values (composed)"}
        return {keys[k]: _pick(d) for k, d in diffs.items() if k in keys}

    return {"paired": {x: rename(comparisons.get(f"{focus}-{x}")) for x in systems if x != focus},
            "paired_vs_base": {x: rename(comparisons.get(f"{x}-{base}")) for x in systems if x != base}}


def cost_comparison(systems: dict, a: str = "mocae", b: str = "h3fusion") -> dict | None:
    """Weights, weights+activations memory and bs-1 decode latency of ``a`` vs ``b`` (same run)."""
    if a not in systems or b not in systems or not systems[a].get("efficiency") or not systems[b].get("efficiency"):
        return None

    def cost(system: dict) -> dict:
        e = system["efficiency"]
        return {"weights_mb": e["weights_mb"],
                "weights_and_activations_mb": round(e["peak_rss_mb"] - e["rss_before_load_mb"], 1),
                "peak_rss_mb": e["peak_rss_mb"],
                "decode_ms_per_token_bs1": round(1000 / e["batch_1"]["decode_tokens_per_s"]["value"], 2)}
    ca, cb = cost(systems[a]), cost(systems[b])
    return {a: ca, b: cb, f"{a}_vs_{b}_pct": {k: round((ca[k] - cb[k]) / cb[k] * 100, 1) for k in ca},
            "note": "negative = MoCaE uses less / is faster. weights_and_activations = peak RSS minus the child "
                    "process' RSS before loading (Python, torch, transformers). MoCaE's RSS includes the MiniLM "
                    "router encoder; its weights_mb does not."}


def _cell(metric: dict | None) -> str:
    if metric is None:
        return "-"
    digits = metric.get("digits", 1)
    low, high = metric["ci"]
    return f"{metric['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] (n={metric['n']})"


def _diff(d: dict | None) -> str:
    if not d or "value" not in d:
        return "-"
    low, high = d["ci"]
    digits = 3 if max(abs(low), abs(high)) < 1 else 1
    return f"{d['value']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] {d['verdict']}"


def markdown(report: dict) -> str:
    reference = report.get("reference", "text_davinci_003")
    lines = [f"# Benchmark: {report['backbone']}", "",
             f"`{report['command']}` on {report['date']}; {report['machine']}; run `{report['run_dir']}`"
             + (f"; wall time of this invocation {report['wall_time_s']:.0f} s." if report["wall_time_s"] is not None
                else " (assembled from the landed files: each system's time is its sitting's)."), "",
             f"**Headline helpfulness metric: the length-controlled win rate vs {reference} (`{HEADLINE}`)**, "
             "AlpacaEval 2's GLM at equal answer length: our judge's raw win rate follows length, so the raw "
             "figures are shown beside it, with answer length and the share of answers cut at the token limit.", "",
             "| system | " + " | ".join(TABLE) + " |", "|---|" + "---|" * len(TABLE)]
    for name, row in report["systems"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[f]) for f in TABLE) + " |")
    lines += ["", "Percentages with 95% bootstrap intervals over prompts and n; win rates and safety by our trained "
              "judges (validation in the run's results.md), over-refusal by string match, MC1/MC2 by lm-eval "
              "(primer: 6-shot QA; chat: the question as the user turn), NLLs in nats per token (lower is better).",
              "", "Prompts per set:", ""]
    for name, row in report["systems"].items():
        sizes = ", ".join(f"{k} {v}" for k, v in row["n_per_set"].items()) or "composed (see notes)"
        lines.append(f"- {name}: {sizes}")
    lines += ["", "## MoCaE minus every other system (paired over the same prompts)", "",
              "Each cell: difference [95% paired bootstrap interval] and the verdict: better or worse only where the "
              "interval excludes zero, within noise otherwise (lower is better for over-refusal and NLL).", "",
              "| mocae − X | " + " | ".join(PAIRED) + " |", "|---|" + "---|" * len(PAIRED)]
    for name, diffs in report["paired"].items():
        lines.append(f"| {name} | " + " | ".join(_diff(diffs.get(f)) for f in PAIRED) + " |")
    lines += ["", "## Every system minus base (paired)", "", "| X − base | " + " | ".join(PAIRED) + " |",
              "|---|" + "---|" * len(PAIRED)]
    for name, diffs in report["paired_vs_base"].items():
        lines.append(f"| {name} | " + " | ".join(_diff(diffs.get(f)) for f in PAIRED) + " |")
    if report.get("resolution"):
        lines += ["", report["resolution"]]
    lines += targets.markdown(report.get("targets"))
    if report["mocae_vs_h3fusion"]:
        c = report["mocae_vs_h3fusion"]
        lines += ["", "## MoCaE vs H3Fusion: memory and latency (same run, each in its own process)", "",
                  "| | weights MB | weights + activations MB | peak RSS MB | decode ms/token (bs 1) |",
                  "|---|---|---|---|---|"]
        for name in ("mocae", "h3fusion"):
            r = c[name]
            lines.append(f"| {name} | {r['weights_mb']} | {r['weights_and_activations_mb']} | {r['peak_rss_mb']:.0f} "
                         f"| {r['decode_ms_per_token_bs1']} |")
        d = c["mocae_vs_h3fusion_pct"]
        lines.append(f"| change | {d['weights_mb']:+.1f}% | {d['weights_and_activations_mb']:+.1f}% | "
                     f"{d['peak_rss_mb']:+.1f}% | {d['decode_ms_per_token_bs1']:+.1f}% |")
        lines += ["", c["note"]]
    for name, c in report.get("cost_only", {}).items():
        lines += ["", f"## {name}: speed and memory only", "",
                  f"Not evaluated on the HHH sets: {c['reason']}. Decode (bs 1): "
                  f"{c['decode_tokens_per_s_bs1']['value']:.1f} tok/s; peak RSS {c['peak_rss_mb']:.0f} MB; "
                  f"weights {c['weights_mb']} MB."]
    notes = sorted({n for row in report["systems"].values() for n in row["notes"]} | set(report.get("notes", [])))
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def build_report(results: dict, meta: dict) -> dict:
    """The bench report (without cost-only systems) from a run's results.json and provenance ``meta``.

    Args:
        results: results.json of the run (systems, comparisons, config, judges, torch_threads).
        meta: {"backbone", "preset", "overrides", "command", "date", "machine", "run_dir", "wall_time_s",
            "config"}.
    """
    from mocae.evaluation.report import resolution_sentence

    systems = results["systems"]
    reference = (results.get("config") or {}).get("reference", "text_davinci_003")
    rows = {name: system_row(name, s, systems, reference) for name, s in systems.items()}
    threads = sorted({t for t in [results.get("torch_threads"), *(r["torch_threads"] for r in rows.values())]
                      if t is not None})
    notes = []
    if len(threads) > 1:
        notes.append(f"systems were evaluated under different torch thread counts {threads}: MC2 moves in the "
                     "third decimal with the thread count, so compare them with that in mind")
    return {**meta, "reference": reference, "headline": HEADLINE, "torch_threads": threads,
            "systems": rows, **paired_block(results.get("comparisons") or {}, systems, reference),
            "resolution": resolution_sentence(results), "mocae_vs_h3fusion": cost_comparison(systems),
            "cost_only": {}, "judges": results.get("judges"), "targets": targets.check(results), "notes": notes}


def landed_results(land_to: Path, systems: list[str], eval_config: dict, judges: dict | None = None) -> dict:
    """A results.json-like dict of the systems landed in ``land_to`` so far, in the order of ``systems``.

    Each system is the result ``landed.json`` names (its key); the oracle is composed when the
    three experts have landed; comparisons are recomputed over the landed per-prompt values, so
    systems landed by different sittings (their own run folders) are paired with each other too.

    Args:
        eval_config: the run's eval config (n_boot, seed, reference), as results.json's "config".
        judges: the judges' validation (results.json's "judges"), when a run folder has it.
    """
    from mocae.baselines.oracle import oracle_result
    from mocae.evaluation.compare import compare_systems

    manifest_path = land_to / "landed.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    results = {"config": eval_config, "systems": {}, "judges": judges, "evaluated": {}}
    for name in systems:
        key = (manifest.get(name) or {}).get("key")
        path = land_to / "systems" / f"{name}-{key}.json"
        if name == "oracle":
            try:
                results["systems"][name] = oracle_result(results)
            except ValueError:
                continue  # an expert has not landed yet
        elif key and path.is_file():
            results["systems"][name] = json.loads(path.read_text(encoding="utf-8"))
            results["evaluated"][name] = {"key": key}
    threads = {s.get("torch_threads") for s in results["systems"].values()} - {None}
    results["torch_threads"] = threads.pop() if len(threads) == 1 else None
    results["comparisons"] = compare_systems(results)
    return results


def interim_markdown(report: dict, missing: list[str]) -> str:
    """The bench tables of the systems landed so far, headed by what is missing (not the result yet)."""
    head = (f"> **Interim: {len(report['systems'])} systems landed, {len(missing)} to go "
            f"({', '.join(missing) or 'none'}).** Rewritten as each system lands; the benchmark's result is "
            "`bench_<backbone>.md`, written once every system has landed and speed and memory were measured "
            "together. Differences between landed systems are final (same prompts, paired); targets that need a "
            "missing system are undecided.\n\n")
    return head + markdown(report)


def write_interim(land_to: Path, cfg, run_dir: Path | None, command: str, systems: list[str] | None = None) -> Path:
    """Write ``land_to/interim.md`` from the landed systems (see :func:`landed_results`).

    Args:
        systems: the whole bench's systems (the preset's list); a sitting's own ``systems=[...]``
            is only its part, and the report pairs every landed system whichever sitting landed it.

    Returns:
        The path written.
    """
    import torch

    from mocae.paths import atomic_write_text

    run_results = run_dir / "eval" / "results.json" if run_dir else None
    judges = json.loads(run_results.read_text(encoding="utf-8")).get("judges") if run_results and \
        run_results.is_file() else None
    systems = [*(systems or []), *(n for n in cfg.systems if n not in (systems or []))]
    results = landed_results(land_to, systems, cfg.eval.model_dump(mode="json"), judges)
    report = build_report(results, {
        "backbone": cfg.backbone, "preset": cfg.name, "overrides": [], "command": command,
        "date": time.strftime("%Y-%m-%d"), "run_dir": str(run_dir), "wall_time_s": None,
        "machine": f"{platform.machine()}, torch {torch.__version__} (threads per system in landed.json)"})
    missing = [n for n in systems if n not in results["systems"]]
    atomic_write_text(land_to / "interim.md", interim_markdown(report, missing))
    return land_to / "interim.md"


def _sittings(args, cfg) -> Path:
    """Run the pipeline on growing prefixes of the preset's systems, landing each as it finishes.

    Each prefix reuses every stage and evaluation of the one before (they are keyed by what made
    them), so stopping anywhere loses at most the system in progress.
    """
    import landing

    from mocae.config import config_hash
    from mocae.pipeline import run_pipeline

    run_dir = Path(args.run_dir or Path("runs") / f"bench-{cfg.backbone}-{config_hash(cfg)}")
    land_to = landing.landing_dir(cfg.backbone)
    restored = landing.restore(land_to, run_dir)
    if restored:
        print(f"[bench] restored {len(restored)} landed files from {land_to}", flush=True)
    for folder in landing.restore_run_experts(cfg, args.experts_from):
        print(f"[bench] expert {folder} restored from commit {args.experts_from}", flush=True)
    sitting = f"{time.strftime('%Y-%m-%d')} python {' '.join(sys.argv)}"
    git = threading.Lock()  # the answer lander and the system lander both commit
    current: list[str] = []

    def land_answers() -> None:
        with git:
            landed = landing.land_answers(land_to, landing.model_ids(run_dir, list(current)))
            if landed and args.commit:
                landing.commit(landed, f"bench {cfg.backbone}: {current[-1]}'s finished answer sets landed before "
                                       f"its evaluation completed (a fresh machine regenerates only the rest)")
        if landed:
            print(f"[bench] {len(landed)} finished answer files of {current[-1]} landed", flush=True)

    stop = threading.Event()

    def every(seconds: float) -> None:
        while not stop.wait(seconds):
            land_answers()

    if args.land_answers_every > 0:
        threading.Thread(target=every, args=(args.land_answers_every,), daemon=True).start()
    try:
        for i, name in enumerate(cfg.systems):
            # Another sitting on another system list (side by side, one thread each) may have
            # landed this system meanwhile: take its result rather than measuring it twice.
            if i and (picked := landing.restore(land_to, run_dir)):
                print(f"[bench] {len(picked)} files another sitting landed restored", flush=True)
            current.append(name)
            prefix = f"systems=[{', '.join(cfg.systems[:i + 1])}]"
            # Speed and memory are not measured system by system across sittings (and machines):
            # all systems together in one run at one thread count, once every system has landed.
            # lazy: a trained system whose evaluation was restored is not retrained to be reused.
            run_pipeline(args.preset, run_dir=run_dir, overrides=[*args.set, prefix, "efficiency.enabled=false"],
                         progress=False, lazy=True)
            with git:
                landed = landing.land(land_to, run_dir, name, sitting)
                bench_systems = getattr(args, "bench_systems", None)
                landed.append(write_interim(land_to, cfg, run_dir, sitting, bench_systems))
                print(f"[bench] {name} landed ({len(landed)} paths)", flush=True)
                if args.commit and landing.commit(landed, f"bench {cfg.backbone}: {name} evaluated under the "
                                                           f"issue-12 protocol and landed (resumable on a fresh machine)"):
                    print(f"[bench] {name} committed", flush=True)
    finally:  # an interrupted sitting still lands the answer sets it finished
        stop.set()
        if current:
            land_answers()
    if args.cost:
        print("[bench] every system landed: speed and memory of all of them in one run", flush=True)
        run_pipeline(args.preset, run_dir=run_dir, overrides=args.set, progress=False, lazy=True)
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset overrides")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--cost-only", nargs="*", default=[], metavar="SYSTEM",
                        help="systems of the run measured for speed and memory only (e.g. one too slow to "
                             "generate every eval set here); reported apart, with the reason")
    parser.add_argument("--cost-only-reason", default="", help="why those systems were not evaluated")
    parser.add_argument("--land", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the systems one at a time, in the preset's order, and land each finished one "
                             "in benchmarks/results/bench_<backbone>/ (restored at the start of the next sitting, "
                             "even on a fresh machine: benchmarks/landing.py)")
    parser.add_argument("--cost", action=argparse.BooleanOptionalAction, default=True,
                        help="with --land, once every system has landed, measure speed and memory of all systems "
                             "together in one run (the sittings themselves skip it); --no-cost leaves it out")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit each system's landed files as it lands (only those files)")
    parser.add_argument("--land-answers-every", type=float, default=600.0, metavar="SECONDS",
                        help="with --land, also land (and with --commit, commit) the finished answer sets of the "
                             "system in progress this often, so a sitting cut off mid-system keeps them; 0 turns it off")
    parser.add_argument("--experts-from", default=None, metavar="COMMIT",
                        help="restore experts committed at COMMIT (de14fe1 holds the full preset's three and its multi-task expert) into "
                             "the cache before training, where their stage key matches (benchmarks/landing.py)")
    parser.add_argument("--interim", action="store_true",
                        help="only rewrite benchmarks/results/bench_<backbone>/interim.md from the systems landed so "
                             "far (paired with each other) and exit; sittings rewrite it as each system lands")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every sitting of this run (MC2 moves in the 3rd decimal between 1 "
                             "and 2 threads: systems compared side by side should share one count; recorded)")
    args = parser.parse_args()
    # `kill` (a sitting's end) runs the same cleanup as Ctrl-C: the finished answer sets still land.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    import torch

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    from mocae.paths import atomic_write_json, atomic_write_text
    from mocae.pipeline import load_run_config, run_pipeline

    start = time.time()
    cfg = load_run_config(args.preset, args.set)
    # the whole bench's systems: a sitting's `--set systems=[...]` names only its own part
    args.bench_systems = load_run_config(
        args.preset, [o for o in args.set if o.split("=")[0].strip() != "systems"]).systems
    import landing

    if args.interim:
        path = write_interim(landing.landing_dir(cfg.backbone), cfg, Path(args.run_dir) if args.run_dir else None,
                             "python " + " ".join(sys.argv), args.bench_systems)
        print(path.read_text(encoding="utf-8"))
        return 0
    if args.land:
        run_dir = _sittings(args, cfg)
        if not args.cost:
            # A sitting without the joint cost run is one part of the bench (its own system list, no speed
            # or memory): interim.md, rewritten as systems landed, stands for it; the headline files are
            # written only by the run that measures every system together.
            print(f"[bench] sitting done; the bench so far: {landing.landing_dir(cfg.backbone) / 'interim.md'}",
                  flush=True)
            return 0
    else:
        run_dir = run_pipeline(args.preset, run_dir=args.run_dir, overrides=args.set, progress=False)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    report = build_report(results, {
        "backbone": cfg.backbone, "preset": args.preset, "overrides": args.set,
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "run_dir": str(run_dir), "wall_time_s": round(time.time() - start, 1), "config": cfg.model_dump(mode="json")})
    if args.cost_only:
        from mocae.evaluation.harness import eval_prompts
        from mocae.pipeline import measure_systems

        measured_cfg = cfg.model_copy(update={"systems": args.cost_only})
        prompts = [e.prompt for e in eval_prompts(cfg.eval)["alpaca_eval"][:cfg.efficiency.n_prompts]]
        for name, e in measure_systems(measured_cfg, run_dir, prompts).items():
            report["cost_only"][name] = {"reason": args.cost_only_reason,
                                         "decode_tokens_per_s_bs1": e["batch_1"]["decode_tokens_per_s"],
                                         "peak_rss_mb": e["peak_rss_mb"], "weights_mb": e["weights_mb"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{cfg.backbone}"  # not Path.with_suffix: "qwen2.5-coder-0.5b" has dots
    atomic_write_json(RESULTS / f"{stem}.json", report)
    atomic_write_text(RESULTS / f"{stem}.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
