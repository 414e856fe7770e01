"""Serving heads: throughput and latency with requests spread over 1, 10 and 100 heads, against the bare base, and a
correctness run (many requests over many heads, none lost, each sampled one equal to its head run alone).

    python benchmarks/bench_serve.py --clients 8 --requests 24 --tokens 16 --rounds 2 \
        --check-requests 1000 --check-tokens 4 --check-clients 32 --check-sample 40

Everything runs in this one process: two servers on free loopback ports (the bare base, and the base with 100
random heads loaded through `/v1/load_lora_adapter`'s code path), driven by `--clients` threads that each send
non-streaming greedy requests with the official `openai` client, back to back. A setting sends `--requests`
requests of `--tokens` output tokens (`ignore_eos`, so every request decodes the same number), each naming a head
drawn at random from the setting's heads. Settings alternate round by round; reported are the median output
tokens/s over rounds and the p50/p95 request latency over all requests of a setting. Writes
benchmarks/results/serve-<base>.json.

With --vllm (run it in the environment with the `vllm` extra; docs/serving.md, "Serving at scale with vLLM"):

    python benchmarks/bench_serve.py --vllm --clients 8 --requests 24 --tokens 16 --rounds 2

the same requests go to vLLM's OpenAI server, one server process at a time: bare vLLM (no processor), then
`peft-backattn vllm-serve` with the 100 heads (settings alternating round by round: the base through the processor,
1, 10 and 100 heads), then bare vLLM again (its drift over the run), then `peft-backattn serve` (as above). It also
times the processor's work alone (`HeadBank.apply`, one thread, as vLLM's CPU worker runs it) on a batch of
--clients rows spread over 1, 10 and 100 heads, and gives it as a share of vLLM's step at each setting's measured
throughput, beside the FLOPs of the two vocabulary products against the base's forward. Writes
benchmarks/results/serve-vllm-<base>-<clients>-clients.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from common import machine, markdown_table, save_result
from peft import PeftModel, get_peft_model
from transformers import AutoConfig

from peft_backattn import BackAttnConfig
from peft_backattn.costs import base_forward_flops
from peft_backattn.serve.server import BackgroundServer, build_state
from peft_backattn.vllm.bank import HeadBank
from peft_backattn.workbench.base_models import EMBEDDED_DEFAULT, embedded_model_path, load_base_model
from peft_backattn.workbench.synthetic import generate_examples

BASE_NAME = "base"


def make_heads(base: torch.nn.Module, count: int, work: Path) -> dict[str, Path]:
    """`count` heads with random weights (every matrix random, so that each head changes the output), saved."""
    model = get_peft_model(copy.deepcopy(base), BackAttnConfig(init_weights=False))
    head = model.base_model.model.get_output_embeddings().backattn_heads["default"]
    heads = {}
    for index in range(count):
        torch.manual_seed(index)
        head.reset_parameters()
        heads[f"head_{index:03d}"] = work / f"head_{index:03d}"
        model.save_pretrained(heads[f"head_{index:03d}"])
    return heads


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drive(base_url: str, jobs: list[tuple[str, str]], tokens: int, clients: int, ignore_eos: bool = True):
    """Send `jobs` ((model, prompt) pairs) from `clients` threads; returns (wall seconds, per-request results)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    def one(job: tuple[str, str]) -> dict:
        model, prompt = job
        start = time.perf_counter()
        response = client.completions.create(
            model=model, prompt=prompt, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": ignore_eos}
        )
        return {
            "model": model,
            "prompt": prompt,
            "text": response.choices[0].text,
            "finish_reason": response.choices[0].finish_reason,
            "completion_tokens": response.usage.completion_tokens,
            "latency_s": time.perf_counter() - start,
        }

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    return time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2", choices=["smollm2"], help="the embedded SmolLM2-135M")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=64, help="requests per setting and round")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (each runs every setting once)")
    parser.add_argument("--heads", type=int, default=100, help="heads loaded (the largest setting)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--check-requests", type=int, default=1000, help="requests of the correctness run (0: none)")
    parser.add_argument("--check-tokens", type=int, default=8, help="output tokens per correctness request")
    parser.add_argument("--check-clients", type=int, default=32, help="concurrent clients of the correctness run")
    parser.add_argument("--check-sample", type=int, default=40, help="responses compared with their head alone")
    parser.add_argument("--vllm", action="store_true", help="vLLM's server against this project's (see above)")
    parser.add_argument("--vllm-kv-cache-gb", type=float, default=1.0, help="vLLM's KV cache on the CPU, GB")
    args = parser.parse_args()
    random.seed(0)
    if args.vllm:
        return run_vllm(args)

    base, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    # The instruct base answers a bare problem with its end-of-turn token, so prompts are a user turn of its chat
    # format (without the template's default system prompt, which would triple the prompt's length).
    problems = [example.problem for example in generate_examples(200, split="test", seed=0)]
    prompts = [f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n" for problem in problems]
    settings = [("bare base", 0), ("1 head", 1), ("10 heads", 10), (f"{args.heads} heads", args.heads)]
    with tempfile.TemporaryDirectory() as work:
        heads = make_heads(base, args.heads, Path(work))
        bare = build_state(copy.deepcopy(base), tokenizer, BASE_NAME, max_batch=args.max_batch)
        rss_before = rss_bytes()
        loaded_at = time.perf_counter()
        served = build_state(base, tokenizer, BASE_NAME, heads, max_batch=args.max_batch)
        load_seconds = time.perf_counter() - loaded_at
        rss_per_head = (rss_bytes() - rss_before) / args.heads
        head_bytes = served.registry.head_bytes("head_000")
        file_bytes = (heads["head_000"] / "adapter_model.safetensors").stat().st_size
        names = list(heads)
        with BackgroundServer(bare) as bare_server, BackgroundServer(served) as head_server:
            urls = {"bare base": bare_server.base_url}
            throughput: dict[str, list[float]] = {name: [] for name, _ in settings}
            latencies: dict[str, list[float]] = {name: [] for name, _ in settings}
            drive(head_server.base_url, [(names[0], prompts[0])] * args.clients, 4, args.clients)  # warm-up
            drive(bare_server.base_url, [(BASE_NAME, prompts[0])] * args.clients, 4, args.clients)
            for round_index in range(args.rounds):
                for name, count in settings:
                    pool = names[:count] or [BASE_NAME]
                    jobs = [(random.choice(pool), random.choice(prompts)) for _ in range(args.requests)]
                    seconds, results = drive(urls.get(name, head_server.base_url), jobs, args.tokens, args.clients)
                    tokens = sum(r["completion_tokens"] for r in results)
                    throughput[name].append(tokens / seconds)
                    latencies[name] += [r["latency_s"] for r in results]
                    print(f"  round {round_index + 1}: {name}: {tokens / seconds:.1f} tokens/s", flush=True)
            speed = {
                name: {
                    "tokens_per_s": statistics.median(throughput[name]),
                    "tokens_per_s_rounds": throughput[name],
                    "p50_latency_s": percentile(latencies[name], 0.5),
                    "p95_latency_s": percentile(latencies[name], 0.95),
                }
                for name, _ in settings
            }
            one = speed["1 head"]["tokens_per_s"]
            for name, _ in settings:
                speed[name]["vs_one_head"] = speed[name]["tokens_per_s"] / one
                speed[name]["vs_bare_base"] = speed[name]["tokens_per_s"] / speed["bare base"]["tokens_per_s"]
            scheduler_stats = head_server.state.scheduler.stats().__dict__

            check = None
            if args.check_requests:
                jobs = [(random.choice(names), random.choice(prompts)) for _ in range(args.check_requests)]
                seconds, results = drive(
                    head_server.base_url, jobs, args.check_tokens, args.check_clients, ignore_eos=False
                )
                check = verify(base, heads, tokenizer, jobs, results, args)
                check["seconds"] = seconds
    rows = [
        [name, f"{s['tokens_per_s']:.1f}", f"{s['p50_latency_s']:.2f}", f"{s['p95_latency_s']:.2f}",
         f"{s['vs_one_head']:.2f}", f"{s['vs_bare_base']:.2f}"]
        for name, s in speed.items()
    ]  # fmt: skip
    print(markdown_table(["requests spread over", "output tokens/s", "p50 s", "p95 s", "vs 1 head", "vs bare"], rows))
    print(f"{args.heads} heads loaded in {load_seconds:.1f} s; a head is {head_bytes / 1e3:.1f} kB of tensors "
          f"({file_bytes / 1e3:.1f} kB file); memory grew {rss_per_head / 1e3:.0f} kB per loaded head")  # fmt: skip
    if check:
        print(f"correctness: {check['answered']}/{check['requests']} answered, {check['matched']}/{check['sampled']} "
              f"sampled responses equal to their head alone, {check['distinct_texts']} distinct texts")  # fmt: skip
    save_result(
        f"serve-{args.base}",
        {
            "settings": vars(args), "speed": speed, "scheduler": scheduler_stats, "check": check,
            "memory": {"head_tensor_bytes": head_bytes, "head_file_bytes": file_bytes,
                       "rss_growth_per_head_bytes": rss_per_head, "load_seconds_all_heads": load_seconds},
            "machine_note": "2 CPU cores shared with other work; absolute numbers drift, ratios within a run hold",
            "machine": machine(),
        },
    )  # fmt: skip


def verify(base, heads: dict[str, Path], tokenizer, jobs, results, args) -> dict:
    """None lost (every request answered by its head), and a sample equal to `generate` with its head alone."""
    pairs = zip(jobs, results, strict=True)
    answered = sum(r["model"] == model and r["finish_reason"] is not None for (model, _), r in pairs)
    sample = random.sample(range(len(jobs)), min(args.check_sample, len(jobs)))
    reference = None
    matched, mismatches = 0, []
    for index in sample:
        name, prompt = jobs[index]
        if reference is None:
            reference = PeftModel.from_pretrained(copy.deepcopy(base), str(heads[name]), adapter_name=name).eval()
        elif name not in reference.peft_config:
            reference.load_adapter(str(heads[name]), adapter_name=name)
        reference.set_adapter(name)
        reference.eval()
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**ids, max_new_tokens=args.check_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        eos = set(tokenizer.all_special_ids) & {tokenizer.eos_token_id}
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        expected = tokenizer.decode(new[:cut], skip_special_tokens=True)
        if expected == results[index]["text"]:
            matched += 1
        else:
            mismatches.append({"index": index, "head": name, "served": results[index]["text"], "alone": expected})
    return {
        "requests": len(jobs),
        "answered": answered,
        "sampled": len(sample),
        "matched": matched,
        "mismatches": mismatches,
        "distinct_texts": len({r["text"] for r in results}),
        "heads_used": len({model for model, _ in jobs}),
    }


# -- --vllm: vLLM's OpenAI server, one server process at a time ---------------------------------------------


def chat_prompts() -> list[str]:
    """User turns of SmolLM2's chat format (without the template's default system prompt, which would triple the
    prompt's length): the instruct base answers a bare problem with its end-of-turn token."""
    problems = [example.problem for example in generate_examples(200, split="test", seed=0)]
    return [f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n" for problem in problems]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """One vLLM OpenAI server process, started with `command` + a free port, stopped (SIGINT) on exit."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.command, self.log = [*command, "--port", str(self.port)], log

    def __enter__(self) -> VllmServer:
        with open(self.log, "w") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:  # not listening yet (urllib's errors are OSErrors)
                pass
            time.sleep(1)
        raise RuntimeError(f"the server did not answer within 900 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(base_url: str, jobs: list[tuple[str, str]], args) -> tuple[float, list[float]]:
    """Output tokens/s and per-request latencies of one setting's jobs."""
    seconds, results = drive(base_url, jobs, args.tokens, args.clients)
    tokens = sum(r["completion_tokens"] for r in results)
    return tokens / seconds, [r["latency_s"] for r in results]


def summarise(throughput: dict[str, list[float]], latencies: dict[str, list[float]]) -> dict:
    return {
        name: {
            "tokens_per_s": statistics.median(rates),
            "tokens_per_s_rounds": rates,
            "p50_latency_s": percentile(latencies[name], 0.5),
            "p95_latency_s": percentile(latencies[name], 0.95),
        }
        for name, rates in throughput.items()
    }


def time_processor(folder: Path, heads: dict[str, Path], rows: int, counts: list[int]) -> dict[str, float]:
    """Milliseconds of `HeadBank.apply` (median of 20) on `rows` rows of logits spread over 1, 10, ... heads, on one
    thread as vLLM's CPU worker runs it here (its OpenMP threads are bound to one core of two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bank = HeadBank(folder, AutoConfig.from_pretrained(folder), torch.float32)
    for name, path in heads.items():
        bank.load(name, path)
    names = list(heads)
    logits = torch.randn(rows, bank.vocab_size, generator=torch.Generator().manual_seed(0)) * 5
    timings = {}
    for count in counts:
        plan = bank.plan({row: names[row % count] for row in range(rows)}, rows)
        samples = []
        for _ in range(21):
            work = logits.clone()
            start = time.perf_counter()
            bank.apply(work, plan)
            samples.append(time.perf_counter() - start)
        timings[f"{count} head" + ("s" if count > 1 else "")] = 1000 * statistics.median(samples[1:])
    torch.set_num_threads(threads)
    return timings


def run_vllm(args) -> None:
    folder = embedded_model_path()
    base, tokenizer = load_base_model(EMBEDDED_DEFAULT)
    prompts = chat_prompts()
    settings = [
        ("base through the processor", 0),
        ("1 head", 1),
        ("10 heads", 10),
        (f"{args.heads} heads", args.heads),
    ]
    engine = [
        "--served-model-name", BASE_NAME, "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
        "--max-num-seqs", str(args.max_batch), "--gpu-memory-utilization", "0.05",
        "--kv-cache-memory-bytes", str(int(args.vllm_kv_cache_gb * 2**30)), "--disable-log-stats",
    ]  # fmt: skip
    bare_command = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(folder)]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        heads = make_heads(base, args.heads, work / "heads")
        names = list(heads)
        # The same jobs for every server: per round, per setting.
        jobs = {
            (round_index, name): [
                (random.choice(names[:count] or [BASE_NAME]), random.choice(prompts)) for _ in range(args.requests)
            ]  # fmt: skip
            for round_index in range(args.rounds)
            for name, count in [("bare vLLM", 0), *settings]
        }
        warm = [(BASE_NAME, prompts[0])] * args.clients
        throughput: dict[str, list[float]] = {}
        latencies: dict[str, list[float]] = {}

        def record(label: str, rate: float, seconds: list[float]) -> None:
            throughput.setdefault(label, []).append(rate)
            latencies.setdefault(label, []).extend(seconds)
            print(f"  {label}: {rate:.1f} tokens/s", flush=True)

        for phase in ("before", "after"):
            label = f"bare vLLM ({phase})"
            with VllmServer([*bare_command, *engine], work / f"bare-{phase}.log") as server:
                drive(server.base_url, warm, 4, args.clients)
                for round_index in range(args.rounds):
                    record(label, *measure(server.base_url, jobs[(round_index, "bare vLLM")], args))
            if phase == "before":
                served = [sys.executable, "-m", "peft_backattn.cli", "vllm-serve", str(folder),
                          "--heads-dir", str(work / "heads"), *engine]  # fmt: skip
                with VllmServer(served, work / "heads.log") as server:
                    drive(server.base_url, [(names[0], prompts[0])] * args.clients, 4, args.clients)
                    for round_index in range(args.rounds):
                        for name, _ in settings:
                            record(f"vLLM: {name}", *measure(server.base_url, jobs[(round_index, name)], args))
        # This project's server on the same jobs (the bare base as a second, head-less server).
        bare = build_state(copy.deepcopy(base), tokenizer, BASE_NAME, max_batch=args.max_batch)
        with BackgroundServer(bare) as bare_server:
            drive(bare_server.base_url, warm, 4, args.clients)
            for round_index in range(args.rounds):
                record("serve: bare base", *measure(bare_server.base_url, jobs[(round_index, "bare vLLM")], args))
        del bare
        served_state = build_state(base, tokenizer, BASE_NAME, heads, max_batch=args.max_batch)
        with BackgroundServer(served_state) as head_server:
            drive(head_server.base_url, [(names[0], prompts[0])] * args.clients, 4, args.clients)
            for round_index in range(args.rounds):
                for name, _ in settings[1:]:
                    record(f"serve: {name}", *measure(head_server.base_url, jobs[(round_index, name)], args))
        processor_ms = time_processor(folder, heads, args.clients, [count for _, count in settings[1:]])
    speed = summarise(throughput, latencies)
    bare_rate = statistics.median(throughput["bare vLLM (before)"] + throughput["bare vLLM (after)"])
    for entry in speed.values():
        entry["vs_bare_vllm"] = entry["tokens_per_s"] / bare_rate
    bare_step_ms = 1000 * args.clients / bare_rate
    for name, milliseconds in processor_ms.items():
        # vLLM's step at this setting, from its throughput: `clients` rows decoded per step (clients send back to
        # back). Two views of the heads' cost: the processor timed alone, and the step's growth over bare vLLM's.
        step_ms = 1000 * args.clients / speed[f"vLLM: {name}"]["tokens_per_s"]
        speed[f"vLLM: {name}"].update(
            step_ms=step_ms, processor_ms_per_step=milliseconds, processor_share_of_step=milliseconds / step_ms,
            extra_ms_per_step_vs_bare=step_ms - bare_step_ms, extra_share_of_step=(step_ms - bare_step_ms) / step_ms,
        )  # fmt: skip
    config = AutoConfig.from_pretrained(folder)
    vocab, width = config.vocab_size, config.hidden_size
    non_embedding = sum(p.numel() for p in base.parameters()) - vocab * width
    base_flops = base_forward_flops(non_embedding, vocab, width, config.num_hidden_layers, 256, width)
    flops = {"two_vocabulary_products_per_token": 4 * vocab * width, "base_forward_per_token_context_256": base_flops}

    def share(entry: dict, key: str) -> str:
        return f"{100 * entry[key]:.0f} %" if key in entry else ""

    rows = [
        [name, f"{s['tokens_per_s']:.1f}", f"{s['p50_latency_s']:.2f}", f"{s['p95_latency_s']:.2f}",
         f"{s['vs_bare_vllm']:.2f}", share(s, "processor_share_of_step"), share(s, "extra_share_of_step")]
        for name, s in speed.items()
    ]  # fmt: skip
    header = ["setting", "output tokens/s", "p50 s", "p95 s", "vs bare vLLM", "processor alone, share of step",
              "step's growth over bare vLLM"]  # fmt: skip
    print(markdown_table(header, rows))
    print(f"the two vocabulary products: {flops['two_vocabulary_products_per_token'] / 1e6:.1f} MFLOP per token; "
          f"the base's forward: {base_flops / 1e6:.1f} MFLOP per token (context 256)")  # fmt: skip
    save_result(
        f"serve-vllm-{args.base}-{args.clients}-clients",
        {
            "settings": vars(args), "speed": speed, "processor_ms_per_step": processor_ms, "flops": flops,
            "machine_note": "run one server at a time on a quiet machine; vLLM's CPU worker binds one core of two",
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
