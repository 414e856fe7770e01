"""The HTTP server, through the official `openai` client, on a free loopback port with a tiny model.

Every greedy answer is checked against `generate()` with that head alone; concurrent requests for different heads
are decoded in one batch and must each still equal their head alone. Errors come back in OpenAI's shape and the
server keeps serving.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import randomize_heads, save_tiny_lm
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_backattn import BackAttnConfig
from peft_backattn.cli import main
from peft_backattn.serve import scheduler as scheduler_module
from peft_backattn.serve.server import BackgroundServer, build_state

BASE = "tiny-base"
PROMPTS = [
    "Tom has 3 boxes of 12 pens.",
    "What is 7 times 6? Answer:",
    "A",
    "Jane bought 12 apples and ate 5 of them. How many are left?",
]
LONG_WAIT = 30  # seconds any single request may take here


def save_head(model_dir: Path, folder: Path, seed: int, config: BackAttnConfig | None = None) -> Path:
    """A head with random weights (`config`, default a plain r=8 head) on the base in `model_dir`, saved."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, config or BackAttnConfig(r=8))
    randomize_heads(model, seed=seed)
    model.save_pretrained(folder)
    return folder


def save_lively_lm(directory: Path) -> Path:
    """A tiny Llama whose weights are large enough that its greedy text depends on the prompt and the head (at the
    usual init scale every row repeats one token, which would hide a row decoded with the wrong head)."""
    save_tiny_lm(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_lively_lm(tmp_path_factory.mktemp("lively") / "model")


@pytest.fixture(scope="module")
def heads(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heads")
    made = {name: save_head(model_dir, root / name, seed) for seed, name in enumerate(["alpha", "beta", "gamma"], 1)}
    # damaged and foreign heads, refused on load
    broken = root / "broken"
    shutil.copytree(made["alpha"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    other_base = save_tiny_lm(root / "other_base", hidden=48)
    made["broken"] = broken
    made["foreign"] = save_head(other_base, root / "foreign", seed=9)
    return made


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def serving(model_dir: Path, tokenizer, heads: dict[str, Path], **options):
    """A server on a background thread over the base in `model_dir` with `heads` loaded: every server fixture's body
    (`options` go to `build_state`)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with BackgroundServer(build_state(base, tokenizer, BASE, heads, **options)) as running:
        yield running


@pytest.fixture(scope="module")
def server(model_dir, heads, tokenizer):
    yield from serving(model_dir, tokenizer, {"alpha": heads["alpha"], "beta": heads["beta"]}, max_batch=8,
                       batch_window_ms=20)  # fmt: skip


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=LONG_WAIT)


class Reference:
    """Each head (or the base) alone in its own model object: what `generate` gives without any batching."""

    def __init__(self, model_dir: Path, heads: dict[str, Path], tokenizer) -> None:
        self.model_dir, self.heads, self.tokenizer = model_dir, heads, tokenizer
        self.models: dict[str, torch.nn.Module] = {}

    def model(self, name: str):
        if name not in self.models:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir)
            if name != BASE:
                model = PeftModel.from_pretrained(model, str(self.heads[name]), adapter_name=name)
            self.models[name] = model.eval()
        return self.models[name]

    def greedy(self, name: str, ids: list[int], max_tokens: int) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) of greedy decoding with `name` alone."""
        with torch.no_grad():
            out = self.model(name).generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()  # fmt: skip
        eos = self.tokenizer.eos_token_id
        if eos in out:
            cut = out.index(eos)
            return self.tokenizer.decode(out[:cut], skip_special_tokens=True), "stop", cut + 1
        return self.tokenizer.decode(out, skip_special_tokens=True), "length", len(out)

    def completion(self, name: str, prompt: str, max_tokens: int) -> tuple[str, str, int]:
        return self.greedy(name, self.tokenizer(prompt)["input_ids"], max_tokens)


@pytest.fixture(scope="module")
def reference(model_dir, heads, tokenizer) -> Reference:
    return Reference(model_dir, heads, tokenizer)


def post(server, path: str, body: bytes | dict, key: str | None = None) -> tuple[int, str]:
    """A raw POST (for what the openai client cannot send: malformed JSON, vLLM's adapter endpoints)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.base_url + path, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=LONG_WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def error_of(text: str) -> dict:
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def wait_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.state.scheduler.stats()
        if stats.active == 0 and stats.waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"rows still in the batch: {server.state.scheduler.stats()}")


def wait_for(condition, timeout: float = LONG_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


class Gate:
    """Holds the scheduler's worker before a forward: `hold_after(1)` then a stream lets its prefill through (the
    stream's first token) and holds its first step, so that requests sent meanwhile join it, together, on `open()`.
    `hold_after(n)` while held lets n more forwards through; `wait_held()` returns once the worker is held again."""

    def __init__(self, scheduler, monkeypatch) -> None:
        self.condition = threading.Condition()
        self.left: int | None = None  # forwards let through before holding; None: every one
        self.held = False  # a forward is waiting at the gate
        forward = scheduler._forward

        def gated(*args):
            with self.condition:
                self.held = True
                self.condition.notify_all()
                self.condition.wait_for(lambda: self.left is None or self.left > 0, LONG_WAIT)
                self.held = False
                if self.left:
                    self.left -= 1
            return forward(*args)

        monkeypatch.setattr(scheduler, "_forward", gated)

    def hold_after(self, forwards: int) -> None:
        with self.condition:
            self.left = forwards
            self.condition.notify_all()

    def wait_held(self) -> None:
        with self.condition:
            held = self.condition.wait_for(lambda: self.held and self.left == 0, LONG_WAIT)
        assert held, "the worker was not held again: did the batch end in an error?"

    def open(self) -> None:
        with self.condition:
            self.left = None
            self.condition.notify_all()


@pytest.fixture
def gate(server, monkeypatch) -> Gate:
    held = Gate(server.state.scheduler, monkeypatch)
    yield held
    held.open()  # a failed test must not leave the worker held


def start_stream(client, name: str = "alpha", prompt: str = PROMPTS[3], max_tokens: int = 120):
    """A greedy stream that has begun decoding: (its chunk iterator, the text received so far)."""
    chunks = iter(client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True))  # fmt: skip
    return chunks, next(chunks).choices[0].text


def rest_of(chunks, received: str) -> str:
    return received + "".join(c.choices[0].text for c in chunks if c.choices)


# -- models, completions, chat -------------------------------------------------------------------------------------


def test_models_lists_the_base_and_every_head(client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [BASE, "alpha", "beta"]
    assert models["alpha"].model_extra["parent"] == BASE


@pytest.mark.parametrize("name", [BASE, "alpha", "beta"])
def test_greedy_completion_equals_generate_with_that_head_alone(client, reference, name):
    response = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text, finish, tokens = reference.completion(name, PROMPTS[0], 12)
    assert response.choices[0].text == text
    assert response.choices[0].finish_reason == finish
    assert response.model == name and response.object == "text_completion"
    prompt_tokens = len(reference.tokenizer(PROMPTS[0])["input_ids"])
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, tokens)
    assert response.usage.total_tokens == prompt_tokens + tokens


def test_heads_change_the_output(client):
    texts = {
        name: client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text
        for name in (BASE, "alpha", "beta")
    }
    assert len(set(texts.values())) == 3, texts


def test_concurrent_requests_to_different_heads_are_batched_and_each_equals_its_head_alone(client, reference, server):
    jobs = [(PROMPTS[i % 4], [BASE, "alpha", "beta"][i % 3], 4 + 3 * i) for i in range(12)]
    before = server.state.scheduler.stats()

    def ask(job, delay):
        time.sleep(delay)
        prompt, name, max_tokens = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(ask, jobs, [0.01 * (i % 4) for i in range(12)]))
    for (prompt, name, max_tokens), response in zip(jobs, responses, strict=True):
        text, finish, _ = reference.completion(name, prompt, max_tokens)
        assert (response.choices[0].text, response.choices[0].finish_reason) == (text, finish), (name, prompt)
    after = server.state.scheduler.stats()
    assert after.max_batch_seen > 1  # decoded together, not one after another
    assert after.joined_running_batch > before.joined_running_batch  # and some joined a batch already decoding


def test_a_list_of_prompts_gives_one_choice_each(client, reference):
    response = client.completions.create(model="alpha", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [reference.completion("alpha", p, 6)[0] for p in PROMPTS[:3]]


def test_chat_uses_the_tokenizers_chat_template(client, reference, tokenizer):
    messages = [{"role": "user", "content": PROMPTS[3]}]
    response = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected, finish, tokens = reference.greedy("beta", ids, 10)
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expected, finish)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), tokens)
    assert response.object == "chat.completion"


def test_streaming_completion_sends_the_same_text_in_chunks_then_done(client, reference):
    stream = client.completions.create(
        model="alpha", prompt=PROMPTS[1], max_tokens=15, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected, finish, tokens = reference.completion("alpha", PROMPTS[1], 15)
    assert text == expected
    assert len([c for c in chunks if c.choices]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens


def test_streaming_chat_sends_a_role_then_deltas(client, reference, tokenizer):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chunks = list(
        client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]  # fmt: skip
    assert text == reference.greedy("alpha", ids, 8)[0]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_raw_stream_ends_with_done(server):
    request = urllib.request.Request(
        server.base_url + "/completions", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "beta", "prompt": "A", "max_tokens": 3, "stream": True}).encode(),
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=LONG_WAIT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().splitlines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[5:])["object"] == "text_completion" for e in events[:-1])


def test_n_choices_with_a_seed_are_reproducible(client):
    def ask():
        response = client.completions.create(
            model="beta", prompt=PROMPTS[2], max_tokens=8, temperature=1.5, n=3, seed=11
        )
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    first = ask()
    assert len(first) == 3 and len(set(first)) > 1  # n samples, each with its own stream of random numbers
    assert ask() == first
    other = client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=8, temperature=1.5, seed=12)
    assert other.choices[0].text != first[0]


def test_a_tiny_top_p_is_greedy(client, reference):
    response = client.completions.create(model="alpha", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, top_p=1e-9)
    assert response.choices[0].text == reference.completion("alpha", PROMPTS[3], 8)[0]


def test_stop_strings_cut_the_text_and_finish_with_stop(client, reference):
    full = reference.completion("beta", PROMPTS[0], 20)[0]
    stop = full[5:8]
    response = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="beta", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


# -- one request's error is its own ----------------------------------------------------------------------------------

SEED_RANGE_MESSAGE = "seed: must be an integer from -2**63 to 2**63 - 1 (64-bit signed)"


@pytest.mark.parametrize(
    "changes, outcome",
    [
        ({"temperature": 1e-300}, "greedy"),  # logits / 1e-300 overflow: tiny temperatures are greedy
        ({"temperature": 1e-6, "n": 2, "seed": 3}, "greedy"),
        ({"seed": 2**64}, "seed"),  # more than torch's generators take
        ({"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_a_bad_request_beside_a_running_stream_leaves_the_stream_equal_to_its_head_alone(
    client, server, reference, gate, changes, outcome
):
    gate.hold_after(1)  # the stream's prefill; it stays in the batch while the bad request arrives
    chunks, received = start_stream(client)
    body = {"model": "beta", "prompt": PROMPTS[1], "max_tokens": 8, **changes}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, server, "/completions", body)
        if outcome == "greedy":  # it reaches the batch: joins the stream's rows at the next step
            wait_for(lambda: server.state.scheduler.stats().waiting == changes.get("n", 1))
            assert server.state.scheduler.stats().active == 1
        else:
            answer.result(timeout=LONG_WAIT)  # refused at the door, while the worker is held
        gate.open()
        status, text = answer.result(timeout=LONG_WAIT)
    assert rest_of(chunks, received) == reference.completion("alpha", PROMPTS[3], 120)[0]
    if outcome == "greedy":
        assert status == 200
        expected = reference.completion("beta", PROMPTS[1], 8)[0]
        assert [c["text"] for c in json.loads(text)["choices"]] == [expected] * changes.get("n", 1)
    else:
        error = error_of(text)
        assert (status, error["param"], error["message"]) == (400, "seed", SEED_RANGE_MESSAGE)
    wait_idle(server)


def test_the_seed_range_is_what_the_sampler_takes(client):
    """The ends of the range, with n choices seeded seed + i, give reproducible samples."""

    def ask(seed: int) -> list[tuple[int, str]]:
        response = client.completions.create(
            model="beta", prompt=PROMPTS[2], max_tokens=4, temperature=1.5, n=3, seed=seed
        )
        return sorted((c.index, c.text) for c in response.choices)

    for seed in (2**63 - 1, -(2**63)):
        first = ask(seed)
        assert len(first) == 3 and ask(seed) == first


BAD_SEED = 4242


def fail_sampling_after_the_first_token(monkeypatch, seed: int) -> None:
    """Rows sampled with `seed` raise in their own sampling step from their second token on; other rows sample."""
    sample = scheduler_module._sample

    def sampler(logits, params, row):
        if params.seed == seed and row.generated >= 1:
            raise RuntimeError("injected")
        return sample(logits, params, row)

    monkeypatch.setattr(scheduler_module, "_sample", sampler)


def _fail_for_the_bad_seed(step: str, monkeypatch, scheduler) -> None:
    """Make one step fail for rows seeded BAD_SEED: at their generator, or at their 2nd token's sampling or text."""
    if step == "seeding":
        make = scheduler_module._generator

        def generator(seed):
            if seed == BAD_SEED:
                raise RuntimeError("injected")
            return make(seed)

        monkeypatch.setattr(scheduler_module, "_generator", generator)
    elif step == "sampling":
        fail_sampling_after_the_first_token(monkeypatch, BAD_SEED)
    else:
        emit = scheduler._emit

        def emitter(row, token):
            if row.request.params.seed == BAD_SEED and row.generated >= 2:
                raise RuntimeError("injected")
            return emit(row, token)

        monkeypatch.setattr(scheduler, "_emit", emitter)


ROW_FAILURES = {
    "seeding": "seeding its random generator failed for this request (RuntimeError: injected)",
    "sampling": "sampling its next token failed for this request (RuntimeError: injected)",
    "decoding": "decoding its text failed for this request (RuntimeError: injected)",
}


@pytest.mark.parametrize("step", ROW_FAILURES)
def test_a_row_whose_own_step_fails_ends_alone_and_the_batch_goes_on(
    client, server, reference, monkeypatch, gate, step
):
    """Whatever validation lets through: a failure in one row's seeding, sampling or text fails that request only;
    the running stream and a request admitted in the same prefill as the failing one give their heads' answers."""
    scheduler = server.state.scheduler
    _fail_for_the_bad_seed(step, monkeypatch, scheduler)
    failed = scheduler.stats().failed
    gate.hold_after(1)
    chunks, received = start_stream(client)
    bad = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.0, "seed": BAD_SEED}
    good = {"model": "beta", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(post, server, "/completions", body) for body in (bad, good)]
        wait_for(lambda: scheduler.stats().waiting == 2)  # both will be admitted together, beside the stream
        gate.open()
        (bad_status, bad_text), (good_status, good_text) = [a.result(timeout=LONG_WAIT) for a in answers]
    assert good_status == 200
    assert json.loads(good_text)["choices"][0]["text"] == reference.completion("beta", PROMPTS[2], 8)[0]
    assert rest_of(chunks, received) == reference.completion("alpha", PROMPTS[3], 120)[0]
    error = error_of(bad_text)
    assert (bad_status, error["type"], error["message"]) == (
        500,
        "server_error",
        f"Generation failed: {ROW_FAILURES[step]}",
    )
    assert scheduler.stats().failed == failed + 1
    wait_idle(server)


def test_a_streaming_row_that_fails_ends_its_stream_with_an_error_event(client, server, reference, monkeypatch):
    _fail_for_the_bad_seed("sampling", monkeypatch, server.state.scheduler)
    chunks, received = start_stream(client)
    with pytest.raises(openai.APIError, match="sampling its next token failed for this request"):
        list(client.completions.create(model="beta", prompt="A", max_tokens=8, temperature=1, seed=BAD_SEED,
                                       stream=True))  # fmt: skip
    assert rest_of(chunks, received) == reference.completion("alpha", PROMPTS[3], 120)[0]
    wait_idle(server)


# -- loading and unloading heads while serving -------------------------------------------------------------------


def test_load_and_unload_a_head_while_another_is_streaming(client, server, heads, reference):
    stream = client.completions.create(model="alpha", prompt=PROMPTS[3], max_tokens=60, temperature=0, stream=True)
    received = [next(iter(stream))]  # alpha is decoding now
    status, text = post(server, "/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(heads["gamma"])})
    assert (status, text) == (200, "Success: LoRA adapter 'gamma' added successfully.")
    assert [m.id for m in client.models.list().data] == [BASE, "alpha", "beta", "gamma"]
    gamma = client.completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=9, temperature=0)
    assert gamma.choices[0].text == reference.completion("gamma", PROMPTS[1], 9)[0]
    received += list(stream)
    assert "".join(c.choices[0].text for c in received) == reference.completion("alpha", PROMPTS[3], 60)[0]

    # Unloading waits for gamma's running requests, which finish normally; new ones are refused at once.
    running = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=60, temperature=0, stream=True)
    first = next(iter(running))
    with ThreadPoolExecutor(1) as pool:
        unloading = pool.submit(post, server, "/unload_lora_adapter", {"lora_name": "gamma"})
        deadline = time.monotonic() + LONG_WAIT
        while "gamma" in [m.id for m in client.models.list().data] and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gamma", prompt="A", max_tokens=2)
        rest = list(running)
        assert unloading.result(timeout=LONG_WAIT) == (200, "Success: LoRA adapter 'gamma' removed successfully.")
    assert (
        first.choices[0].text + "".join(c.choices[0].text for c in rest)
        == reference.completion("gamma", PROMPTS[0], 60)[0]
    )
    assert [m.id for m in client.models.list().data] == [BASE, "alpha", "beta"]
    assert "gamma" not in server.state.registry.model.peft_config
    status, _ = post(server, "/unload_lora_adapter", {"lora_name": "gamma"})
    assert status == 404


@pytest.mark.parametrize(
    "body, message",
    [
        ({"lora_name": "bad", "lora_path": "BROKEN"}, "truncated or corrupted"),
        ({"lora_name": "bad", "lora_path": "FOREIGN"}, "was built for a base"),
        ({"lora_name": "bad", "lora_path": "/nonexistent/head"}, "no adapter_config.json"),
        ({"lora_name": "alpha", "lora_path": "GAMMA"}, "already been loaded"),
        ({"lora_name": BASE, "lora_path": "GAMMA"}, "reserved for the base"),
        ({"lora_name": "bad"}, "lora_path"),
    ],
)
def test_a_head_that_fails_validation_is_refused_and_nothing_is_loaded(client, server, heads, body, message):
    paths = {"BROKEN": heads["broken"], "FOREIGN": heads["foreign"], "GAMMA": heads["gamma"]}
    body = {k: str(paths.get(v, v)) for k, v in body.items()}
    config_before = sorted(server.state.registry.model.peft_config)
    status, text = post(server, "/load_lora_adapter", body)
    assert status == 400
    assert message in error_of(text)["message"]
    assert sorted(server.state.registry.model.peft_config) == config_before
    assert [m.id for m in client.models.list().data] == [BASE, "alpha", "beta"]
    assert client.completions.create(model="alpha", prompt="A", max_tokens=2).choices  # still serving


@pytest.mark.parametrize("name", ["../../etc/passwd", "math.v2", "a/b", "a\\b", "", " ", "two words", "tab\t"])
def test_a_head_name_the_server_cannot_route_is_a_400_against_lora_name(client, server, heads, name):
    config_before = sorted(server.state.registry.model.peft_config)
    status, text = post(server, "/load_lora_adapter", {"lora_name": name, "lora_path": str(heads["gamma"])})
    error = error_of(text)
    assert (status, error["param"]) == (400, "lora_name")
    assert repr(name) in error["message"] and "\n" not in error["message"]
    assert sorted(server.state.registry.model.peft_config) == config_before
    assert [m.id for m in client.models.list().data] == [BASE, "alpha", "beta"]


# -- errors --------------------------------------------------------------------------------------------------------


def test_malformed_json_is_a_400_in_openais_shape(server):
    status, text = post(server, "/completions", b'{"model": "alpha", "prompt": ')
    assert status == 400
    error = error_of(text)
    assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    "changes, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"prompt": None}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_wrong_types_and_values_are_a_400_naming_the_field(server, client, changes, param):
    status, text = post(server, "/completions", {"model": "alpha", "prompt": "A", **changes})
    assert status == 400
    assert error_of(text)["param"].startswith(param)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**{"model": "alpha", "prompt": "A", **changes})


def test_unsupported_options_are_refused_not_ignored(client):
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="alpha", prompt="A", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[])


