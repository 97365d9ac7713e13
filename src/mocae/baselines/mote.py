"""MoTE baseline (arXiv 2405.00557): step experts over self-generated AlignCoT chains.

AlignCoT: the model answers in steps, one header per line,

    Analysis: what the request asks for, and whether answering it could cause harm.
    Guidance: how a responsible answer should go.      (only when the safety check flags harm)
    Answer: the answer.

The analysis and guidance are written by the backbone itself (self-alignment) for every training
prompt; the answer is that prompt's target completion from the experts' data. The safety check
is the sample's label: guidance is written for the harmless axis' harmful prompts and skipped
for benign ones. At inference the model decides, by writing ``Guidance:`` or going straight to
``Answer:``.

Mixture of insighTful Experts: one LoRA per step plus a shared LoRA (all linear layers), trained
together; a token of step s goes through ``shared_weight * shared + (1 - shared_weight) *
expert_s`` (0.5 / 0.5 in the paper), mixed by mocae's ``LoraMixer`` with per-token weights.
A token's step is that of the last header in the answer text up to and including the token
(the prompt and text before any header count as analysis). Training and decoding use the same
rule on decoded text: the decoder re-reads each row after every token and switches experts when
a header is complete, with one KV cache. Only the answer section is scored (``final_answer``);
the chain gets ``reasoning_tokens`` of budget on top of the answer budget every system gets.
Likelihood scoring (TruthfulQA MC) uses the answer step's mixture on every token.

    model, tok = build_mote("smollm2-135m", MoteConfig())
    chains = build_chains(base, base_tok, [(prompt, completion, axis_index), ...], harmful_label=1)
    fit_mote(model, tok, chains, cfg, checkpoint_dir="runs/x/mote_checkpoint")
    model.save_pretrained("runs/x/mote"); model, tok = load_mote("runs/x/mote")
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mocae.mixture.layer import LoraMixer, PeftBackedModel
from mocae.paths import atomic_directory
from mocae.spec import BuildContext, Capabilities, SystemSpec, write_marker

STEPS = ("analysis", "guidance", "answer")
ADAPTERS = (*STEPS, "shared")  # the mixer's expert order
HEADERS = {"analysis": "Analysis:", "guidance": "Guidance:", "answer": "Answer:"}
_HEADER = re.compile(r"(?:^|\n)[ \t]*(Analysis|Guidance|Answer):")
CONFIG_FILE = "mote_config.json"
CHECKPOINT_STATE = "state.json"

ANALYSIS_PROMPT = ("In one or two sentences, analyse this request: what does it ask for, and could answering "
                   "it cause harm?\n\nRequest: {prompt}")
GUIDANCE_PROMPT = ("This request could cause harm if answered as asked:\n\n{prompt}\n\nIn one or two sentences, "
                   "say how a responsible assistant should respond instead.")


class MoteConfig(BaseModel):
    """MoTE's experts, chain data and training (DESIGN.md 6b, preset ``mote``: paper settings)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(16, ge=1, description="LoRA rank of every step expert and the shared expert")
    alpha: int = Field(32, ge=1, description="LoRA alpha")
    target_modules: str | list[str] = Field("all-linear", description="peft target modules")
    shared_weight: float = Field(0.5, ge=0, le=1, description="the shared expert's weight on every token")
    learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate (paper: 2e-5, preset mote)")
    epochs: int = Field(3, ge=1, description="passes over the chains")
    batch_size: int = Field(16, ge=1, description="chains per optimiser step (batched by length)")
    max_length: int = Field(384, ge=8, description="tokens per chain (prompt + chain)")
    examples_per_axis: int = Field(128, gt=0, description="training prompts per axis, from the experts' own data")
    analysis_tokens: int = Field(48, gt=0, description="budget of each self-generated analysis")
    guidance_tokens: int = Field(48, gt=0, description="budget of each self-generated guidance")
    reasoning_tokens: int = Field(96, ge=0, description="decode budget for the chain, on top of the answer budget")
    generation_batch_size: int = Field(16, gt=0, description="prompts per batch when writing the chains")
    save_steps: int = Field(10, gt=0, description="optimiser steps between checkpoints (resumable training)")
    seed: int = Field(0, description="LoRA initialisation and batch order")


