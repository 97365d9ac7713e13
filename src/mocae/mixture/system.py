"""``mocae``: the Mixture of Calibrated Experts as a system of a run.

Its stage (``mocae.pipeline.build_mocae``: router and calibrators fitted on the experts) saves
it in ``run_dir/mocae`` with ``MoCaEModel.save_pretrained``; the system loads that folder.
"""

from __future__ import annotations

from pathlib import Path

from mocae.spec import Capabilities, SystemSpec


def _from_pretrained(path: str | Path, backbone: str | None = None):
    from mocae.mixture.model import MoCaEModel

    model = MoCaEModel.from_pretrained(path)
    return model, model.tokenizer


def _inspect(path: str | Path, backbone: str | None = None) -> str:
    from mocae.mixture.model import check_saved

    return check_saved(path)[0].backbone  # every file checked, before any model loads


SYSTEM = SystemSpec(
    name="mocae", saved=True, files=("mocae_config.json",), from_pretrained=_from_pretrained, inspect=_inspect,
    save_pretrained=lambda model, tokenizer, path: model.save_pretrained(path),
    capabilities=Capabilities(router=True, per_request_routing=True),
    description="the Mixture of Calibrated Experts (its capabilities follow its routing kind)")