def test_an_unknown_model_is_a_404_listing_the_known_ones(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="delta", prompt="A", max_tokens=2)
    error = raised.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'delta'" in error["message"] and str([BASE, "alpha", "beta"]) in error["message"]


def test_a_prompt_longer_than_the_context_is_a_400(client, server):
    long_prompt = "seven apples " * 400  # well over the tiny base's 512 positions
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="alpha", prompt=long_prompt, max_tokens=4)
    assert raised.value.body["code"] == "context_length_exceeded"
    assert f"maximum context length is {server.state.context_length} tokens" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="A", max_tokens=10_000)


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(client, server, reference):
    cancelled = server.state.scheduler.stats().cancelled
    stream = client.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=480, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    wait_idle(server)  # its row left the batch; nothing is left waiting
    assert server.state.scheduler.stats().cancelled == cancelled + 1  # it left, rather than running to the end
    response = client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=5, temperature=0)
    assert response.choices[0].text == reference.completion("beta", PROMPTS[2], 5)[0]


def test_a_non_streaming_client_that_disconnects_leaves_the_batch(server):
    cancelled = server.state.scheduler.stats().cancelled
    body = json.dumps({"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 480})
    host, port = server.base_url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=LONG_WAIT)
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + LONG_WAIT
    while server.state.scheduler.stats().active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    connection.close()  # the client gives up before the answer
    wait_idle(server)
    assert server.state.scheduler.stats().cancelled == cancelled + 1


def test_the_server_binds_to_loopback(server):
    assert server.base_url.startswith("http://127.0.0.1:")


@pytest.fixture(scope="module")
def keyed_server(model_dir, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with BackgroundServer(build_state(base, tokenizer, BASE, api_key="sekrit")) as running:
        yield running


def test_a_missing_or_wrong_api_key_is_a_401(keyed_server):
    for key in (None, "wrong"):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        request = urllib.request.Request(keyed_server.base_url + "/models", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=LONG_WAIT)
        assert raised.value.code == 401
        assert error_of(raised.value.read().decode())["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=keyed_server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=BASE, prompt="A", max_tokens=2)
    right = openai.OpenAI(base_url=keyed_server.base_url, api_key="sekrit", max_retries=0)
    assert [m.id for m in right.models.list().data] == [BASE]  # the base alone, no head loaded
    assert right.completions.create(model=BASE, prompt="A", max_tokens=2, temperature=0).choices[0].text is not None


@pytest.mark.parametrize(
    "body", [b'{"model": "tiny-base", "prompt": ', json.dumps({"model": BASE, "temperature": "hot"}).encode()]
)
def test_the_key_is_checked_before_the_body(keyed_server, body):
    """As OpenAI's API: a client without the key learns nothing about its request, malformed or not."""
    for key in (None, "wrong"):
        status, text = post(keyed_server, "/completions", body, key=key)
        assert (status, error_of(text)["code"]) == (401, "invalid_api_key")
    status, text = post(keyed_server, "/completions", body, key="sekrit")
    assert status == 400 and error_of(text)["type"] == "invalid_request_error"


def test_the_last_head_unloaded_leaves_the_bare_base_serving(keyed_server, heads, reference):
    body = {"lora_name": "alpha", "lora_path": str(heads["alpha"])}
    assert post(keyed_server, "/load_lora_adapter", body, key="sekrit")[0] == 200
    right = openai.OpenAI(base_url=keyed_server.base_url, api_key="sekrit", max_retries=0)
    both = [right.completions.create(model=m, prompt=PROMPTS[1], max_tokens=6, temperature=0) for m in ("alpha", BASE)]
    assert [r.choices[0].text for r in both] == [reference.completion(m, PROMPTS[1], 6)[0] for m in ("alpha", BASE)]
    assert post(keyed_server, "/unload_lora_adapter", {"lora_name": "alpha"}, key="sekrit")[0] == 200
    assert not keyed_server.state.registry.has_heads
    again = right.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert again.choices[0].text == both[1].choices[0].text


# -- the command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--head", "x=/nonexistent/head"], "--head x=/nonexistent/head: No head at"),
        (["--heads-dir", "/nonexistent/dir"], "--heads-dir /nonexistent/dir: no such folder"),
        (["--head", "=path"], "expected NAME=PATH"),
        (["--head", "../x=/nonexistent/head"], "--head '../x=/nonexistent/head': A head's name may hold no"),
    ],
)
def test_serve_errors_are_one_line(tiny_lm_dir, capsys, args, message):
    assert main(["serve", "--model", str(tiny_lm_dir), *args]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.splitlines()) == 1 and stderr.startswith("peft-backattn: error: ")
    assert message in stderr


WINDOW_RANGE = "--batch-window-ms (batch_window_ms) must be a finite number from 0 to 10000"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-window-ms", "inf"], f"{WINDOW_RANGE}, got inf."),
        (["--batch-window-ms", "nan"], f"{WINDOW_RANGE}, got nan."),
        (["--batch-window-ms", "-1"], f"{WINDOW_RANGE}, got -1.0."),
        (["--batch-window-ms", "1e12"], f"{WINDOW_RANGE}, got 1000000000000.0."),
        (["--port", "99999"], "--port (port) must be an integer from 0 to 65535, got 99999."),
        (["--port", "-1"], "--port (port) must be an integer from 0 to 65535, got -1."),
        (["--port", "http"], "argument --port: must be an integer from 0 to 65535, got 'http'"),
        (["--max-batch", "0"], "--max-batch (max_batch) must be an integer >= 1, got 0."),
        (["--max-model-len", "1"], "--max-model-len (max_model_len) must be an integer >= 2 or None, got 1."),
        (["--head", "../x=somewhere"], "--head '../x=somewhere': "),
    ],
)
def test_serve_options_out_of_range_are_one_line_before_anything_loads(capsys, args, message):
    """Checked when `ServeOptions` is built (a word where a number belongs, by the parser): the model named does not
    exist, so reaching it would be another error."""
    try:
        status = main(["serve", "--model", "/nonexistent/model", *args])
    except SystemExit as exited:
        status = exited.code
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and message in captured.err


