#!/usr/bin/env bash
# Issue 20's measurements of the contextual head, one after another on a quiet machine (each step resumes: a finished
# point is skipped). Run from benchmarks/. The base's row of context_tuned.json is reused from tuned.json.
set -euo pipefail
log() { echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*" >&2; }
log "compare: the contextual head, 4 and 15 minutes, seed 0 (answers at 15)"
python bench_tuned.py compare --methods "contextual head" --minutes 4 15 --gen-at 15 --seeds 0 \
  --sweep-output context_sweep --output context_tuned
log "speed: scored training and generation"
[ -f results/speed-smollm2-contextual.json ] || python bench_speed.py --base smollm2 --only contextual --batch 8 --rounds 4
log "compare: LoRA r=8 on the top 3 layers at LoRA's tuned rate, and the contextual head with kl_to_base 1, 4 minutes"
python bench_tuned.py compare --methods "lora r=8 q,k,v,o, top 3 layers" --rate "lora r=8 q,k,v,o, top 3 layers=1e-3" \
  --minutes 4 --gen-at 99 --seeds 0 --output context_tuned --sweep-output context_sweep
python bench_tuned.py compare --methods "contextual, kl_to_base 1" --minutes 4 --gen-at 99 --seeds 0 \
  --sweep-output context_sweep --output context_tuned
log "ablations on the validation split at the contextual head's best rate"
python bench_tuned.py sweep --methods "contextual, taps only" "contextual, last layer only" \
  --same-rate-as "contextual head" --sweep-output context_sweep
log "the seed's head again at 4 minutes, to show the machine gives the earlier numbers"
python bench_tuned.py compare --methods "head (default config)" --rate "head (default config)=1e-3" --minutes 4 \
  --gen-at 99 --seeds 0 --output context_tuned
log "where the MATH-500 change goes, with and without the KL term (the 4-minute snapshots of the runs above)"
[ -f results/transfer-contextual-4min.json ] || python diagnose_transfer.py --snapshot /tmp/bench_tuned_snapshots/contextual-head-seed0-4min.safetensors \
  --method "contextual head" --name contextual-4min
[ -f results/transfer-contextual-kl1-4min.json ] || python diagnose_transfer.py --snapshot /tmp/bench_tuned_snapshots/contextual-kl-to-base-1-seed0-4min.safetensors \
  --method "contextual, kl_to_base 1" --name contextual-kl1-4min
log "seeds 1 and 2 at 4 minutes: the contextual head; LoRA on q,k,v,o again at seed 0 (the machine check)"
python bench_tuned.py compare --methods "contextual head" --minutes 4 --gen-at 99 --seeds 1 2 \
  --sweep-output context_sweep --output context_tuned
python bench_tuned.py compare --methods "lora r=8 q,k,v,o" --rate "lora r=8 q,k,v,o=1e-3" --minutes 4 --gen-at 99 \
  --seeds 0 --output context_tuned
log "ablations: context_dim 64 and 256, and the KL term, on the validation split at the contextual head's rate"
python bench_tuned.py sweep --methods "contextual, context_dim 64" "contextual, context_dim 256" \
  "contextual, kl_to_base 1" --same-rate-as "contextual head" --sweep-output context_sweep
log "cached features of the contextual head: feature pass, epochs, and 5 cached epochs' quality"
[ -f results/cached-smollm2-contextual.json ] || python bench_cached.py --head "backattn contextual" --problems 400 \
  --quality --quality-epochs 5 --ppl 200 --output cached-smollm2-contextual
log "LoRA on the top 3 layers: 15 minutes with answers, then seeds 1 and 2 at 4 minutes"
python bench_tuned.py compare --methods "lora r=8 q,k,v,o, top 3 layers" --rate "lora r=8 q,k,v,o, top 3 layers=1e-3" \
  --minutes 15 --gen-at 15 --seeds 0 --output context_tuned
python bench_tuned.py compare --methods "lora r=8 q,k,v,o, top 3 layers" --rate "lora r=8 q,k,v,o, top 3 layers=1e-3" \
  --minutes 4 --gen-at 99 --seeds 1 2 --output context_tuned
log "LoRA on the top 3 layers: its own rate sweep on the validation split (the runs above use LoRA's tuned 1e-3)"
python bench_tuned.py sweep --methods "lora r=8 q,k,v,o, top 3 layers" --sweep-output context_sweep
log done
