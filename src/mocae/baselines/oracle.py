"""``oracle``: the right expert per benchmark, composed from the single experts' results.

An upper bound for any router: it generates nothing of its own, so it has no model, no
fingerprint and no efficiency; the run lists the three single experts with it.
"""

from __future__ import annotations

from mocae import AXES
from mocae.spec import SystemSpec

# The oracle's expert per prompt set: XSTest's safe prompts are benign requests, so the right
# expert for them is the helpful one (sending them to the harmless expert is what over-refuses).
ORACLE_EXPERT = {"helpful": "helpful", "harmless": "harmless", "over_refusal": "helpful", "honest": "honest"}


def oracle_result(results: dict) -> dict:
    """The oracle's metrics: each benchmark's numbers from the expert made for it.

    Args:
        results: the harness results with ``expert_<axis>`` systems evaluated.

    Returns:
        An evaluate_system-like result (metrics per axis), marked ``composed_from``.
    """
    systems = results["systems"]
    missing = [f"expert_{a}" for a in set(ORACLE_EXPERT.values()) if f"expert_{a}" not in systems]
    if missing:
        raise ValueError(f"the oracle is composed from the single experts; {missing} not evaluated")

    def metrics(axis: str) -> dict:
        return systems[f"expert_{ORACLE_EXPERT[axis]}"]["metrics"].get(axis, {})

    harmless = {k: v for k, v in metrics("harmless").items() if not k.startswith("over_refusal")}
    harmless.update({k: v for k, v in systems[f"expert_{ORACLE_EXPERT['over_refusal']}"]["metrics"]
                     .get("harmless", {}).items() if k.startswith("over_refusal")})
    composed = {f"{k}": f"expert_{v}" for k, v in ORACLE_EXPERT.items()}
    return {"name": "oracle", "model_id": "oracle", "composed_from": composed,
            "metrics": {"helpful": metrics("helpful"), "harmless": harmless, "honest": metrics("honest")},
            "tables": {}, "routing": None, "efficiency": None, "timing_s": {}}


SYSTEM = SystemSpec(name="oracle", compose=oracle_result, requires=tuple(f"expert_{a}" for a in AXES),
                    description="composed from the single experts")