# ---- the chain format --------------------------------------------------------------------------
def step_at(text: str) -> int:
    """Index into STEPS of the last complete header in ``text`` (0, analysis, before any)."""
    found = _HEADER.findall(text)
    return STEPS.index(found[-1].lower()) if found else 0


def final_answer(text: str) -> str:
    """The answer section of a chain; the whole text, headers removed, when none was written."""
    match = next((m for m in _HEADER.finditer(text) if m.group(1) == "Answer"), None)
    if match is not None:
        return text[match.end():].strip()
    return "\n".join(line.strip() for line in _HEADER.sub("\n", text).split("\n") if line.strip())


def chain_text(analysis: str, answer: str, guidance: str | None = None) -> str:
    """An AlignCoT chain: analysis, guidance when given, answer."""
    lines = [f"{HEADERS['analysis']} {analysis}"]
    if guidance is not None:
        lines.append(f"{HEADERS['guidance']} {guidance}")
    lines.append(f"{HEADERS['answer']} {answer}")
    return "\n".join(lines)


def _one_line(text: str, sentences: int = 2) -> str:
    """A self-generated step as one line of at most ``sentences`` sentences, without headers."""
    text = _HEADER.sub(" ", text)
    text = " ".join(text.split())
    parts = re.split(r"(?<=[.!?])\s+", text)
    return " ".join(parts[:sentences]).strip() or "(none)"


def build_chains(model, tokenizer, examples: list[tuple[str, str, int]], harmful_label: int,
                 cfg: MoteConfig | None = None, cache_dir: Path | None = None, progress: bool = True) -> list[dict]:
    """AlignCoT chains written by ``model`` (the backbone) for labelled training examples.

    Args:
        model, tokenizer: the base model that writes the analysis and guidance (self-alignment).
        examples: (prompt, completion, axis index) triples; the completion becomes the answer.
        harmful_label: the axis index whose prompts are harmful (the safety check: guidance).
        cache_dir: generation cache (default ``$MOCAE_CACHE/generations``): rerunning is free.

    Returns:
        [{"prompt", "completion" (the chain), "axis", "guidance" (bool)}] in example order.
    """
    from mocae.generation_cache import GenerationConfig, generate_cached, model_fingerprint
    from mocae.paths import cache_dir as default_cache

    cfg = cfg or MoteConfig()
    if not examples:
        raise ValueError("build_chains needs at least one example")
    cache = Path(cache_dir) if cache_dir is not None else default_cache() / "generations"
    model_id = f"base-{model_fingerprint(model)}"
    gen = GenerationConfig(max_new_tokens=cfg.analysis_tokens, batch_size=cfg.generation_batch_size)
    analyses = generate_cached(model, tokenizer, model_id, "mote_analysis",
                               [ANALYSIS_PROMPT.format(prompt=p) for p, _, _ in examples], gen, cache, progress)
    harmful = [i for i, (_, _, y) in enumerate(examples) if y == harmful_label]
    guidance = {}
    if harmful:
        outs = generate_cached(model, tokenizer, model_id, "mote_guidance",
                               [GUIDANCE_PROMPT.format(prompt=examples[i][0]) for i in harmful],
                               gen.model_copy(update={"max_new_tokens": cfg.guidance_tokens}), cache, progress)
        guidance = dict(zip(harmful, outs))
    chains = []
    for i, (prompt, completion, axis) in enumerate(examples):
        g = _one_line(guidance[i]) if i in guidance else None
        chains.append({"prompt": prompt, "completion": chain_text(_one_line(analyses[i]), completion.strip(), g),
                       "axis": axis, "guidance": g is not None})
    return chains


