"""The batching scheduler: one worker thread owns the model and decodes every active request together.

Each step is one forward pass for the whole batch, with one head per row (`adapter_names=[...]`, the mixed-head
path). Between steps, finished and cancelled rows leave (their rows are dropped from the KV cache), new requests
join (they are prefilled together, left-padded, and their cache is merged into the running one), and queued calls
that change the model (loading or deleting a head) run. Nothing else touches the model: one model object needs
one caller at a time.

One request's error is its own: each row's own steps (its random generator, its sampling, its text) run under their
own error handling, so an error there ends that row alone and the batch goes on; a failed prefill fails only the
rows joining in it. Only a failure of a decoding step's shared forward ends the rows of that step.

Joining a running batch needs a KV cache whose layers are plain `DynamicLayer`s (full attention: Llama, GPT-2,
OPT, GPT-NeoX, the embedded SmolLM2, ...). For any other cache (sliding windows, linear attention) the scheduler
falls back to micro-batches: requests gathered within a short window start together, and new ones wait until that
batch has finished. Contextual heads keep their keys in the cache too, as extra layers after the base's (one per
head, holding every row), so they follow the rows' joins, drops and trims as the base's own layers do.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from .registry import HeadRegistry, TextCodec

# Below this temperature a row is greedy, as in vLLM: logits / 1e-300 overflow to inf and softmax gives NaNs, and
# at 1e-5 sampling is already argmax up to exact ties.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one row decodes: temperature 0 (or below 1e-5) is greedy (argmax); otherwise softmax sampling with
    nucleus `top_p`."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens whatever comes (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class Event:
    """What a request hears from the worker: new text, and at the end a finish reason (or an error)."""

    index: int  # which choice of the HTTP request this row is
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length" on the last event of a row
    completion_tokens: int = 0  # tokens generated so far by this row
    error: BaseException | None = None


class Request:
    """One row to generate: a prompt's token ids, the head (a registry row name), sampling settings, and where its
    events go (an asyncio queue of the caller's event loop, shared by the choices of one HTTP request)."""

    _ids = itertools.count()

    def __init__(
        self,
        prompt_ids: Sequence[int],
        head: str,
        params: SamplingParams,
        sink: asyncio.Queue,
        loop: asyncio.AbstractEventLoop,
        index: int = 0,
    ) -> None:
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.head = head
        self.params = params
        self.index = index
        self._sink, self._loop = sink, loop
        self.cancelled = False  # set from the event loop; read by the worker at step boundaries
        self.finished = False  # set by the worker when the row's last event is posted

    def post(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._sink.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody listens any more
            pass


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    position: int  # position id of the token fed next (= real tokens in the cache)
    next_token: int = -1  # sampled, not yet fed
    tokens: list[int] = field(default_factory=list)  # generated, without a final eos
    generated: int = 0  # tokens sampled, eos included
    sent_chars: int = 0  # characters of the decoded text already posted


@dataclass
class _Call:
    """A function the worker runs between steps once `ready()` holds; its result or error goes to `future`."""

    function: Callable[[], Any]
    ready: Callable[[], bool]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class SchedulerStats:
    active: int
    waiting: int
    steps: int
    joined_running_batch: int  # requests admitted while other rows were decoding
    max_batch_seen: int
    cancelled: int  # rows dropped because their client went away
    failed: int  # rows ended by an error in one of their own steps (seeding, sampling, decoding), the batch going on
    trimmed_columns: int  # cache columns dropped because they were padding in every remaining row


class BatchScheduler:
    """Owns the model in one worker thread; `submit` queues rows, `call` runs model changes between steps."""

    def __init__(
        self,
        registry: HeadRegistry,
        codec: TextCodec,
        *,
        max_batch: int = 32,
        window_s: float = 0.01,
        context_length: int,
    ) -> None:
        self.registry = registry
        self.codec = codec
        self.max_batch = max_batch
        self.window_s = window_s
        self.context_length = context_length
        self._condition = threading.Condition()
        self._waiting: list[Request] = []
        self._calls: list[_Call] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cached positions), 1 where a real token is
        self._stopping = False
        self._fixed: ExitStack | None = None  # the heads' "weights fixed" block, open between model changes
        self._steps = self._joined = self._max_batch_seen = self._cancelled = self._failed = self._trimmed = 0
        self._thread = threading.Thread(target=self._run, name="peft-backattn-scheduler", daemon=True)
        self._thread.start()

    # -- the event loop's side ----------------------------------------------------------------------------------

    def submit(self, requests: Sequence[Request]) -> None:
        with self._condition:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._waiting.extend(requests)
            self._condition.notify()

    def cancel(self, requests: Sequence[Request]) -> None:
        """Rows of a client that went away: they leave the batch at the next step boundary."""
        with self._condition:
            for request in requests:
                request.cancelled = True
            self._condition.notify()

    def call(self, function: Callable[[], Any], ready: Callable[[], bool] = lambda: True) -> asyncio.Future:
        """Run `function` in the worker between two steps (once `ready()` is true); await the returned future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._condition:
            self._calls.append(_Call(function, ready, future, loop))
            self._condition.notify()
        return future

    def uses_head(self, head: str) -> bool:
        """Whether a running or waiting row decodes with `head` (read by the worker in `ready()` checks)."""
        return any(r.request.head == head for r in self._rows) or any(
            w.head == head and not w.cancelled for w in self._waiting
        )

    def stats(self) -> SchedulerStats:
        with self._condition:
            return SchedulerStats(
                len(self._rows), len(self._waiting), self._steps, self._joined, self._max_batch_seen, self._cancelled,
                self._failed, self._trimmed,
            )  # fmt: skip

    def close(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join(timeout)

    # -- the worker -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                while not (self._stopping or self._waiting or self._rows or self._ready_calls()):
                    self._condition.wait(timeout=0.5 if self._calls else None)
                if self._stopping:
                    break
                calls = self._ready_calls()
                self._calls = [c for c in self._calls if c not in calls]
            if calls:
                self._leave_fixed()  # a load or unload changes the model: the heads check their caches again after
            for call in calls:
                self._run_call(call)
            try:
                self._enter_fixed()
                self._admit()
                if self._rows:
                    self._step()
            except Exception as error:  # a failed forward fails the rows in it, never the worker
                self._fail_all(error)
        self._leave_fixed()
        self._fail_all(RuntimeError("the server is shutting down"), include_waiting=True)

    def _enter_fixed(self) -> None:
        """Hold the heads' `weights_fixed()` block across steps: nothing changes a weight between two calls, so the
        heads compare their cached tensors with the base weights once, not at every step."""
        fixed = getattr(getattr(self.registry.model, "base_model", None), "weights_fixed", None)
        if self._fixed is None and fixed is not None:
            self._fixed = ExitStack()
            self._fixed.enter_context(fixed())

    def _leave_fixed(self) -> None:
        if self._fixed is not None:
            self._fixed.close()
            self._fixed = None

    def _ready_calls(self) -> list[_Call]:
        return [c for c in self._calls if c.ready()]

    def _run_call(self, call: _Call) -> None:
        try:
            result, error = call.function(), None
        except Exception as caught:
            result, error = None, caught

        def settle() -> None:
            if call.future.cancelled():
                return
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(result)

        try:
            call.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    def _admit(self) -> None:
        """Prefill waiting requests and merge them into the running batch (or start one)."""
        if self._rows and not self._can_join():
            return
        if not self._rows and self._waiting and len(self._waiting) < self.max_batch and self.window_s > 0:
            time.sleep(self.window_s)  # an idle server gathers the requests arriving together
        with self._condition:
            room = self.max_batch - len(self._rows)
            self._cancelled += sum(w.cancelled for w in self._waiting)
            self._waiting = [w for w in self._waiting if not w.cancelled]
            admitted, self._waiting = self._waiting[:room], self._waiting[room:]
        rows = []
        for request in admitted:  # each row's own generator: a seed it cannot take fails that row alone
            try:
                rows.append(_Row(request, _generator(request.params.seed), len(request.prompt_ids)))
            except Exception as error:
                self._fail_row(request, "seeding its random generator", error)
        if not rows:
            return
        try:
            logits = self._prefill(rows)
        except Exception as error:  # the joining rows fail (never wait forever); the running ones carry on
            for row in rows:
                row.request.post(Event(row.request.index, error=error))
            return
        self._rows += rows
        self._max_batch_seen = max(self._max_batch_seen, len(self._rows))
        self._sample_and_emit(rows, logits)
        self._drop_finished()

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """One forward over the joining rows' prompts (left-padded) into a new cache, merged into the running one;
        the running rows' cache is left as it was if this fails."""
        width = max(len(r.request.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.codec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row.request.prompt_ids
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.registry.model.config)
        logits = self._forward(input_ids, mask, positions, cache, [r.request.head for r in rows])
        if self._rows:
            self._merge(cache, mask)
            self._joined += len(rows)
        else:
            self._cache, self._mask = cache, mask
        return logits

    def _can_join(self) -> bool:
        return self._cache is not None and all(type(layer) is DynamicLayer for layer in self._cache.layers)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append new rows (their cache and mask) below the running ones, left-padding the shorter side.

        The two caches may hold different extra layers after the base's (a contextual head's keys, one layer per head,
        written only once that head has run on the cache): a layer one side lacks, has never written, or has left at
        another length than its rows' positions (the slot of a deleted head) is zeros there, for rows that never read
        it. Everything is built before anything is assigned, so a failure (out of memory) leaves the running cache
        whole.
        """
        old_rows, old_width = self._mask.shape
        new_rows, new_width = mask.shape
        width = max(old_width, new_width)
        merged = []
        for index in range(max(len(self._cache.layers), len(cache.layers))):
            old, new = _written(self._cache, index, old_width), _written(cache, index, new_width)
            if old is None and new is None:
                merged.append(None)  # neither side holds it: an empty layer
                continue
            like = old if old is not None else new
            old = old if old is not None else _zeros(like, old_rows, old_width)
            new = new if new is not None else _zeros(like, new_rows, new_width)
            merged.append(
                [
                    torch.cat([_left_pad(o, width, dim=-2), _left_pad(n, width, dim=-2)])
                    for o, n in zip(old, new, strict=True)
                ]
            )
        merged_mask = torch.cat([_left_pad(self._mask, width, dim=-1), _left_pad(mask, width, dim=-1)])
        layers = self._cache.layers
        layers.extend(DynamicLayer() for _ in range(len(merged) - len(layers)))
        for index, states in enumerate(merged):
            _assign(layers, index, states)
        self._mask = merged_mask

    def _step(self) -> None:
        rows = self._rows
        input_ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=-1)
        logits = self._forward(input_ids, self._mask, positions, self._cache, [r.request.head for r in rows])
        for row in rows:
            row.position += 1
        self._steps += 1
        self._sample_and_emit(rows, logits)
        self._drop_finished()

    @torch.no_grad()
    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        heads: list[str],
    ) -> torch.Tensor:
        model: PreTrainedModel = self.registry.model
        device = self.registry.device
        kwargs = {"adapter_names": heads} if self.registry.has_heads else {}
        kwargs[self.registry.cache_argument] = cache
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return output.logits[:, -1].float()

    def _sample_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits (row i of `logits` is rows[i]) and post its text.

        Each row's sampling and text are its own: an error in them ends that row alone, and the batch goes on.
        """
        greedy = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            params = row.request.params
            try:
                token = greedy[i] if params.greedy else _sample(logits[i], params, row)
            except Exception as error:
                self._fail_row(row.request, "sampling its next token", error)
                continue
            row.generated += 1
            row.next_token = token
            try:
                self._emit(row, token)
            except Exception as error:
                self._fail_row(row.request, "decoding its text", error)

    def _fail_row(self, request: Request, step: str, error: BaseException) -> None:
        """End one row with an error of its own; `_drop_finished` takes it out of the batch."""
        request.finished = True
        self._failed += 1
        message = f"{step} failed for this request ({type(error).__name__}: {_one_line(error)})"
        request.post(Event(request.index, error=RowError(message)))

    def _emit(self, row: _Row, token: int) -> None:
        """Post the row's new text; finish it on eos, a stop string, max_tokens or the end of the context."""
        request, params = row.request, row.request.params
        finish = None
        if token in self.codec.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            row.tokens.append(token)
        text = self.codec.decode(row.tokens)
        end = len(text)
        if params.stop:
            search_from = max(0, row.sent_chars - max(len(s) for s in params.stop) + 1)
            hits = [i for i in (text.find(s, search_from) for s in params.stop) if i >= 0]
            if hits:
                end, finish = min(hits), "stop"
        if finish is None and (row.generated >= params.max_tokens or row.position + 1 >= self.context_length):
            finish = "length"
        if finish is None:
            if params.stop:  # hold back what could be the start of a stop string
                end -= max(len(s) for s in params.stop) - 1
            while end > row.sent_chars and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                end -= 1
        new_text = text[row.sent_chars : end] if end > row.sent_chars else ""
        row.sent_chars = max(row.sent_chars, end)
        if finish is not None:
            request.finished = True
        if new_text or finish is not None:
            request.post(Event(request.index, new_text, finish, row.generated))

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not (r.request.finished or r.request.cancelled)]
        if len(keep) == len(self._rows):
            return
        self._cancelled += sum(r.request.cancelled and not r.request.finished for r in self._rows)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._cache.batch_select_indices(index.to(self.registry.device))
        self._mask = self._mask[index]
        if self._can_join():  # drop the columns that are padding in every remaining row
            first = int(self._mask.any(dim=0).nonzero()[0])
            if first:
                width = self._mask.shape[1]
                for index in range(len(self._cache.layers)):
                    states = _written(self._cache, index, width)
                    _assign(self._cache.layers, index, None if states is None else [s[..., first:, :] for s in states])
                self._mask = self._mask[:, first:]
                self._trimmed += first

    def _fail_all(self, error: BaseException, include_waiting: bool = False) -> None:
        for row in self._rows:
            row.request.post(Event(row.request.index, error=error))
        self._rows, self._cache, self._mask = [], None, None
        if include_waiting:
            with self._condition:
                waiting, self._waiting = self._waiting, []
                calls, self._calls = self._calls, []
            for request in waiting:
                request.post(Event(request.index, error=error))
            for call in calls:
                self._run_call(_Call(_raiser(error), call.ready, call.future, call.loop))


