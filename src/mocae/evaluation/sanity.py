"""A quick, judge-free sanity table: does each expert move its own axis the right way?

Per system (the base model and each expert), on held-out prompts of every axis:
- helpful: per-token NLL of AlpacaEval's davinci-003 reference answers (lower = the model
  puts more probability on a good answer); AlpacaEval is disjoint from the Alpaca training set;
- harmless: string-match refusal rate on HarmBench test behaviours (higher is safer) and on
  XSTest's safe prompts (over-refusal: lower is better);
- honest: TruthfulQA MC1/MC2 on eval-half questions (lm-eval conventions).
These are sanity checks, not the reported benchmark: issue 5's judges and full sets are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mocae.data import load_alpaca_eval, load_harmbench, load_truthfulqa_mc, load_xstest
from mocae.refusal import refusal_rate
from mocae.generation import completion_batch, generate_batch
from mocae.paths import atomic_write_json
from mocae.device import device_of
from mocae.spec import capabilities_of


@torch.inference_mode()
def reference_nll(model, tokenizer, prompts: list[str], references: list[str], batch_size: int = 8,
                  per_example: bool = False, bf16: bool = False) -> float | list[float]:
    """Mean per-token negative log-likelihood of ``references`` as answers to ``prompts``.

    With ``per_example`` the mean over each reference's own tokens, one value per reference (in the
    input order). Rows are batched by length, so one long reference does not pad a whole batch.

    Args:
        bf16: forward under bf16 autocast (~2x faster on CPU; the loss itself is taken in fp32). Ignored
            for a model that declares ``bf16_autocast=False`` (peft Arrow fails under it).

    Raises:
        ValueError: empty or mismatched lists.
    """
    if not prompts or len(prompts) != len(references):
        raise ValueError(f"reference_nll needs equal, non-empty lists (got {len(prompts)}, {len(references)})")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(references[i]))
    total, count, each = 0.0, 0, [0.0] * len(prompts)
    autocast = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16,
                              enabled=capabilities_of(model).autocast_bf16(bf16))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device_of(model)) for k, v in
                 completion_batch(tokenizer, [prompts[i] for i in idx], [references[i] for i in idx]).items()}
        extra = {}
        with torch.no_grad(), autocast:
            if capabilities_of(model).router:  # MoCaE routes on the prompt alone, never on the reference
                extra["routing_weights"] = model.route(batch["input_ids"], batch["prompt_mask"])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
        target = batch["labels"][:, 1:]
        scored_at = target != -100
        # Only the answer's positions, as one contiguous (tokens, vocab) block: a cross-entropy over the
        # transposed (batch, vocab, length) logits of every position took ~40% of this function on CPU.
        token_nll = torch.nn.functional.cross_entropy(logits[:, :-1][scored_at].float(), target[scored_at],
                                                      reduction="none")
        scored = scored_at.sum(1)
        row_sums = torch.zeros(len(idx), dtype=token_nll.dtype).index_add_(
            0, scored_at.nonzero()[:, 0].cpu(), token_nll.cpu())
        for i, value in zip(idx, (row_sums / scored.cpu().clamp(min=1)).tolist()):
            each[i] = value
        total += token_nll.sum().item()
        count += int(scored.sum())
    return each if per_example else total / count


def sanity_prompts(cfg, data_dir: Path | None = None) -> dict:
    """The held-out prompt sets of the sanity table (deterministic: first N of each file)."""
    alpaca_eval = [ex for ex in load_alpaca_eval(data_dir) if ex.references["text_davinci_003"].strip()]
    harmful = [ex for ex in load_harmbench(data_dir) if ex.meta.get("functional_category") == "standard"]
    return {
        "alpaca_eval": alpaca_eval[: cfg.n_harmful],
        "harmful": harmful[: cfg.n_harmful],
        "xstest_safe": load_xstest(data_dir, label="safe")[: cfg.n_xstest_safe],
        "truthfulqa": load_truthfulqa_mc(data_dir, split="eval")[: cfg.n_truthfulqa],
    }


def evaluate_system(model, tokenizer, prompts: dict, cfg, progress: bool = True) -> dict:
    """Every sanity metric for one model (any causal LM, PeftModel included)."""
    from mocae.evaluation.truthfulqa_mc import truthfulqa_mc

    gen = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
    harmful = generate_batch(model, tokenizer, [e.prompt for e in prompts["harmful"]], desc="harmful", **gen)
    safe = generate_batch(model, tokenizer, [e.prompt for e in prompts["xstest_safe"]], desc="xstest", **gen)
    mc = truthfulqa_mc(model, tokenizer, examples=prompts["truthfulqa"], batch_size=cfg.batch_size)
    ae = prompts["alpaca_eval"]
    return {
        "alpaca_eval_ref_nll": {"value": reference_nll(
            model, tokenizer, [e.prompt for e in ae], [e.references["text_davinci_003"] for e in ae]),
            "n": len(ae)},
        "refusal_harmful": {"value": refusal_rate(harmful), "n": len(harmful)},
        "refusal_xstest_safe": {"value": refusal_rate(safe), "n": len(safe)},
        "mc1": {"value": mc["mc1"], "n": mc["n"]},
        "mc2": {"value": mc["mc2"], "n": mc["n"]},
        "examples": {"harmful": harmful[:3], "xstest_safe": safe[:3]},
    }


def evaluate_experts(backbone: str, experts: dict[str, Path], cfg, cache: Path,
                     data_dir: Path | None = None, progress: bool = True, mocae_dir: Path | None = None) -> dict:
    """The sanity table for the base model and each expert, cached per system.

    Args:
        backbone: backbone name the experts were trained on.
        experts: adapter folder per axis.
        cfg: a SanityConfig.
        cache: folder for per-system results (a finished system is not evaluated again).
        mocae_dir: a saved MoCaEModel to evaluate as system "mocae" too.

    Returns:
        {"systems": {name: metrics}, "config": cfg}
    """
    from peft import PeftModel

    from mocae.backbones import load_backbone

    prompts = sanity_prompts(cfg, data_dir)
    model, tokenizer = load_backbone(backbone)
    peft_model = None
    systems = {}
    entries = [("base", None)] + [(f"expert_{a}", p) for a, p in experts.items()]
    if mocae_dir is not None:
        entries.append(("mocae", mocae_dir))
    for name, path in entries:
        key = hashlib.sha256(json.dumps([backbone, str(path), cfg.model_dump()]).encode()).hexdigest()[:12]
        cached = Path(cache) / f"{name}-{key}.json"
        if cached.is_file():
            systems[name] = json.loads(cached.read_text())
            continue
        print(f"[sanity] {name}", flush=True)
        if path is None:
            result = evaluate_system(model, tokenizer, prompts, cfg, progress)
        elif name == "mocae":
            from mocae.mixture.model import MoCaEModel

            mocae = MoCaEModel.from_pretrained(path)
            result = evaluate_system(mocae, mocae.tokenizer, prompts, cfg, progress)
        else:
            adapter = name.removeprefix("expert_")
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter)
            else:
                peft_model.load_adapter(str(path), adapter_name=adapter)
            peft_model.set_adapter(adapter)
            peft_model.eval()
            result = evaluate_system(peft_model, tokenizer, prompts, cfg, progress)
        atomic_write_json(cached, result)
        systems[name] = result
    return {"systems": systems, "config": cfg.model_dump()}


def format_sanity_table(sanity: dict) -> str:
    """A Markdown table: systems x sanity metrics (arrows say which way is better)."""
    columns = [("alpaca_eval_ref_nll", "helpful: ref NLL (lower)"),
               ("refusal_harmful", "harmless: refusal on harmful (higher)"),
               ("refusal_xstest_safe", "over-refusal XSTest safe (lower)"),
               ("mc1", "honest: MC1 (higher)"), ("mc2", "MC2 (higher)")]
    lines = ["| system | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, metrics in sanity["systems"].items():
        cells = [f"{metrics[k]['value']:.3f} (n={metrics[k]['n']})" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