def encode_chain(tokenizer, prompt: str, completion: str, max_length: int) -> dict:
    """Token ids, completion labels and each token's step for one chain.

    Returns:
        {"input_ids", "labels" (-100 on the prompt), "steps"} as lists of equal length.
    """
    from mocae.generation import chat_prompt

    p = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    c = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    # The decoder's rule, token by token: the step of the text up to and including the token.
    steps = [step_at(tokenizer.decode(c[:t + 1], skip_special_tokens=True)) for t in range(len(c))]
    ids = (p + c)[:max_length]
    labels = ([-100] * len(p) + c)[:max_length]
    return {"input_ids": ids, "labels": labels, "steps": ([0] * len(p) + steps)[:max_length]}


# ---- the model ---------------------------------------------------------------------------------
class MoteModel(PeftBackedModel):
    """Backbone + step experts + shared expert, mixed per token by step. Use ``build_mote``/``load_mote``."""

    mocae_capabilities = Capabilities(step_decoding=True)  # a chain first, then the answer (mocae.spec)

    def __init__(self, peft_model, tokenizer, cfg: MoteConfig, backbone: str, trainable: bool = False):
        super().__init__()
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.mote_config = cfg
        self.backbone = backbone
        self.mixer = LoraMixer(peft_model, list(ADAPTERS), trainable=trainable)

    @property
    def reasoning_tokens(self) -> int:
        """Read by generate_batch: the chain's own budget, on top of the answer's."""
        return self.mote_config.reasoning_tokens

    final_answer = staticmethod(final_answer)  # read by generate_batch: only the answer is scored

    def step_weights(self, steps: torch.Tensor) -> torch.Tensor:
        """Mixer weights (..., E) for step indices (...): the step's expert and the shared one."""
        s = self.mote_config.shared_weight
        w = nn.functional.one_hot(steps, len(ADAPTERS)).float() * (1 - s)
        w[..., ADAPTERS.index("shared")] += s
        return w

    def forward(self, input_ids, attention_mask=None, steps: torch.Tensor | None = None, **kwargs):
        """A forward pass mixed per token by ``steps`` (B, T); without them, the answer step everywhere."""
        if steps is None:
            weights = self.step_weights(torch.full((input_ids.shape[0],), STEPS.index("answer")))
        else:
            weights = self.step_weights(steps)
        with self.mixer.weights(weights):
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, min_new_tokens: int = 0,
                 do_sample: bool = False, pad_token_id: int | None = None, eos_token_id=None, **kwargs):
        """Greedy step-aware decoding with a KV cache: experts switch as the chain's headers appear.

        Raises:
            ValueError: sampling or another unsupported generation option.
        """
        from transformers import DynamicCache

        from mocae.generation import greedy_decode, greedy_settings

        eos, pad = greedy_settings(self.peft_model.generation_config, "MoTE decoding", do_sample, kwargs,
                                   eos_token_id, pad_token_id)
        cache = DynamicCache()

        def step(ids, mask, positions, generated):
            if generated.shape[1] == 0:  # the prompt: analysis, as in training
                steps = torch.zeros_like(ids)
            else:
                steps = torch.tensor([[step_at(self.tokenizer.decode(row, skip_special_tokens=True))]
                                      for row in generated], device=ids.device)
            with self.mixer.weights(self.step_weights(steps)):
                out = self.peft_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                      past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float()

        return greedy_decode(step, input_ids, attention_mask, max_new_tokens, eos, pad, min_new_tokens)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the four peft adapters and ``mote_config.json``; atomically replaces ``path``."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            self.peft_model.save_pretrained(tmp / "adapters", selected_adapters=list(ADAPTERS))
            adapters = {a: f"adapters/{a}" if (tmp / "adapters" / a).is_dir() else "adapters" for a in ADAPTERS}
            (tmp / CONFIG_FILE).write_text(json.dumps({"backbone": self.backbone, "adapters": adapters,
                                                       "config": self.mote_config.model_dump()}, indent=2))
            write_marker(tmp, SYSTEM.name)
        return path


