"""Request schema of the OpenAI-compatible chat endpoint, its mocae extensions, and error bodies.

Validation is in two layers: pydantic checks shape and types (``ChatRequest``); ``check_request``
checks what depends on the served model and the server's limits (axes, max_tokens cap, prompt
length). Both raise or map to ``ApiError``, a 4xx whose JSON body names the field at fault:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages[0].role", "code": null}}
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error the client gets as ``status`` with an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return ApiError(status, message, param, type, code).body()


def loc_to_param(loc) -> str | None:
    """pydantic's ('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    # union members show up in locs as type tags ('str', 'list[str]', 'function-after[...]'): not fields
    tags = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and (p in tags or "[" in p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = Field(description="a string, or a list of {'type': 'text', 'text': ...} parts")

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                           and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError("content must be a string or a list of text parts ({'type': 'text', 'text': ...})")


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's fields (those that apply) plus mocae's steering fields.

    Unknown OpenAI fields (``user``, ``tools``, ...) are ignored, as OpenAI-compatible servers do.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # mocae extensions
    axis_weights: dict[str, float] | None = Field(
        None, description="fixed expert weights per axis (normalised to sum 1; axes left out get 0)")
    prior: dict[str, float] | None = Field(None, description="tilts the router's calibrated probabilities")
    ignore_eos: bool = Field(False, strict=True, description="decode max_tokens tokens even past the end-of-"
                             "sequence token (as vLLM's ignore_eos): benchmarks compare equal lengths")
    routing_mode: Literal["blend", "soft", "top1", "harm_gate", "harm_gate+top1"] | None = Field(
        None, description="how calibrated probabilities become weights (mocae.mixture.decide): blend (= soft), "
                          "top1, harm_gate, harm_gate+top1 with the model's thresholds; default: the model's own")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops


def _axis_dict(values: dict[str, float], axes: list[str], field: str, allow_zero_sum: bool = False) -> list[float]:
    unknown = sorted(set(values) - set(axes))
    if unknown:
        raise ApiError(400, f"{field}: unknown axes {unknown}; this model's axes are {axes}", f"{field}.{unknown[0]}")
    for axis, v in values.items():
        if not math.isfinite(v) or v < 0:
            raise ApiError(400, f"{field}.{axis} must be a finite non-negative number, got {v}", f"{field}.{axis}")
    vector = [float(values.get(a, 0.0)) for a in axes]
    if sum(vector) <= 0:
        raise ApiError(400, f"{field}: at least one axis needs a positive value", field)
    return vector


def check_request(req: ChatRequest, *, model_id: str, axes: list[str] | None, per_token: bool,
                  max_tokens_cap: int, default_max_tokens: int, max_content_chars: int) -> dict:
    """Checks that depend on the model and limits; returns the resolved steering and budget.

    Returns:
        {"max_tokens", "axis_weights" (list in axes order, normalised) or None, "prior" (list) or None}
    """
    if req.model != model_id:
        raise ApiError(404, f"model {req.model!r} is not served here; available: [{model_id!r}]", "model",
                       code="model_not_found")
    for i, m in enumerate(req.messages):
        if not m.content.strip():
            raise ApiError(400, f"messages[{i}].content is empty", f"messages[{i}].content")
        if len(m.content) > max_content_chars:
            raise ApiError(400, f"messages[{i}].content has {len(m.content)} characters; the limit is "
                                f"{max_content_chars}", f"messages[{i}].content")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; send one", "max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if max_tokens is not None and max_tokens > max_tokens_cap:
        raise ApiError(400, f"{field}={max_tokens} is above this server's cap of {max_tokens_cap}", field)
    steering = {"max_tokens": max_tokens or min(default_max_tokens, max_tokens_cap), "axis_weights": None,
                "prior": None}
    if axes is None:
        for name in ("axis_weights", "prior", "routing_mode"):
            if getattr(req, name) is not None:
                raise ApiError(400, f"{name}: model {model_id!r} is not a MoCaE (it has no axes to steer)", name)
        return steering
    if req.axis_weights is not None:
        if req.prior is not None:
            raise ApiError(400, "send axis_weights or prior, not both (fixed weights leave nothing to tilt)", "prior")
        w = _axis_dict(req.axis_weights, axes, "axis_weights")
        steering["axis_weights"] = [x / sum(w) for x in w]
    if req.prior is not None:
        if per_token:
            raise ApiError(400, "prior: this model routes per token; it has no per-request probabilities to tilt",
                           "prior")
        steering["prior"] = _axis_dict(req.prior, axes, "prior")
    if req.routing_mode is not None and per_token and req.axis_weights is None:
        raise ApiError(400, "routing_mode: this model routes per token", "routing_mode")
    return steering
