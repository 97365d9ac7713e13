"""Generation cached on disk, so that re-evaluating a system (or rebuilding MoTE's chains) costs nothing.

It sits below every package that generates (evaluation, the baselines), so none imports upwards.

Outputs are keyed by (model id, prompt set, generation config, hash of the prompts) and stored
as one JSON file per key, with each answer's generated-token count and whether it reached EOS;
every field is checked again on read (a stale or edited file is regenerated, with a warning). The model id should change whenever the weights do:
:func:`model_fingerprint` gives one computed from the parameters (and a MoCaE calibrator).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mocae.paths import atomic_write_json
from mocae.spec import capabilities_of

# Bump when the record's fields change: older files are then a cache miss, never misread.
CACHE_SCHEMA = 2


class GenerationConfig(BaseModel):
    """How evaluation answers are generated (always greedy: scores must be reproducible)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(256, gt=0, description="generation budget per answer")
    batch_size: int = Field(16, gt=0, description="prompts per left-padded batch")
    system: str | None = Field(None, description="optional system message for every prompt")


def prompts_hash(prompts: list[str]) -> str:
    """sha256 of the prompt list (order matters: outputs are stored in prompt order)."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def model_fingerprint(model) -> str:
    """A short id of a model's weights: changes when any parameter (or the calibrator) changes.

    Sums per tensor instead of hashing bytes: ~0.2 s for 135M parameters, and still different
    after any training step.
    """
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            d = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{d.sum().item():.10e}:{d.abs().sum().item():.10e}".encode())
    calibrator = getattr(model, "calibrator", None)
    if calibrator is not None and hasattr(calibrator, "state_dict"):
        h.update(json.dumps(calibrator.state_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: Path, model_id: str, prompt_set: str, gen: GenerationConfig, prompts: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([model_id, prompt_set, gen.model_dump(mode="json"), prompts_hash(prompts)])
                         .encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{prompt_set}")[:60]
    return Path(cache_dir) / f"{safe}-{key}.json"


@dataclass(frozen=True)
class Generations:
    """Answers to one prompt set, with what the decoder did per answer.

    Args:
        outputs: one answer per prompt, in prompt order.
        n_tokens: tokens generated per answer, up to (not counting) EOS.
        eos: whether each answer ended with EOS (False: it ran out of ``budget``).
        budget: tokens the decoder was allowed per answer.
    """

    outputs: list[str]
    n_tokens: list[int]
    eos: list[bool]
    budget: int

    @property
    def truncated(self) -> list[bool]:
        """Per answer: used the whole budget without reaching EOS (cut at the limit)."""
        return [not e and n >= self.budget for n, e in zip(self.n_tokens, self.eos)]


def _outputs_hash(outputs: list[str], n_tokens: list[int], eos: list[bool]) -> str:
    return hashlib.sha256(json.dumps([outputs, n_tokens, eos], ensure_ascii=False).encode()).hexdigest()


def _read_cache(path: Path, model_id: str, prompt_set: str, gen: GenerationConfig,
                prompts: list[str]) -> Generations | None:
    """The cached answers when ``path`` holds exactly this request, else None with a warning naming the file.

    Every field that made the answers is compared with the request (a renamed or hand-edited file
    must not pass), and a hash of the answers catches edits to the answers themselves.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return _stale(path, f"unreadable ({err})")
    if not isinstance(record, dict):
        return _stale(path, "not a JSON object")
    expected = {"schema": CACHE_SCHEMA, "model_id": model_id, "prompt_set": prompt_set,
                "generation": gen.model_dump(mode="json"), "prompts_sha256": prompts_hash(prompts)}
    wrong = [k for k, v in expected.items() if record.get(k) != v]
    if wrong:
        return _stale(path, f"does not match this request ({', '.join(wrong)} differ"
                            + ("; written by an older mocae" if "schema" in wrong else "") + ")")
    try:
        outputs, n_tokens, eos = record["outputs"], record["n_tokens"], record["eos"]
        ok = (len(outputs) == len(n_tokens) == len(eos) == len(prompts)
              and record.get("outputs_sha256") == _outputs_hash(outputs, n_tokens, eos))
    except (KeyError, TypeError) as err:
        return _stale(path, f"lacks a field ({err})")
    if not ok:
        return _stale(path, "its answers do not match their stored hash or the prompt count")
    return Generations(outputs, n_tokens, eos, int(record["budget"]))


def _stale(path: Path, why: str) -> None:
    warnings.warn(f"generation cache {path}: {why}; regenerating", stacklevel=3)
    return None


def cached_records(model_id: str, prompt_set: str, prompts: list[str], gen: GenerationConfig,
                   cache_dir: Path) -> Generations | None:
    """The answers :func:`generate_records` cached for exactly this request, or None (nothing generated)."""
    path = _cache_path(cache_dir, model_id, prompt_set, gen, prompts)
    return _read_cache(path, model_id, prompt_set, gen, prompts) if path.is_file() else None


