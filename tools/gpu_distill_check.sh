#!/usr/bin/env bash
# One prepared GPU check of the distillation trainer on the demo features (for the `device` tool).
#   1. one process, --device cuda, bf16 autocast: samples/s and eval.json;
#   2. with 2 or more GPUs only: torchrun, one rank per GPU (DDP over NCCL, SyncBatchNorm for the edge-s
#      BatchNorm student): samples/s, and the val recall against step 1's; with TEACHER=<spec> also the
#      feature cache of the val split under torchrun, its shards compared with a 1-process build.
# It prints what it ran: with a single GPU step 2 does not run, since 2 ranks on one GPU would not
# test several GPUs (and cuda:LOCAL_RANK does not exist for rank 1).
# Needs runs/features/{train,val,test} (carry them) and the wheels the GPU image lacks in .whl/.
set -euo pipefail
OUT=${OUT:-/tmp/gpu_distill}
STEPS=${STEPS:-300}
BATCH=${BATCH:-128}
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .whl/*.whl
export PYTHONPATH="$PWD:/tmp/pylib"
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common=(--teacher= --features runs/features --steps "$STEPS" --batch-size "$BATCH" --eval-every 100
        --ckpt-every 100 --device cuda --force)
python3 -m edge_msd.cli distill "${common[@]}" --out "$OUT/single" 2>&1 | tail -4
ran="1 process on 1 GPU"
if [ "$NGPU" -ge 2 ]; then
    torchrun --standalone --nproc_per_node="$NGPU" -m edge_msd.cli distill "${common[@]}" --test-split= \
        --out "$OUT/ddp" 2>&1 | tail -3
    ran="$ran; torchrun with $NGPU ranks on $NGPU GPUs (DDP, NCCL)"
    if [ -n "${TEACHER:-}" ]; then
        feat=(--teacher "$TEACHER" --split val --device cuda --force)
        python3 -m edge_msd.cli features "${feat[@]}" --out "$OUT/feat1/val" 2>&1 | tail -1
        torchrun --standalone --nproc_per_node="$NGPU" -m edge_msd.cli features "${feat[@]}" \
            --out "$OUT/featN/val" 2>&1 | tail -1
        (cd "$OUT/feat1/val" && sha256sum image/*.npy text/*.npy) > "$OUT/feat1.sha"
        (cd "$OUT/featN/val" && sha256sum image/*.npy text/*.npy) > "$OUT/featN.sha"
        cmp -s "$OUT/feat1.sha" "$OUT/featN.sha" && echo "features: $NGPU ranks == 1 process (shard bytes)" \
            || echo "features: $NGPU ranks DIFFER from 1 process"
        ran="$ran; features sharded over $NGPU GPUs"
    fi
else
    echo "NOT RUN: several GPUs (this machine has $NGPU): DDP over NCCL and SyncBatchNorm stay unchecked"
fi
echo "RAN: $ran"
python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
for run in ("single", "ddp"):
    path = Path(sys.argv[1]) / run / "metrics.jsonl"
    if not path.is_file():
        continue
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r][20:]
    val = [r["val"]["mean_R@1"] for r in recs if "val" in r]
    line = f"{run}: median {statistics.median(rates):.0f} samples/s over {len(rates)} steps (all ranks)"
    print(line + (f", last val mean R@1 {val[-1]:.1f}" if val else ""))
ev = Path(sys.argv[1]) / "single" / "eval.json"
if ev.is_file():
    e = json.loads(ev.read_text())
    print("eval (single):", {k: e[k]["mean_R@1"] for k in ("teacher", "student")})
PY
