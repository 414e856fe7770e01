#!/usr/bin/env bash
# Every benchmark behind docs/results.md, one after the other (they share 2 cores: never run two at once).
# Each writes benchmarks/results/<name>.json; benchmarks/report.py turns those into docs/results.md and its plots.
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
python flops.py --context 256 --r 64
python bench_speed.py --base tiny-gpt2 --batch 8 --length 256 --rounds 7
python bench_speed.py --base smollm2 --batch 8 --length 256 --rounds 5
python bench_memory.py --base tiny-gpt2 --lengths 256 1024 4096
python bench_memory.py --base smollm2 --lengths 256 1024 4096
python bench_swap.py --base smollm2 --swaps 500 --loads 10
python bench_quality.py --minutes 4 --seeds 0 1 --ppl 120 --gen 30 --math500 40 --max-new-tokens 192