def generate_records(model, tokenizer, model_id: str, prompt_set: str, prompts: list[str],
                     gen: GenerationConfig, cache_dir: Path, progress: bool = True) -> Generations:
    """Answers to ``prompts`` with per-answer token counts and EOS, cached and verified on read.

    A cache file is used only when its schema, model id, prompt set, generation config, prompt
    hash and answer hash all match this request; a corrupt or mismatched file is a miss that is
    regenerated (and overwritten) with a warning naming it.

    Args:
        model, tokenizer: any causal LM with ``generate`` (a MoCaEModel routes per prompt).
        model_id: identifies the weights (e.g. ``f"{name}-{model_fingerprint(model)}"``).
        prompt_set: name of the prompt set (part of the key and of the file name).
        prompts: user messages.
        gen: generation settings.
        cache_dir: folder of cached outputs.
        progress: show a progress bar while generating.

    Returns:
        :class:`Generations`, in prompt order.

    Raises:
        ValueError: no prompts.
    """
    if not prompts:
        raise ValueError(f"prompt set {prompt_set!r} is empty: nothing to generate")
    cached = cached_records(model_id, prompt_set, prompts, gen, cache_dir)
    if cached is not None:
        return cached
    path = _cache_path(cache_dir, model_id, prompt_set, gen, prompts)
    from mocae.generation import generate_batch

    outputs, n_tokens, eos = generate_batch(model, tokenizer, prompts, max_new_tokens=gen.max_new_tokens,
                                            batch_size=gen.batch_size, system=gen.system, progress=progress,
                                            desc=prompt_set, details=True)
    budget = gen.max_new_tokens + (model.reasoning_tokens if capabilities_of(model).step_decoding else 0)
    atomic_write_json(path, {"schema": CACHE_SCHEMA, "model_id": model_id, "prompt_set": prompt_set,
                             "generation": gen.model_dump(mode="json"), "prompts_sha256": prompts_hash(prompts),
                             "budget": budget, "outputs": outputs, "n_tokens": n_tokens, "eos": eos,
                             "outputs_sha256": _outputs_hash(outputs, n_tokens, eos)})
    return Generations(outputs, n_tokens, eos, budget)


def cached_scores(cache_dir: Path, model_id: str, kind: str, request: dict, compute):
    """A judge-free per-prompt score (reference NLL, TruthfulQA MC) of one model, cached like answers.

    Stored beside the generations as ``<kind>-<key>.json`` with its model id, so a system
    re-evaluated because a judge changed costs the judging only, not the forward passes again.
    A file is used only when its schema, model id, kind and request all match; anything else is a
    miss that is recomputed (with a warning when the file was unreadable or did not match).

    Args:
        model_id: identifies the weights (as for :func:`generate_records`).
        kind: what the score is (part of the file name).
        request: JSON-able description of everything else the score depends on (prompt hashes,
            batch size, precision, format).
        compute: ``() -> value``, JSON-able (e.g. a list of floats or a dict).
    """
    key = hashlib.sha256(json.dumps([model_id, kind, request], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', kind)[:60]}-{key}.json"
    expected = {"schema": CACHE_SCHEMA, "model_id": model_id, "kind": kind, "request": request}
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(record, dict) and all(record.get(k) == v for k, v in expected.items()) and "value" in record:
                return record["value"]
            _stale(path, "does not match this request")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            _stale(path, f"unreadable ({err})")
    value = compute()
    atomic_write_json(path, {**expected, "value": value})
    return value


def generate_cached(model, tokenizer, model_id: str, prompt_set: str, prompts: list[str],
                    gen: GenerationConfig, cache_dir: Path, progress: bool = True) -> list[str]:
    """The answers of :func:`generate_records` only (same arguments, cache and checks)."""
    return generate_records(model, tokenizer, model_id, prompt_set, prompts, gen, cache_dir, progress).outputs


def write_alpaca_eval_outputs(instructions: list[str], outputs: list[str], generator: str, path: Path,
                              datasets: list[str] | None = None) -> Path:
    """Write AlpacaEval's ``model_outputs.json`` so the official GPT-4 judge can be run on it.

    Args:
        instructions, outputs: AlpacaEval instructions and this system's answers.
        generator: the system's name (AlpacaEval's leaderboard key).
        path: output file.
        datasets: AlpacaEval's per-instruction source ("helpful_base", ...); default "alpaca_eval".

    Returns:
        The written path.
    """
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    if not instructions:
        raise ValueError("no AlpacaEval outputs to write")
    datasets = datasets or ["alpaca_eval"] * len(instructions)
    records = [{"instruction": i, "output": o, "generator": generator, "dataset": d}
               for i, o, d in zip(instructions, outputs, datasets, strict=True)]
    atomic_write_json(Path(path), records)
    return Path(path)
