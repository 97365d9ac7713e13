"""Batching of chat requests whose rows carry different mixtures (dynamic + continuous).

One worker thread owns the model. It takes the oldest waiting request, waits ``batch_wait_ms``
for others to join (up to ``max_batch``), routes every row (its own axis weights, or the
calibrated router with its own prior / mode), and decodes the rows together with one KV cache:
each row's expert weights go through the mixer's unmerged path as a (B, E) tensor, so one
forward pass serves every mixture at the cost of one rank-E*r LoRA. A batch of one (alone from
the start, or the last row left) gets the merged fast path (the mixture folded into W0) when
nobody waits to join and its remaining budget makes the merge pay (``LoraMixer.merge_pays``).
Rows leave the batch (and its KV cache) as they finish, time out or their client disconnects.
With ``continuous`` (default), requests arriving mid-decode are prefilled on their own and join
the running batch at the next step (their KV cache left-padded to the batch's, or the batch's to
theirs; a merged batch of one is unmerged first); caches other than plain ``DynamicLayer`` ones
(sliding windows) only batch dynamically.

Events go back to the asyncio side through ``Row.emit``: ("routing", dict), ("delta", text),
("done", finish_reason, usage), ("error", ApiError).
"""

from __future__ import annotations

import copy
import inspect
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from mocae.serve.schema import ApiError


