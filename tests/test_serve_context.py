"""Contextual heads in the server: served in the same mixed batches as plain heads and the base.

A contextual head keeps its keys as extra layers of the batch's KV cache (one slot per head), so they must follow the
scheduler's row joins (a prefill merged below the running rows, left-padded), drops and trims, whichever side holds
which slots. The worker is held at chosen forwards (`Gate`) so that the waves of requests below join a batch that is
decoding, after some of its rows have left; every answer must still equal its head alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from test_serve import (
    BASE,
    LONG_WAIT,
    PROMPTS,
    Gate,
    Reference,
    post,
    rest_of,
    save_head,
    save_lively_lm,
    serving,
    start_stream,
    wait_for,
    wait_idle,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_backattn import BackAttnConfig
from peft_backattn.serve.server import BackgroundServer, build_state

CONTEXT = {"r": 8, "context": True, "context_dim": 16, "context_heads": 2}
CONFIGS = {
    "ctx": CONTEXT,  # slot 0: reads layers 0 and 1, attends over every earlier position
    "ctx_window": CONTEXT | {"context_window": 4, "context_layers": [0]},  # slot 1
    "taps": CONTEXT | {"context_attention": False},  # taps only: no keys, no slot
    "plain": {"r": 8},
    "late": CONTEXT | {"context_window": 3},  # loaded while serving: slot 2
}
SERVED = ["ctx", "ctx_window", "taps", "plain"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_lively_lm(tmp_path_factory.mktemp("lively") / "model")


@pytest.fixture(scope="module")
def heads(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heads")
    return {
        name: save_head(model_dir, root / name, seed, BackAttnConfig(**fields))
        for seed, (name, fields) in enumerate(CONFIGS.items(), 1)
    }


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, heads, tokenizer):
    yield from serving(model_dir, tokenizer, {name: heads[name] for name in SERVED}, max_batch=16, batch_window_ms=5)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=LONG_WAIT)


@pytest.fixture(scope="module")
def reference(model_dir, heads, tokenizer) -> Reference:
    return Reference(model_dir, heads, tokenizer)


@pytest.fixture
def gate(server, monkeypatch) -> Gate:
    held = Gate(server.state.scheduler, monkeypatch)
    yield held
    held.open()  # a failed test must not leave the worker held


def complete(client, name: str, prompt: str, max_tokens: int, stream: bool = False) -> str:
    """The text of one greedy completion, streamed or not."""
    answer = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=stream)
    if stream:
        return "".join(c.choices[0].text for c in answer if c.choices)
    return answer.choices[0].text


def send(pool, client, scheduler, jobs: list[tuple]) -> list:
    """Submit the jobs (name, prompt, max_tokens[, stream]) at once and return their futures once all wait to join."""
    waiting = scheduler.stats().waiting
    futures = [pool.submit(complete, client, *job) for job in jobs]
    wait_for(lambda: scheduler.stats().waiting == waiting + len(jobs))
    return futures


def test_contextual_heads_join_a_running_batch_leave_and_each_equal_their_head_alone(client, server, reference, gate):
    """Two waves join a decoding stream of a contextual head: the first while the cache holds only that head's slot,
    with rows of the longest prompts that leave early (their padding columns are trimmed); the second, with rows of
    the other contextual head (a slot the running cache has never written), after them."""
    scheduler = server.state.scheduler
    before = scheduler.stats()
    first = [("plain", PROMPTS[3], 2), ("ctx_window", PROMPTS[3], 3), ("taps", PROMPTS[1], 4), (BASE, PROMPTS[0], 8)]
    second = [
        ("ctx", PROMPTS[0], 6),
        ("ctx", PROMPTS[2], 9, True),
        ("plain", PROMPTS[1], 7),
        (BASE, PROMPTS[2], 3),
        ("taps", PROMPTS[3], 5, True),
        ("ctx_window", PROMPTS[1], 10),
    ]
    gate.hold_after(1)  # the stream's prefill; its first step is held
    chunks, received = start_stream(client, "ctx_window", PROMPTS[0], 40)
    with ThreadPoolExecutor(len(first) + len(second)) as pool:
        answers = send(pool, client, scheduler, first)
        gate.hold_after(5)  # the stream's step, the wave's prefill (its first token) and 3 steps: rows of <= 4 leave
        gate.wait_held()
        assert scheduler.stats().active == 2  # the stream and the base's row; the rows of the longest prompt left,
        assert scheduler.stats().trimmed_columns > before.trimmed_columns  # and the columns only they used went
        answers += send(pool, client, scheduler, second)
        gate.open()
        texts = [answer.result(timeout=LONG_WAIT) for answer in answers]
    assert rest_of(chunks, received) == reference.completion("ctx_window", PROMPTS[0], 40)[0]
    for (name, prompt, max_tokens, *_), text in zip(first + second, texts, strict=True):
        assert text == reference.completion(name, prompt, max_tokens)[0], (name, prompt, max_tokens)
    assert scheduler.stats().joined_running_batch - before.joined_running_batch == len(first) + len(second)
    wait_idle(server)


def test_a_contextual_head_loaded_while_serving_gets_a_new_slot_and_joins_the_running_batch(
    client, server, heads, reference, gate
):
    """`late` is loaded between two steps of a running contextual stream, its rows join that batch, then it is
    unloaded while the stream runs on (its slot left behind in the cache) and rows of the other heads join again."""
    scheduler = server.state.scheduler
    before = scheduler.stats()
    gate.hold_after(1)
    chunks, received = start_stream(client, "ctx", PROMPTS[3], 80)
    with ThreadPoolExecutor(4) as pool:
        body = {"lora_name": "late", "lora_path": str(heads["late"])}
        loading = pool.submit(post, server, "/load_lora_adapter", body)
        wait_for(lambda: scheduler._calls)  # queued: it runs after the held step
        gate.hold_after(1)
        assert loading.result(timeout=LONG_WAIT) == (200, "Success: LoRA adapter 'late' added successfully.")
        gate.wait_held()
        slots = server.state.registry.model.base_model.model.get_output_embeddings()._context_slots
        assert slots == {"ctx": 0, "ctx_window": 1, "late": 2}

        joining = send(pool, client, scheduler, [("late", PROMPTS[0], 9), ("plain", PROMPTS[2], 5)])
        unloading = pool.submit(post, server, "/unload_lora_adapter", {"lora_name": "late"})
        wait_for(lambda: scheduler._calls)  # waits for the late row to finish
        gate.hold_after(14)  # the held step, the prefill and 12 steps: the late row ends, then the unload runs
        assert unloading.result(timeout=LONG_WAIT) == (200, "Success: LoRA adapter 'late' removed successfully.")
        gate.wait_held()
        again = send(pool, client, scheduler, [("ctx", PROMPTS[1], 6), ("ctx_window", PROMPTS[0], 5)])
        gate.open()
        texts = [answer.result(timeout=LONG_WAIT) for answer in joining + again]
    assert rest_of(chunks, received) == reference.completion("ctx", PROMPTS[3], 80)[0]
    jobs = [("late", PROMPTS[0], 9), ("plain", PROMPTS[2], 5), ("ctx", PROMPTS[1], 6), ("ctx_window", PROMPTS[0], 5)]
    for (name, prompt, max_tokens), text in zip(jobs, texts, strict=True):
        assert text == reference.completion(name, prompt, max_tokens)[0], (name, prompt, max_tokens)
    assert scheduler.stats().joined_running_batch - before.joined_running_batch == 4
    assert slots == {"ctx": 0, "ctx_window": 1}  # late's slot is not reused
    wait_idle(server)


def test_the_first_head_loaded_into_a_bare_base_may_be_contextual(model_dir, heads, tokenizer, reference, monkeypatch):
    """A server started without heads runs the bare base: loading a contextual head makes the model a PeftModel under
    a running base stream, and unloading it (the last head) gives the bare base back, its slot left in the cache."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with BackgroundServer(build_state(base, tokenizer, BASE, batch_window_ms=5)) as bare:
        scheduler, registry = bare.state.scheduler, bare.state.registry
        client = openai.OpenAI(base_url=bare.base_url, api_key="unused", max_retries=0, timeout=LONG_WAIT)
        gate = Gate(scheduler, monkeypatch)
        try:
            gate.hold_after(1)
            chunks, received = start_stream(client, BASE, PROMPTS[3], 60)
            with ThreadPoolExecutor(3) as pool:
                body = {"lora_name": "ctx", "lora_path": str(heads["ctx"])}
                loading = pool.submit(post, bare, "/load_lora_adapter", body)
                wait_for(lambda: scheduler._calls)
                gate.hold_after(1)
                assert loading.result(timeout=LONG_WAIT)[0] == 200
                gate.wait_held()
                assert registry.has_heads
                joining = send(pool, client, scheduler, [("ctx", PROMPTS[0], 6)])
                unloading = pool.submit(post, bare, "/unload_lora_adapter", {"lora_name": "ctx"})
                wait_for(lambda: scheduler._calls)
                gate.hold_after(10)  # the held step, the prefill and 8 steps: the ctx row ends, then the unload runs
                assert unloading.result(timeout=LONG_WAIT)[0] == 200
                gate.wait_held()
                assert not registry.has_heads
                joining += send(pool, client, scheduler, [(BASE, PROMPTS[1], 5)])
                gate.open()
                texts = [answer.result(timeout=LONG_WAIT) for answer in joining]
        finally:
            gate.open()
        assert rest_of(chunks, received) == reference.completion(BASE, PROMPTS[3], 60)[0]
        assert texts == [reference.completion("ctx", PROMPTS[0], 6)[0], reference.completion(BASE, PROMPTS[1], 5)[0]]
        assert scheduler.stats().joined_running_batch == 2
