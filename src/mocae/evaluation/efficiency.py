"""Inference cost: prefill and decode throughput at several batch sizes, peak memory, size.

Prefill is timed as one forward pass over the (left-padded) prompts; decode as the rest of a
``generate`` call forced to produce exactly ``new_tokens`` tokens (``min_new_tokens``), so
decode tokens/s = batch * new_tokens / (generate time - prefill time). The best of
``repeats`` runs is reported (the machine is shared: the fastest run is the least disturbed),
with the range over runs beside it.
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (everything loaded, not only the model).

    Linux: VmHWM, which starts afresh at exec. (ru_maxrss is carried across fork + exec, so a
    child process would report its parent's peak.)
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def parameter_counts(model) -> dict:
    """{"total", "adapter"}: all parameters, and the LoRA / router ones among them."""
    total = adapter = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if "lora_" in name or name.startswith("router."):
            adapter += p.numel()
    return {"total": total, "adapter": adapter}


def _batch(tokenizer, prompts: list[str], size: int):
    from mocae.generation import chat_prompt

    chosen = [prompts[i % len(prompts)] for i in range(size)]  # repeat prompts if there are too few
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer([chat_prompt(tokenizer, p) for p in chosen], return_tensors="pt", padding=True,
                         add_special_tokens=False)
    finally:
        tokenizer.padding_side = side


def _rate(tokens: float, seconds: list[float]) -> dict:
    rates = [tokens / max(s, 1e-9) for s in seconds]
    return {"value": max(rates), "n": len(rates), "ci": [min(rates), max(rates)], "ci_kind": "range over repeats"}


@torch.inference_mode()
def measure_efficiency(model, tokenizer, prompts: list[str], batch_sizes=(1, 16), new_tokens: int = 32,
                       repeats: int = 2) -> dict:
    """Prefill and decode throughput per batch size, peak RSS and parameter count.

    Args:
        model, tokenizer: a causal LM (MoCaEModel included: its forward and generate route).
        prompts: chat prompts to time (cycled when a batch needs more).
        batch_sizes: batch sizes to measure.
        new_tokens: tokens generated per sequence.
        repeats: timed runs per batch size (after one untimed warm-up).

    Returns:
        {"batch_<b>": {"prefill_tokens_per_s", "decode_tokens_per_s", "prompt_tokens"}, "peak_rss_mb",
         "parameters": {"total", "adapter"}, "new_tokens", "threads"}.
    """
    if not prompts:
        raise ValueError("measure_efficiency needs at least one prompt")
    if repeats < 1 or new_tokens < 1:
        raise ValueError("measure_efficiency needs repeats >= 1 and new_tokens >= 1")
    from mocae.device import inference_autocast

    was_training = model.training
    model.eval()
    result: dict = {}
    try:
        for size in batch_sizes:
            batch = {k: v.to(model.device) for k, v in _batch(tokenizer, prompts, size).items()}
            prompt_tokens = int(batch["attention_mask"].sum())

            def prefill():
                with inference_autocast(model.device):
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

            def generate():
                with inference_autocast(model.device):
                    model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)

            # Warm-up: first calls allocate buffers and pick kernels.
            prefill()
            model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            prefill_s, total_s = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                prefill()
                prefill_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                generate()
                total_s.append(time.perf_counter() - start)
            decode_s = [max(t - p, 1e-9) for t, p in zip(total_s, prefill_s)]
            result[f"batch_{size}"] = {"prefill_tokens_per_s": _rate(prompt_tokens, prefill_s),
                                       "decode_tokens_per_s": _rate(size * new_tokens, decode_s),
                                       "prompt_tokens": prompt_tokens}
    finally:
        model.train(was_training)
    result.update(peak_rss_mb=peak_rss_mb(), parameters=parameter_counts(model), new_tokens=new_tokens,
                  threads=torch.get_num_threads())
    return result


def efficiency_metrics(efficiency: dict) -> dict:
    """Flatten :func:`measure_efficiency` output into report metrics ({"value", "n", "ci"} each)."""
    out = {}
    for key, row in efficiency.items():
        if key.startswith("batch_"):
            size = key.removeprefix("batch_")
            out[f"prefill_tokens_per_s_b{size}"] = row["prefill_tokens_per_s"]
            out[f"decode_tokens_per_s_b{size}"] = row["decode_tokens_per_s"]
    for key, value in (("peak_rss_mb", efficiency["peak_rss_mb"]), ("parameters", efficiency["parameters"]["total"])):
        out[key] = {"value": float(value), "n": 1, "ci": [float(value), float(value)]}  # one measurement
    return out
