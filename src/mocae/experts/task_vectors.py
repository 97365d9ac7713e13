"""Task vectors (TrinityX): the dense weight update of each LoRA expert, and maths on them.

An expert is a plain peft LoRA adapter. Its task vector is, for every targeted module,
``delta_W = scaling * B @ A``; we take it from peft's own ``get_delta_weight`` so that
``fan_in_fan_out`` and rsLoRA scaling are handled exactly as peft merges them.

Keys are base-model module names (``model.layers.0.self_attn.q_proj``): peft's
``base_model.model.`` prefix is stripped so vectors from different wrappers line up.
DoRA magnitudes and ``modules_to_save`` copies are not part of a task vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

PEFT_PREFIX = "base_model.model."


def _strip_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


class TaskVector(Mapping):
    """A mapping module name -> dense fp32 delta, with the vector-space operations.

    Args:
        deltas: module name -> delta tensor (converted to fp32, detached).
    """

    def __init__(self, deltas: Mapping[str, torch.Tensor]):
        self._deltas = {name: d.detach().float() for name, d in deltas.items()}

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._deltas[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self._deltas)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} modules, norm={self.norm():.4g})"

    @property
    def names(self) -> list[str]:
        """Module names in sorted order (the order ``flatten`` uses)."""
        return sorted(self._deltas)

    def _check_same_modules(self, other: TaskVector) -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"expected a TaskVector, got {type(other).__name__}")
        mine, theirs = set(self._deltas), set(other._deltas)
        if mine != theirs:
            raise ValueError(
                "task vectors cover different modules: "
                f"missing from the other: {sorted(mine - theirs)}; "
                f"missing from this one: {sorted(theirs - mine)}"
            )

    # Arithmetic: elementwise per module; mismatched module sets are an error, not a silent union.
    def __add__(self, other: TaskVector) -> TaskVector:
        self._check_same_modules(other)
        return TaskVector({n: self[n] + other[n] for n in self.names})

    def __sub__(self, other: TaskVector) -> TaskVector:
        self._check_same_modules(other)
        return TaskVector({n: self[n] - other[n] for n in self.names})

    def __neg__(self) -> TaskVector:
        return TaskVector({n: -d for n, d in self._deltas.items()})

    def __mul__(self, scalar: float) -> TaskVector:
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector({n: d * scalar for n, d in self._deltas.items()})

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        # Mapping's default __eq__ would compare tensors with ==, which is ambiguous.
        if not isinstance(other, TaskVector) or set(self._deltas) != set(other._deltas):
            return False
        return all(torch.equal(self[n], other[n]) for n in self.names)

    __hash__ = None

    def allclose(self, other: TaskVector, atol: float = 1e-6, rtol: float = 1e-5) -> bool:
        """True if both cover the same modules with numerically close deltas."""
        if set(self._deltas) != set(other._deltas):
            return False
        return all(torch.allclose(self[n], other[n], atol=atol, rtol=rtol) for n in self.names)

    # Geometry
    def flatten(self) -> torch.Tensor:
        """All deltas as one 1-D tensor, concatenated in sorted-name order."""
        return torch.cat([self[n].flatten() for n in self.names])

    def dot(self, other: TaskVector) -> float:
        """Sum over modules of the elementwise products. Raises ValueError on other modules."""
        self._check_same_modules(other)
        # Accumulate in float64: the sums run over millions of terms of mixed sign.
        return float(sum((self[n].double() * other[n].double()).sum() for n in self.names))

    def norm(self) -> float:
        """Frobenius norm over all modules."""
        return math.sqrt(self.dot(self))

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity; 0.0 if either vector is zero."""
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0


def task_vector_from_peft(model: torch.nn.Module, adapter_name: str = "default") -> TaskVector:
    """The task vector of one adapter of an in-memory LoRA model.

    Args:
        model: a PeftModel, or any module with peft LoRA layers injected.
        adapter_name: which adapter to read.
    Returns:
        TaskVector keyed by base-model module names.
    """
    deltas = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                # peft's own maths: transpose for fan_in_fan_out, times peft's stored scaling.
                deltas[_strip_prefix(name)] = module.get_delta_weight(adapter_name)
    if not deltas:
        raise ValueError(f"no LoRA layers with adapter {adapter_name!r} in the model")
    return TaskVector(deltas)