class RowError(RuntimeError):
    """An error in one row's own step (seeding, sampling, decoding): it ends that row, not the batch."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _raiser(error: BaseException) -> Callable[[], Any]:
    def raise_it() -> Any:
        raise error

    return raise_it


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def _sample(logits: torch.Tensor, params: SamplingParams, row: _Row) -> int:
    """One token from softmax(logits / temperature), restricted to the smallest set of mass >= top_p."""
    probs = torch.softmax(logits.cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= params.top_p] = 0.0  # the top token always stays (its `before` is 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _written(cache: DynamicCache, index: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys and values of cache layer `index` if it holds all `width` positions of its rows; None if the cache has
    no such layer, has never written it, or has left it behind at another length (a deleted contextual head's)."""
    if index >= len(cache.layers):
        return None
    layer = cache.layers[index]
    if not layer.is_initialized or layer.get_seq_length() != width:
        return None
    return layer.keys, layer.values


def _zeros(like: tuple[torch.Tensor, torch.Tensor], rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `rows` rows and `width` positions, all zero, shaped and typed as `like`'s."""
    return tuple(t.new_zeros((rows, *t.shape[1:-2], width, t.shape[-1])) for t in like)


def _assign(layers: list, index: int, states: Sequence[torch.Tensor] | None) -> None:
    """Set cache layer `index` to (keys, values), or to an empty layer for None (freeing what a left-behind layer
    held)."""
    if states is None:
        if layers[index].is_initialized:
            layers[index] = DynamicLayer()
        return
    keys, values = states
    if not layers[index].is_initialized:
        layers[index].lazy_initialization(keys, values)
    layers[index].keys, layers[index].values = keys, values


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
