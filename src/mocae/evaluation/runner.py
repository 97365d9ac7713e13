"""Generation for evaluation, cached so that re-evaluating a system costs nothing.

Outputs are keyed by (model id, prompt set, generation config, hash of the prompts) and stored
as one JSON file per key. The model id should change whenever the weights do:
:func:`model_fingerprint` gives one computed from the parameters (and a MoCaE calibrator).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mocae.paths import atomic_write_json


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


def generate_cached(model, tokenizer, model_id: str, prompt_set: str, prompts: list[str],
                    gen: GenerationConfig, cache_dir: Path, progress: bool = True) -> list[str]:
    """Answers to ``prompts``, read from the cache when this exact request was made before.

    Args:
        model, tokenizer: any causal LM with ``generate`` (a MoCaEModel routes per prompt).
        model_id: identifies the weights (e.g. ``f"{name}-{model_fingerprint(model)}"``).
        prompt_set: name of the prompt set (part of the key and of the file name).
        prompts: user messages.
        gen: generation settings.
        cache_dir: folder of cached outputs.
        progress: show a progress bar while generating.

    Returns:
        One answer per prompt, in prompt order.

    Raises:
        ValueError: no prompts.
    """
    if not prompts:
        raise ValueError(f"prompt set {prompt_set!r} is empty: nothing to generate")
    path = _cache_path(cache_dir, model_id, prompt_set, gen, prompts)
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if len(record.get("outputs", [])) == len(prompts):
            return record["outputs"]
    from mocae.generation import generate_batch

    outputs = generate_batch(model, tokenizer, prompts, max_new_tokens=gen.max_new_tokens,
                             batch_size=gen.batch_size, system=gen.system, progress=progress, desc=prompt_set)
    atomic_write_json(path, {"model_id": model_id, "prompt_set": prompt_set, "generation": gen.model_dump(),
                             "prompts_sha256": prompts_hash(prompts), "outputs": outputs})
    return outputs


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