@pytest.mark.parametrize("window", [float("inf"), float("nan"), -1.0, 1e12])
def test_build_state_refuses_a_batch_window_that_could_hang_the_worker(model_dir, tokenizer, window):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=re.escape(WINDOW_RANGE)):
        build_state(base, tokenizer, BASE, batch_window_ms=window)


def test_serve_options_from_python_are_checked_as_on_the_command_line():
    from peft_backattn.serve import ServeOptions

    assert ServeOptions(port=0, batch_window_ms=0.0).port == 0
    with pytest.raises(ValueError, match=re.escape("--port (port) must be an integer from 0 to 65535, got 70000.")):
        ServeOptions(port=70000)
    with pytest.raises(ValueError, match=re.escape(f"{WINDOW_RANGE}, got inf.")):
        ServeOptions(batch_window_ms=float("inf"))


def test_a_port_in_use_is_one_line_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "/nonexistent/model", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no address announced
    assert captured.err == (
        f"peft-backattn: error: cannot listen on 127.0.0.1:{port}: the port is already in use (another server?); "
        "choose another --port.\n"
    )


def test_serve_announces_its_address_only_once_it_listens(tiny_lm_dir):
    """`--port 0` takes a free port; the line printed names it, and the server answers there at once."""
    command = [sys.executable, "-m", "peft_backattn.cli", "serve", "--model", str(tiny_lm_dir), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, process.kill)  # bounded, whatever happens
    watchdog.start()
    try:
        lines = []
        while not (lines and lines[-1].startswith("OpenAI-compatible API on ")):
            line = process.stdout.readline()
            assert line, f"serve ended before announcing its address: {process.stderr.read()}"
            lines.append(line)
        url = lines[-1].split()[3]
        assert url.startswith("http://127.0.0.1:") and not url.startswith("http://127.0.0.1:0/")
        with urllib.request.urlopen(url + "/models", timeout=LONG_WAIT) as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == [str(tiny_lm_dir)]
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()


def test_an_error_inside_the_model_is_a_500_and_the_server_keeps_serving(client, server, monkeypatch):
    scheduler = server.state.scheduler
    forward = scheduler._forward
    failures = iter([RuntimeError("out of memory (simulated)")])

    def failing_once(*args):
        for error in failures:
            raise error
        return forward(*args)

    monkeypatch.setattr(scheduler, "_forward", failing_once)
    with pytest.raises(openai.InternalServerError, match="simulated"):
        client.completions.create(model="alpha", prompt="A", max_tokens=3)
    assert client.completions.create(model="alpha", prompt="A", max_tokens=3).choices[0].finish_reason
    wait_idle(server)


def test_without_the_serve_extra_the_command_line_works_and_serve_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = None  # as if the extra were not installed\n"
        "from peft_backattn.cli import main\n"
        "sys.exit(main(['serve', '--head', 'x=y']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("install them with: pip install 'peft-backattn[serve]'")
    assert len(result.stderr.splitlines()) == 1