@dataclass
class Row:
    """One request in the batcher."""

    prompt_ids: list[int]
    max_tokens: int
    emit: callable
    axis_weights: list[float] | None = None
    prior: list[float] | None = None
    routing_mode: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    deadline: float = float("inf")
    stream: bool = True  # False: the text comes in one piece at the end (no wake-up of the server per token)
    ignore_eos: bool = False  # decode max_tokens whatever the model says (benchmarks: equal lengths on both sides)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    cancelled: bool = False
    # filled while decoding
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    text: str = ""  # detokenised so far (streams and stop strings only), complete characters
    text_ids: list[int] = field(default_factory=list)  # the generated ids that are text (no EOS)
    text_window: tuple[int, int] = (0, 0)  # (prefix, read) offsets into text_ids, see Batcher._advance_text
    stop_scanned: int = 0  # len(text) already searched for stop strings
    weights: torch.Tensor | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Client went away: the worker drops the row at its next step."""
        self.cancelled = True


class ServedModel:
    """What the batcher needs from a model: chat encoding, routing and a cached forward.

    ``model`` is a ``MoCaEModel`` (``axes`` set) or any causal LM (base model, a peft adapter).
    """

    def __init__(self, model, tokenizer, model_id: str):
        from mocae.generation import _eos_ids
        from mocae.spec import capabilities_of

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.is_mocae = capabilities_of(model).router
        self.axes: list[str] | None = list(model.axes) if self.is_mocae else None
        self.per_token = self.is_mocae and not model.routes_per_request
        self.eos = set(_eos_ids(model, tokenizer).tolist())
        self._encoder = None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.max_context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        # transformers 5.x renames the forward's past_key_values to cache (the old name warns until 5.40)
        hf = model.peft_model if self.is_mocae else model
        hf = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
        self.cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        if not tokenizer.chat_template:
            raise ValueError(f"model {model_id!r}: its tokenizer has no chat template; the chat API needs one")

    def encode(self, messages: list[dict]) -> list[int]:
        """Chat-template the messages (as ``mocae.generation.chat_prompt`` does) and tokenize.

        Called on the server's event loop while the worker decodes: a copy of the tokenizer of its
        own, as a Rust tokenizer shared by two threads can fail with "Already borrowed".
        """
        if self._encoder is None:
            self._encoder = copy.deepcopy(self.tokenizer)
        text = self._encoder.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._encoder(text, add_special_tokens=False)["input_ids"]

    def warmup(self) -> None:
        """Route and decode one token once, so the first request does not pay for lazy loads (MiniLM)."""
        row = Row(prompt_ids=self.encode([{"role": "user", "content": "hello"}]), max_tokens=1, emit=lambda ev: None)
        Batcher(self)._decode([row])

    # routing ----------------------------------------------------------------------------------------
    def group(self, row: Row) -> str:
        """Rows of one group share a batch: token-routed rows cannot share one with fixed-weight rows."""
        return "token" if self.per_token and row.axis_weights is None else "weights"

    @torch.no_grad()
    def route(self, rows: list[Row], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Set each row's weights (E,) or None (per-token routing) and emit its routing record."""
        if not self.is_mocae:
            for r in rows:
                r.emit(("routing", None))
            return
        from mocae.mixture.decide import decide

        need = [i for i, r in enumerate(rows) if r.axis_weights is None and not self.per_token]
        probs = self.model.routing_probs(ids[need], mask[need]) if need else None
        for i, r in enumerate(rows):
            record = {"mode": None, "weights": None, "probabilities": None}
            if r.axis_weights is not None:
                r.weights = torch.tensor(r.axis_weights, dtype=torch.float32)
                record["mode"] = "axis_weights"
            elif self.per_token:
                record["mode"] = "token"
            else:
                calibrated = probs[need.index(i)].float()
                p = calibrated
                if r.prior is not None:  # tilts the blend; the gate reads the untilted probabilities
                    p = p * torch.tensor(r.prior)
                    p = p / p.sum().clamp_min(1e-12)
                record["probabilities"] = dict(zip(self.axes, p.tolist()))
                decision = self.decision(r.routing_mode)
                r.weights = decide(p[None], decision, self.axes, calibrated[None])[0]
                record["mode"] = "blend" if decision.mode == "soft" else decision.mode
            if r.weights is not None:
                record["weights"] = dict(zip(self.axes, r.weights.tolist()))
            r.emit(("routing", record))

    def decision(self, routing_mode: str | None):
        """The DecisionConfig of a request: the model's own, or its mode replaced by ``routing_mode``
        (``blend`` is ``soft``; thresholds and the fitted gate stay the model's)."""
        own = self.model.mocae_config.decision
        if routing_mode is None:
            return own
        return own.model_copy(update={"mode": "soft" if routing_mode == "blend" else routing_mode})

    def check_routing_mode(self, routing_mode: str | None) -> None:
        """Raises ApiError 400 when this model cannot route that way (a gate without a fitted threshold)."""
        if routing_mode is None or not self.is_mocae or self.per_token:
            return
        decision = self.decision(routing_mode)
        if decision.gates and (decision.gate_threshold is None or decision.gate_axis not in self.axes):
            raise ApiError(400, f"routing_mode {routing_mode!r}: this model has no fitted harm gate "
                                f"(gate_threshold is unset or {decision.gate_axis!r} is not an expert)", "routing_mode")

    # forward --------------------------------------------------------------------------------------
    def merge(self, weights: torch.Tensor | None, new_tokens: int | None = None) -> bool:
        """Batch of one with fixed weights: fold the mixture into W0 (zero decode overhead) when
        ``new_tokens`` more decode steps make the merge pay (``LoraMixer.merge_pays``). True if merged."""
        if (not self.is_mocae or weights is None or weights.shape[0] != 1
                or not self.model.mocae_config.merge_single_request or not weights.any()
                or not self.model.mixer.merge_pays(new_tokens)):
            return False  # (all-zero weights, top1's base fallback: the backbone alone, nothing to merge)
        self.model.mixer.merge(weights[0])
        return True

    def unmerge(self) -> None:
        self.model.mixer.unmerge()

    def forward(self, ids, mask, positions, cache, weights) -> torch.Tensor:
        """Logits (B, V) of the last position; ``weights`` (B, E) per row or None."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self.cache_kw: cache,
                  "use_cache": True, "logits_to_keep": 1}
        if not self.is_mocae:
            return self.model(**kwargs).logits[:, -1, :].float()
        kwargs["routing_weights"] = weights
        if weights is not None and not weights.any(-1).all():
            # all-zero rows (a top1 decision's base fallback) are the backbone alone; the model accepts
            # them under a decision that may produce them
            from mocae.mixture.decide import using_decision

            with using_decision(self.model, mode="top1", top1_fallback="base"):
                return self.model(**kwargs).logits[:, -1, :].float()
        return self.model(**kwargs).logits[:, -1, :].float()


class Batcher:
    """Bounded queue + one worker thread decoding batches of rows (see the module docstring)."""

    def __init__(self, served: ServedModel, max_batch: int = 16, max_queue: int = 64, batch_wait_ms: float = 5.0,
                 continuous: bool = True):
        self.served = served
        self.continuous = continuous
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait_ms / 1000
        self._pending: list[Row] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.active = 0
        self.stats = {"batches": 0, "rows": 0, "max_batch": 0, "merged_batches": 0, "cancelled": 0,
                      "timed_out": 0, "tokens": 0, "last_batch": 0, "joined": 0,
                      # where the worker's time goes: prefill (routing included) and decode steps, wall
                      # and the worker thread's CPU time (all of torch's at one thread; robust to a busy machine)
                      "prefill_s": 0.0, "prefill_cpu_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0,
                      "decode_cpu_s": 0.0, "decode_tokens": 0, "merge_s": 0.0}

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mocae-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for r in pending:
            r.emit(("error", ApiError(503, "server shutting down", type="server_error")))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, row: Row) -> None:
        """Queue a row. Raises ApiError 429 when the queue is full, 503 when stopped."""
        with self._cond:
            if self._stop:
                raise ApiError(503, "server shutting down", type="server_error")
            if len(self._pending) >= self.max_queue:
                raise ApiError(429, f"server busy: {len(self._pending)} requests waiting (limit {self.max_queue}); "
                                    "retry later", type="rate_limit_error", code="queue_full")
            self._pending.append(row)
            self._cond.notify()

    # worker ---------------------------------------------------------------------------------------
    def _take(self) -> list[Row] | None:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return None
            first_seen = time.monotonic()
            while len(self._pending) < self.max_batch:
                left = self.batch_wait - (time.monotonic() - first_seen)
                if left <= 0:  # (a negative timeout would make wait() raise)
                    break
                self._cond.wait(left)
                if self._stop:
                    return None
            group = self.served.group(self._pending[0])
            batch = [r for r in self._pending if self.served.group(r) == group][:self.max_batch]
            taken = set(map(id, batch))
            self._pending = [r for r in self._pending if id(r) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            rows = self._take()
            if rows is None:
                return
            self.active = len(rows)
            try:
                self._decode(rows)
            except Exception as err:  # a bug must not kill the worker: fail these rows, keep serving
                for r in rows:
                    r.emit(("error", ApiError(500, f"decoding failed: {type(err).__name__}: {err}",
                                              type="server_error")))
            finally:
                self.active = 0

    def _finish(self, row: Row, reason: str) -> None:
        text = self._text(row, final=True)
        delta = text[len(row.sent):]
        if delta:
            row.emit(("delta", delta))
        row.sent = text
        self.stats["tokens"] += len(row.generated)
        row.emit(("done", reason, {"prompt_tokens": len(row.prompt_ids), "completion_tokens": len(row.generated),
                                   "total_tokens": len(row.prompt_ids) + len(row.generated)}))

    def _advance_text(self, row: Row, token: int) -> None:
        """Detokenise one more token incrementally (as TGI and vLLM do): decode a window that
        starts a few tokens back, so BPE merges and spaces come out as in a full decode, and take
        what it adds; a window ending inside a UTF-8 character waits for the next token. A full
        decode per token would make a long answer quadratic."""
        if token in self.served.eos:
            return
        row.text_ids.append(token)
        prefix, read = row.text_window
        decode = self.served.tokenizer.decode
        before = decode(row.text_ids[prefix:read], skip_special_tokens=True)
        after = decode(row.text_ids[prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            row.text += after[len(before):]
            row.text_window = (read, len(row.text_ids))

    def _text(self, row: Row, final: bool = False) -> str:
        """The answer's text so far (held back where a stop string may start); ``final``: from a
        full decode of every generated id, what the client gets in the end."""
        if final:
            ids = [t for t in row.generated if t not in self.served.eos]
            text = self.served.tokenizer.decode(ids, skip_special_tokens=True)
        else:
            text = row.text
        if row.stop:
            cut = min((i for i in (text.find(s) for s in row.stop) if i >= 0), default=-1)
            if cut >= 0:
                return text[:cut]
            if not final:  # hold back what could be the start of a stop string
                text = text[:max(len(text) - max(map(len, row.stop)) + 1, len(row.sent))]
        return text

    def _hit_stop(self, row: Row) -> bool:
        """A stop string in the text: only its new end is searched (with room for a stop string
        that began in the part already searched)."""
        if not row.stop:
            return False
        start = max(0, row.stop_scanned - max(map(len, row.stop)) + 1)
        row.stop_scanned = len(row.text)
        return any(s in row.text[start:] for s in row.stop)

    def _next_tokens(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, r in enumerate(rows):
            if r.temperature < 1e-4:  # greedy (a vanishing temperature would overflow the softmax)
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i] / r.temperature, -1)
            if r.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < r.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            if r.generator is None:
                r.generator = torch.Generator()
                r.generator.manual_seed(r.seed if r.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big"))
            out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
        return out

    def _live(self, rows: list[Row]) -> list[Row]:
        """Rows still wanted: cancelled ones are dropped, ones past their deadline told so."""
        now, live = time.monotonic(), []
        for r in rows:
            if r.cancelled:
                self.stats["cancelled"] += 1
            elif now > r.deadline:
                self.stats["timed_out"] += 1
                r.emit(("error", ApiError(504, "request timed out while queued", type="timeout")))
            else:
                live.append(r)
        return live

    def _prefill(self, rows: list[Row]):
        """Route and prefill ``rows`` as one left-padded batch with a fresh KV cache.

        Returns:
            (logits (B, V), cache, mask (B, T), last positions (B, 1), weights (B, E) or None).
        """
        from transformers import DynamicCache

        served = self.served
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[served.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
        served.route(rows, ids, mask)
        weights = None if rows[0].weights is None else torch.stack([r.weights for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = served.forward(ids, mask, positions, cache, weights)
        return logits, cache, mask, positions[:, -1:], weights

    def _joiners(self, group: str, room: int) -> list[Row]:
        """Waiting rows of ``group`` that can join the running batch (continuous batching)."""
        with self._cond:
            if self._stop:
                return []
            take = [r for r in self._pending if self.served.group(r) == group][:room]
            if take:
                taken = set(map(id, take))
                self._pending = [r for r in self._pending if id(r) not in taken]
        return self._live(take)

    @staticmethod
    def _joinable(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in cache.layers)

    @staticmethod
    def _concat(cache, mask, other, other_mask):
        """Stack two batches' KV caches and masks, left-padding the shorter one (masked out)."""
        t, u = mask.shape[1], other_mask.shape[1]
        width = max(t, u)

        def pad(x, n, dim):
            if n == 0:
                return x
            shape = list(x.shape)
            shape[dim] = n
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for layer, new in zip(cache.layers, other.layers):
            layer.keys = torch.cat([pad(layer.keys, width - t, 2), pad(new.keys, width - u, 2)], dim=0)
            layer.values = torch.cat([pad(layer.values, width - t, 2), pad(new.values, width - u, 2)], dim=0)
        return torch.cat([pad(mask, width - t, 1), pad(other_mask, width - u, 1)], dim=0)

    def _merge(self, weights: torch.Tensor | None, rows: list[Row]) -> bool:
        """Merge a batch of one when nobody waits to join (a join would unmerge it again at once)
        and its remaining budget makes the merge pay. True if merged."""
        if len(rows) != 1 or (self.continuous and self._pending):
            return False
        r = rows[0]
        left = min(r.max_tokens, self.served.max_context - len(r.prompt_ids)) - len(r.generated)
        begin = time.perf_counter()
        merged = self.served.merge(weights, left)
        if merged:
            self.stats["merged_batches"] += 1
            self.stats["merge_s"] += time.perf_counter() - begin
        return merged

    def _unmerge(self) -> None:
        begin = time.perf_counter()
        self.served.unmerge()
        self.stats["merge_s"] += time.perf_counter() - begin

    def _timed_prefill(self, rows: list[Row]):
        begin, cpu = time.perf_counter(), time.thread_time()
        out = self._prefill(rows)
        self.stats["prefill_s"] += time.perf_counter() - begin
        self.stats["prefill_cpu_s"] += time.thread_time() - cpu
        self.stats["prefill_tokens"] += sum(len(r.prompt_ids) for r in rows)
        return out

    @torch.no_grad()
    def _decode(self, rows: list[Row]) -> None:
        rows = self._live(rows)
        if not rows:
            return
        served = self.served
        group = served.group(rows[0])
        logits, cache, mask, positions, weights = self._timed_prefill(rows)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["last_batch"] = len(rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        merged = False  # a batch of one gets the mixture folded into W0 (see _merge)
        try:
            while rows:
                if self.continuous and self._pending and len(rows) < self.max_batch and self._joinable(cache):
                    joiners = self._joiners(group, self.max_batch - len(rows))
                    if joiners:
                        if merged:  # from here on each row's weights go through the unmerged path
                            self._unmerge()
                            merged = False
                        new_logits, new_cache, new_mask, new_positions, new_weights = self._timed_prefill(joiners)
                        mask = self._concat(cache, mask, new_cache, new_mask)
                        logits = torch.cat([logits, new_logits])
                        positions = torch.cat([positions, new_positions])
                        weights = None if weights is None else torch.cat([weights, new_weights])
                        rows = rows + joiners
                        self.stats["joined"] += len(joiners)
                        self.stats["rows"] += len(joiners)
                        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
                tokens = self._next_tokens(logits, rows)
                keep = []
                for i, (r, t) in enumerate(zip(rows, tokens)):
                    r.generated.append(t)
                    if r.stream or r.stop:  # a plain answer without stop strings is decoded once, at the end
                        self._advance_text(r, t)
                    if r.cancelled:
                        self.stats["cancelled"] += 1
                    elif time.monotonic() > r.deadline:
                        self.stats["timed_out"] += 1
                        r.emit(("error", ApiError(504, f"request timed out after {len(r.generated)} tokens",
                                                  type="timeout")))
                    elif (t in served.eos and not r.ignore_eos) or self._hit_stop(r):
                        self._finish(r, "stop")
                    elif len(r.generated) >= r.max_tokens or len(r.prompt_ids) + len(r.generated) >= served.max_context:
                        self._finish(r, "length")
                    else:
                        text = self._text(r) if r.stream else r.sent
                        if len(text) > len(r.sent):
                            r.emit(("delta", text[len(r.sent):]))
                            r.sent = text
                        keep.append(i)
                if not keep:
                    break
                if len(keep) < len(rows):  # drop finished rows from the batch and its KV cache
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    weights = None if weights is None else weights[index]
                    tokens = [tokens[i] for i in keep]
                    rows = [rows[i] for i in keep]
                if not merged:  # alone from the start, or the last row left of a batch
                    merged = self._merge(weights, rows)
                step = torch.tensor(tokens)[:, None]
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
                positions = positions + 1
                begin, cpu = time.perf_counter(), time.thread_time()
                logits = served.forward(step, mask, positions, cache, weights)
                self.stats["decode_s"] += time.perf_counter() - begin
                self.stats["decode_cpu_s"] += time.thread_time() - cpu
                self.stats["decode_tokens"] += len(rows)
        finally:
            if merged:
                self._unmerge()