def build_mote(backbone: str, cfg: MoteConfig | None = None, model_and_tokenizer=None) -> tuple[MoteModel, object]:
    """A fresh, trainable MoTE model: four new LoRAs (B = 0, so it starts as the base model)."""
    from peft import LoraConfig, get_peft_model

    from mocae.backbones import load_backbone

    cfg = cfg or MoteConfig()
    base, tokenizer = model_and_tokenizer or load_backbone(backbone)
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, lora_dropout=0.0)
    peft_model = get_peft_model(base, lora, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, lora)
    return MoteModel(peft_model, tokenizer, cfg, backbone, trainable=True), tokenizer


def load_mote(path: str | Path, model_and_tokenizer=None) -> tuple[MoteModel, object]:
    """Restore a saved MoTE model for inference.

    Raises:
        FileNotFoundError: ``path`` is not a MoTE folder.
    """
    from peft import PeftModel

    from mocae.backbones import load_backbone

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a MoTE folder (no {CONFIG_FILE})")
    meta = json.loads((path / CONFIG_FILE).read_text())
    base, tokenizer = model_and_tokenizer or load_backbone(meta["backbone"])
    first, *rest = ADAPTERS
    peft_model = PeftModel.from_pretrained(base, path / meta["adapters"][first], adapter_name=first)
    for name in rest:
        peft_model.load_adapter(path / meta["adapters"][name], adapter_name=name)
    peft_model.eval()
    return MoteModel(peft_model, tokenizer, MoteConfig.model_validate(meta["config"]), meta["backbone"]), tokenizer


