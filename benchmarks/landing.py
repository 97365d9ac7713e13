"""Land a benchmark system by system in the repository, so a run survives a fresh machine.

A bench of every system at the protocol's sizes takes longer than one sitting, and the next
sitting may start on a machine whose caches (``$MOCAE_CACHE``) are gone. What a later sitting
needs to carry on without redoing finished work is small, and lands in
``benchmarks/results/bench_<backbone>/`` as each system finishes:

  systems/<name>-<key>.json   the system's evaluation (every metric with its per-prompt values,
                              so later systems are still paired with it); <key> covers the eval
                              config, the judges, the prompts and the system's weights
  base/model_outputs.json     the base answers every win rate vs base is judged against
  generations/*.json          the system's cached answers: a system re-evaluated because a judge
                              was retrained is re-judged, not regenerated
  contamination/check-*.json  the passing contamination verdict (keyed by the data files' contents):
                              a fresh machine skips the ~15-50 min near-duplicate check it proves
  landed.json                 per system: its key, weights fingerprint, threads, date, sitting

``restore`` copies it all back (into the run folder and the cache) before a sitting; a restored
file is used only where its key still matches what the run would compute, so a changed config,
judge or expert is measured again rather than trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from mocae.paths import atomic_write_bytes, atomic_write_json, cache_dir

RESULTS = Path(__file__).parent / "results"


def landing_dir(backbone: str) -> Path:
    """``benchmarks/results/bench_<backbone>/``."""
    return RESULTS / f"bench_{backbone}"


@contextlib.contextmanager
def _landing_lock() -> Iterator[None]:
    """Held while a sitting commits or updates ``landed.json``.

    Sittings may run side by side (one thread each: the bench on two system lists, or the bench
    and the ablation) and both land: git's own index.lock makes the second commit fail instead of
    wait, and two read-modify-writes of ``landed.json`` would drop one system. They queue here.
    """
    repo = Path(__file__).resolve().parent.parent
    with open(repo / ".git" / "mocae-landing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _copy_file(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, Path(src).read_bytes())


def _generation_files(model_id: str, generations: Path) -> list[Path]:
    """The cached answer and score files of the system whose answers carry ``model_id``.

    Exact, not by name: the cache is shared by every run of the machine, and another backbone's
    base (restored from its own landing folder) is also ``base-...``.
    """
    found = []
    for path in sorted(generations.glob("*.json")):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("model_id") == model_id:
                found.append(path)
        except (OSError, ValueError, AttributeError):
            continue  # a damaged cache file is the harness' business (it warns and regenerates)
    return found


def model_ids(run_dir: Path, names: list[str]) -> list[str]:
    """The answers' ``model_id`` of each of ``names`` the run folder knows.

    A finished system's result records it; the system being evaluated is named in
    ``eval/in_progress.json`` (written by the harness before its first answer).
    """
    found = {}
    progress = run_dir / "eval" / "in_progress.json"
    if progress.is_file():
        marker = json.loads(progress.read_text(encoding="utf-8"))
        found[marker["name"]] = marker["model_id"]
    results = run_dir / "eval" / "results.json"
    evaluated = json.loads(results.read_text(encoding="utf-8")).get("evaluated", {}) if results.is_file() else {}
    for name in names:
        if name in evaluated:
            path = run_dir / "eval" / "systems" / f"{name}-{evaluated[name]['key']}.json"
            if path.is_file():
                found[name] = json.loads(path.read_text(encoding="utf-8")).get("model_id") or found.get(name)
    return [found[n] for n in names if found.get(n)]


def _land_verdicts(land_to: Path) -> list[Path]:
    """The cached passing contamination verdicts ``land_to`` lacks (only passes are cached)."""
    landed = []
    for verdict in sorted((cache_dir() / "contamination").glob("check-*.json")):
        if not (land_to / "contamination" / verdict.name).is_file():
            _copy_file(verdict, land_to / "contamination" / verdict.name)
            landed.append(land_to / "contamination" / verdict.name)
    return landed


def land_answers(land_to: Path, model_ids: list[str]) -> list[Path]:
    """Copy the finished answer and score files carrying ``model_ids`` that ``land_to`` lacks.

    A cache file is written once its whole prompt set is done, so any file present is finished:
    landing them while a system is still being evaluated keeps an interrupted sitting's sets.
    The data's passing contamination verdict lands with them (the check runs before any system).

    Returns:
        The newly landed paths (to commit); a file already landed with the same bytes is skipped.
    """
    land_to = Path(land_to)
    landed = _land_verdicts(land_to)
    for model_id in model_ids:
        for path in _generation_files(model_id, cache_dir() / "generations"):
            dst, data = land_to / "generations" / path.name, path.read_bytes()
            if not (dst.is_file() and dst.read_bytes() == data):
                atomic_write_bytes(dst, data)
                landed.append(dst)
    return landed


def restore_experts(commit: str, backbone: str, expected: dict[str, Path], repo: Path | None = None) -> list[str]:
    """Copy experts an earlier sitting committed (at ``commit``, since removed from the tree) into the cache.

    Weights are no longer landed, but the three experts of session 6 stay in the history of
    commit 4af501e, and with the multi-task expert in de14fe1 (the same blobs, removed from the
    tree in the next commit): reading them back costs a fresh machine seconds instead of two hours
    of training and adds nothing to the tree. An expert is restored only where its folder name (the
    first 12 hex digits of its stage key) and its ``stage.json`` key both match what this config
    trains, and only where the cache has no finished expert of its own; ``training.json`` is
    written last, so a cut-off restore is not taken for a finished expert.

    Args:
        commit: the commit whose ``benchmarks/results/bench_<backbone>/experts/`` holds them.
        expected: {axis: the expert folder this config would train} (``expert_dir``).
        repo: the git repository to read (default: this one).

    Returns:
        The folders restored.

    Raises:
        ValueError: ``commit`` holds no expert folder of ``backbone``.
    """
    repo = repo or Path(__file__).resolve().parent.parent
    prefix = f"benchmarks/results/bench_{backbone}/experts/"
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", commit, "--", prefix], cwd=repo,
                             capture_output=True, text=True)
    files = listing.stdout.split()
    if listing.returncode or not files:
        raise ValueError(f"commit {commit} holds no experts under {prefix} ({listing.stderr.strip() or 'empty'})")
    def show(path: str) -> bytes:
        return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=repo, capture_output=True, check=True).stdout

    restored = []
    for folder in map(Path, expected.values()):
        mine = sorted(f for f in files if f.startswith(f"{prefix}{folder.name}/"))
        if not mine or (folder / "training.json").is_file():
            continue
        stage = json.loads(show(f"{prefix}{folder.name}/stage.json"))
        if not folder.name.endswith(str(stage.get("key", ""))[:12]):
            continue  # same name, other inputs: train it afresh
        for f in sorted(mine, key=lambda f: f.endswith("/training.json")):  # training.json last
            atomic_write_bytes(folder / f[len(prefix) + len(folder.name) + 1:], show(f))
        restored.append(str(folder))
    return restored


def restore_run_experts(cfg, commit: str | None) -> list[str]:
    """``restore_experts`` for every expert of run config ``cfg``, and its multi-task expert when the run
    has that system (nothing when ``commit`` is None)."""
    if not commit:
        return []
    from mocae.experts.train import expert_dir

    expected = {a: expert_dir(c) for a, c in cfg.expert_configs().items()}
    if "multitask" in cfg.systems:
        expected["multitask"] = expert_dir(cfg.multitask_config())
    return restore_experts(commit, cfg.backbone, expected)


def restore(land: Path, run_dir: Path) -> list[str]:
    """Copy what earlier sittings landed in ``land`` into ``run_dir`` and the cache.

    Nothing already present is overwritten: a file of this machine is at least as current.

    Returns:
        The paths copied.
    """
    land, run_dir = Path(land), Path(run_dir)
    copied = []
    if not land.is_dir():
        return copied
    pairs = [(p, run_dir / "eval" / "systems" / p.name) for p in sorted((land / "systems").glob("*.json"))]
    pairs += [(p, run_dir / "eval" / "base" / p.name) for p in sorted((land / "base").glob("*.json"))]
    pairs += [(p, cache_dir() / "generations" / p.name) for p in sorted((land / "generations").glob("*.json"))]
    pairs += [(p, cache_dir() / "contamination" / p.name) for p in sorted((land / "contamination").glob("check-*.json"))]
    for src, dst in pairs:
        if not dst.exists():
            _copy_file(src, dst)
            copied.append(str(dst))
    return copied


def land(land_to: Path, run_dir: Path, name: str, sitting: str) -> list[Path]:
    """Copy system ``name``'s finished evaluation into ``land_to``.

    Args:
        run_dir: the bench's run folder (its ``eval/results.json`` lists the system's key).
        sitting: who landed it (e.g. the date and the command), recorded in ``landed.json``.

    Returns:
        The landed paths (to commit), with the system's earlier result it replaced (removed).

    Raises:
        KeyError: the run's results do not hold ``name`` (it was not evaluated).
    """
    land_to, run_dir = Path(land_to), Path(run_dir)
    results = json.loads((run_dir / "eval" / "results.json").read_text(encoding="utf-8"))
    evaluated = results.get("evaluated", {})
    if name not in results["systems"]:
        raise KeyError(f"{run_dir / 'eval' / 'results.json'} holds no system {name!r}: it was not evaluated")
    landed: list[Path] = []
    if name in evaluated:  # the oracle is composed from the experts' rows: nothing of its own to land
        key = evaluated[name]["key"]
        src = run_dir / "eval" / "systems" / f"{name}-{key}.json"
        for old in (land_to / "systems").glob(f"{name}-*.json"):  # one result per system: the current one
            if old.name != src.name:
                old.unlink()
                landed.append(old)  # committed as a removal with the rest
        _copy_file(src, land_to / "systems" / src.name)
        landed.append(land_to / "systems" / src.name)
        model_id = json.loads(src.read_text(encoding="utf-8")).get("model_id")
        for path in _generation_files(model_id, cache_dir() / "generations") if model_id else []:
            _copy_file(path, land_to / "generations" / path.name)
            landed.append(land_to / "generations" / path.name)
        if name == "base":
            src = run_dir / "eval" / "base" / "model_outputs.json"
            _copy_file(src, land_to / "base" / src.name)
            landed.append(land_to / "base" / src.name)
    landed += _land_verdicts(land_to)
    manifest_path = land_to / "landed.json"
    result = results["systems"][name]
    with _landing_lock():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
        entry = {"key": evaluated.get(name, {}).get("key"),
                 "weights": (evaluated.get(name, {}).get("inputs") or {}).get("model"),
                 "torch_threads": result.get("torch_threads"), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "sitting": sitting}
        if entry["key"] is None:  # composed (the oracle): the same when its figures are the same
            entry["metrics_sha256"] = hashlib.sha256(json.dumps(
                [result.get("composed_from"), result.get("metrics")], sort_keys=True).encode()).hexdigest()[:16]
        before = manifest.get(name, {})
        if all(before.get(k) == v for k, v in entry.items() if k not in ("date", "sitting")):
            entry |= {"date": before["date"], "sitting": before["sitting"]}  # the same result, restored: not re-dated
        manifest[name] = entry
        atomic_write_json(manifest_path, manifest)
    landed.append(manifest_path)
    return landed


def commit(paths: list[Path], message: str) -> bool:
    """``git add`` + ``git commit`` of ``paths`` (only them); False when there was nothing new."""
    repo = Path(__file__).resolve().parent.parent
    with _landing_lock():
        subprocess.run(["git", "add", "--force", "--", *map(str, paths)], cwd=repo, check=True)
        staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *map(str, paths)], cwd=repo)
        if staged.returncode == 0:
            return False
        subprocess.run(["git", "commit", "-q", "-m", message, "--", *map(str, paths)], cwd=repo, check=True)
        return True
