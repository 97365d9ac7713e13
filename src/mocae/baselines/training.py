"""The one AdamW + bf16-autocast training loop of the fused baselines (H3Fusion, X-LoRA, MoTE).

Every fusion stage trains a few parameters (routers, a classifier, LoRA factors) on top of a frozen
backbone the same way: AdamW at the stage's learning rate, the forward under bf16 autocast on the
run's device (``mocae.device``), the loss taken in fp32 outside autocast, then ``zero_grad``,
``backward``, ``step``. ``optimizer_step`` is that step; ``train_on_completions`` the loop over
(prompt, completion, label) batches that H3Fusion and X-LoRA share. MoTE keeps its own resumable
loop around ``optimizer_step``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mocae.device import place, resolve, train_autocast


def fusion_optimizer(params, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW with torch's defaults but the learning rate (what every fusion stage uses)."""
    return torch.optim.AdamW(params, lr=learning_rate)


def lm_loss(out) -> torch.Tensor:
    """The model's own LM loss, in fp32."""
    return out.loss.float()


def optimizer_step(optimizer: torch.optim.Optimizer, device: torch.device, forward: Callable,
                   loss: Callable = lm_loss) -> torch.Tensor:
    """One training step: ``forward()`` under autocast on ``device``, ``loss(out)`` outside it,
    ``zero_grad``, ``backward``, ``step``.

    Returns:
        The loss tensor (detached by the caller with ``.item()``).
    """
    with train_autocast(device):
        out = forward()
    value = loss(out)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return value


def train_on_completions(model, tokenizer, examples: list[tuple[str, str, int]], params: list, cfg, desc: str,
                         progress: bool = True, terms: Callable | None = None, logs: tuple[str, ...] = ("losses",),
                         train_module=None, device: str | None = None) -> dict:
    """Train ``params`` (the rest of ``model`` frozen) for ``cfg.steps`` batches of completions.

    Args:
        model: the causal LM; moved to the resolved ``device`` first.
        examples: (prompt, completion, label) triples, reshuffled every pass (``completion_batches``).
        params: the parameters to train (``requires_grad`` is switched on for them only).
        cfg: ``learning_rate``, ``steps``, ``batch_size``, ``max_length`` and ``seed``.
        desc: the progress bar's label (also seeds nothing: the order is ``cfg.seed``'s).
        terms: ``terms(out, batch, labels) -> {name: tensor}``, the first entry the loss that is
            minimised (default: ``{"losses": LM loss}``); every entry is logged per step.
        logs: the names ``terms`` returns (listed even when ``cfg.steps`` is 0).
        train_module: the module in train mode while training (default: ``model``).

    Returns:
        ({name: per-step values} of ``terms``, wall time in seconds).
    """
    from mocae.generation import completion_batches

    terms = terms or (lambda out, batch, labels: {"losses": lm_loss(out)})
    train_module = train_module if train_module is not None else model
    place(model, device)
    run_on = resolve(device)
    model.requires_grad_(False)  # the backbone stays frozen
    for p in params:
        p.requires_grad_(True)
    optimizer = fusion_optimizer(params, cfg.learning_rate)
    history: dict[str, list[float]] = {name: [] for name in logs}
    start = time.time()
    train_module.train()
    try:
        for batch, labels in completion_batches(tokenizer, examples, cfg.batch_size, cfg.steps, cfg.max_length,
                                                cfg.seed, desc, progress, model.device):
            logged = {}

            def forward():
                return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], use_cache=False)

            def loss(out):
                logged.update(terms(out, batch, labels))
                return next(iter(logged.values()))

            optimizer_step(optimizer, run_on, forward, loss)
            for key, value in logged.items():
                history[key].append(value.item())
    finally:
        train_module.eval()
        model.requires_grad_(False)
    return history, round(time.time() - start, 2)