# ---- training ----------------------------------------------------------------------------------
def _batches(lengths: list[int], batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Every epoch's batches, fixed by the seed (so a resumed run continues the same order).

    Rows are sorted by length within windows of 8 batches: little padding, still shuffled.
    """
    rng = random.Random(seed)
    n, window = len(lengths), batch_size * 8
    batches = []
    for _ in range(epochs):
        order = rng.sample(range(n), n)
        epoch = []
        for start in range(0, n, window):
            part = sorted(order[start:start + window], key=lengths.__getitem__)
            epoch += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        rng.shuffle(epoch)
        batches += epoch
    return batches


def _collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    lengths = torch.tensor([len(r["input_ids"]) for r in rows])
    return {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", -100), "steps": pad("steps", 0),
            "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long()}


def _train_step(model: MoteModel, batch: dict, optimizer) -> float:
    from mocae.baselines.training import optimizer_step

    batch = {k: v.to(model.device) for k, v in batch.items()}
    return optimizer_step(optimizer, model.device, lambda: model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], steps=batch["steps"],
        labels=batch["labels"], use_cache=False)).item()


def _trainable(model: MoteModel) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.peft_model.named_parameters() if p.requires_grad}


def _save_checkpoint(model: MoteModel, optimizer, folder: Path, state: dict) -> None:
    from safetensors.torch import save_file

    with atomic_directory(folder) as tmp:
        save_file({n: p.detach().contiguous() for n, p in _trainable(model).items()}, str(tmp / "lora.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))


def _load_checkpoint(model: MoteModel, optimizer, folder: Path) -> dict:
    from safetensors.torch import load_file

    saved = load_file(str(folder / "lora.safetensors"))
    params = _trainable(model)
    if set(saved) != set(params):
        raise ValueError(f"{folder} holds a checkpoint of a different MoTE model (LoRA tensors differ); "
                         "delete it to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return json.loads((folder / CHECKPOINT_STATE).read_text())


def fit_mote(model: MoteModel, tokenizer, chains: list[dict], cfg: MoteConfig | None = None,
             checkpoint_dir: str | Path | None = None, progress: bool = True, device: str | None = None) -> dict:
    """Train the step and shared experts together on AlignCoT chains (LM loss on the chain).

    Args:
        model: from ``build_mote`` (trainable).
        chains: ``build_chains`` output.
        checkpoint_dir: where to checkpoint every ``save_steps``; an interrupted call resumes there.
        device: where to train (``mocae.device.resolve``; the model is moved there).

    Returns:
        {"losses", "steps", "tokens", "tokens_per_s", "wall_time_s", "resumed_from_step", "chains": stats}.
    """
    from tqdm.auto import tqdm

    from mocae.baselines.training import fusion_optimizer
    from mocae.device import place

    cfg = cfg or model.mote_config
    if not chains:
        raise ValueError("fit_mote needs at least one chain")
    rows = [encode_chain(tokenizer, c["prompt"], c["completion"], cfg.max_length) for c in chains]
    batches = _batches([len(r["input_ids"]) for r in rows], cfg.batch_size, cfg.epochs, cfg.seed)
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable LoRA parameters (build it with build_mote)")
    place(model, device)
    optimizer = fusion_optimizer(params.values(), cfg.learning_rate)
    state = {"step": 0, "losses": [], "tokens": 0, "seconds": 0.0}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None and (folder / CHECKPOINT_STATE).is_file():
        state = _load_checkpoint(model, optimizer, folder)
    resumed_from = state["step"]
    model.train()
    try:
        for k in tqdm(range(state["step"], len(batches)), desc="mote", disable=not progress,
                      initial=state["step"], total=len(batches)):
            start = time.perf_counter()
            batch = _collate([rows[i] for i in batches[k]], tokenizer.pad_token_id)
            state["losses"].append(_train_step(model, batch, optimizer))
            state["tokens"] += int(batch["attention_mask"].sum())
            state["seconds"] += time.perf_counter() - start
            state["step"] = k + 1
            if folder is not None and (state["step"] % cfg.save_steps == 0 or state["step"] == len(batches)):
                _save_checkpoint(model, optimizer, folder, state)
    finally:
        model.eval()
    return {"losses": state["losses"], "steps": len(batches), "tokens": state["tokens"],
            "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
            "wall_time_s": round(state["seconds"], 1), "resumed_from_step": resumed_from,
            "chains": {"n": len(chains), "with_guidance": sum(c["guidance"] for c in chains),
                       "mean_tokens": round(sum(len(r["input_ids"]) for r in rows) / len(rows), 1),
                       "epochs": cfg.epochs, "batches_per_epoch": math.ceil(len(batches) / cfg.epochs)}}


# ---- the system: chains and step experts trained in the run directory -----------------------------
def _fit(ctx: BuildContext, examples: list[tuple[str, str, int]], progress: bool = True):
    from mocae import AXES
    from mocae.backbones import load_backbone
    from mocae.paths import atomic_write_json

    cfg = ctx.settings
    base = load_backbone(ctx.backbone)  # writes the chains, then carries the new LoRAs
    chains = build_chains(*base, examples, AXES.index("harmless"), cfg, progress=progress)
    atomic_write_json(ctx.run_dir / "mote_chains.json", chains)
    model, tokenizer = build_mote(ctx.backbone, cfg, model_and_tokenizer=base)
    record = fit_mote(model, tokenizer, chains, cfg, checkpoint_dir=ctx.run_dir / "mote_checkpoint", progress=progress)
    return model, tokenizer, record


def _inspect(path: str | Path, backbone: str | None = None) -> str:
    from mocae.errors import read_json

    return read_json(Path(path) / CONFIG_FILE)["backbone"]


SYSTEM = SystemSpec(
    name="mote", config=MoteConfig, fit=_fit, saved=True, files=(CONFIG_FILE,),
    save_pretrained=lambda model, tokenizer, path: model.save_pretrained(path),
    from_pretrained=lambda path, backbone=None: load_mote(path), inspect=_inspect,
    capabilities=MoteModel.mocae_capabilities, examples_per_axis=lambda baselines: baselines.mote.examples_per_axis,
    reads_experts=False, description="step experts + a shared expert on self-generated reasoning chains")