def load_task_vector(adapter_dir: str | Path, base_model: torch.nn.Module) -> TaskVector:
    """Load a saved adapter folder onto ``base_model`` and return its task vector.

    The adapter is injected in place and unloaded again (cheaper than a deepcopy of the
    backbone), so ``base_model`` ends up with its original modules and weights.

    Args:
        adapter_dir: a folder written by ``PeftModel.save_pretrained``.
        base_model: the plain (non-peft) backbone the adapter was trained on.
    Returns:
        TaskVector of the adapter.
    """
    if isinstance(base_model, PeftModel):
        raise TypeError("base_model must be the plain backbone, not a PeftModel")
    had_config = hasattr(base_model, "peft_config")
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name="default")
    try:
        return task_vector_from_peft(peft_model, "default")
    finally:
        # unload() swaps every LoRA layer back for its base Linear; peft also leaves a
        # peft_config attribute on the wrapped model, which would confuse a later get_peft_model.
        peft_model.unload()
        if not had_config and hasattr(base_model, "peft_config"):
            del base_model.peft_config


def similarity_matrix(vectors: Mapping[str, TaskVector]) -> dict:
    """Pairwise inner products and cosines, JSON-serialisable.

    Args:
        vectors: expert name -> task vector (all over the same modules).
    Returns:
        {"names": [...], "inner_products": [[...]], "cosine": [[...]]} in the input order.
    """
    names = list(vectors)
    inner = [[vectors[a].dot(vectors[b]) for b in names] for a in names]
    norms = [math.sqrt(max(inner[i][i], 0.0)) for i in range(len(names))]
    n = len(names)
    cosine = [
        [inner[i][j] / (norms[i] * norms[j]) if norms[i] * norms[j] > 0 else 0.0 for j in range(n)]
        for i in range(n)
    ]
    return {"names": names, "inner_products": inner, "cosine": cosine}


def importance_weights(
    vectors: Mapping[str, TaskVector], reference: TaskVector, temperature: float = 1.0
) -> dict[str, float]:
    """TrinityX importance weights gamma_i from inner products <tau_i, tau_ref>.

    TrinityX takes gamma_i proportional to <tau_i, tau_ref>, which goes negative (or
    divides by ~0) when experts conflict. We use instead
    ``gamma = softmax(ip / (temperature * max_i |ip_i|))``: positive, summing to 1,
    ordered like the inner products, and independent of the overall scale of the deltas.
    With temperature 1 the largest/smallest ratio is at most e^2; a lower temperature
    sharpens towards the best-aligned expert. If every inner product is 0 the weights
    are uniform.

    Args:
        vectors: expert name -> task vector.
        reference: tau_ref (e.g. the multi-task or merged vector).
        temperature: softmax temperature, > 0.
    Returns:
        expert name -> gamma_i.
    """
    if not vectors:
        raise ValueError("importance_weights needs at least one expert vector")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reference.norm() == 0:
        raise ValueError("reference task vector is zero: inner products carry no information")
    names = list(vectors)
    ip = torch.tensor([vectors[n].dot(reference) for n in names], dtype=torch.float64)
    scale = ip.abs().max()
    logits = ip / (temperature * scale) if scale > 0 else torch.zeros_like(ip)
    gamma = torch.softmax(logits, dim=0)
    return {n: float(g) for n, g in zip(names, gamma)}


def _find_base_layer(modules: dict[str, torch.nn.Module], name: str) -> torch.nn.Module | None:
    for candidate in (name, PEFT_PREFIX + name):
        if candidate in modules:
            module = modules[candidate]
            # On a peft model, the delta belongs to the wrapped Linear, not the LoRA wrapper.
            return module.get_base_layer() if isinstance(module, LoraLayer) else module
    return None


def apply_task_vector(model: torch.nn.Module, vector: TaskVector, weight: float = 1.0) -> None:
    """Add ``weight * delta`` to the matching base weights of ``model``, in place.

    Args:
        model: a plain backbone or a PeftModel (its base layers are updated).
        vector: the task vector to add.
        weight: scalar multiplier (negative to subtract, e.g. for negation).
    """
    modules = dict(model.named_modules())
    targets = {name: _find_base_layer(modules, name) for name in vector.names}
    missing = [n for n, m in targets.items() if m is None or getattr(m, "weight", None) is None]
    if missing:
        raise ValueError(f"modules not found in the model: {missing}")
    for name, module in targets.items():
        if module.weight.shape != vector[name].shape:
            raise ValueError(
                f"{name}: delta shape {tuple(vector[name].shape)} does not match "
                f"weight shape {tuple(module.weight.shape)}"
            )
    with torch.no_grad():
        for name, module in targets.items():
            w = module.weight
            w.add_((weight * vector[name]).to(device=w.device, dtype=w.dtype))
