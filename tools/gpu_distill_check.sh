#!/usr/bin/env bash
# One prepared GPU check of the distillation trainer on the demo features (for the `device` tool).
#   1. one process, --device cuda, bf16 autocast: samples/s and eval.json;
#   2. resume: the same run killed after its first checkpoint and resumed; its last val recall against 1's;
#   3. DataLoader workers (--num-workers 2, no pre-decoding): samples/s against step 1's;
#   4. with 2 or more GPUs only: torchrun, one rank per GPU (DDP over NCCL, SyncBatchNorm for the edge-s
#      BatchNorm student): samples/s, and the val recall against step 1's; with TEACHER=<spec> also the
#      feature cache of the val split under torchrun, its shards compared with a 1-process build.
# Exit status: 0 every check that ran passed, 1 a check differed (each says DIFFER), any other: a crash.
# It prints what it ran: with a single GPU step 4 does not run, since 2 ranks on one GPU would not
# test several GPUs (and cuda:LOCAL_RANK does not exist for rank 1). DEVICE=cpu runs steps 1-3 on the
# CPU (a check of this script, not of a GPU). Needs runs/features/{train,val,test} (carry them) and, on
# the GPU image, the wheels it lacks in .whl/.
set -euo pipefail
OUT=${OUT:-/tmp/gpu_distill}
mkdir -p "$OUT"
STEPS=${STEPS:-300}
BATCH=${BATCH:-128}
DEVICE=${DEVICE:-cuda}
TOL=${TOL:-1.0}  # recall points two runs may differ by (bf16 and cuDNN are not bit-deterministic)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/pylib"
NGPU=0
if [ "$DEVICE" != cpu ]; then
    NGPU=$(nvidia-smi -L | wc -l)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
every=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 ))
common=(--teacher= --features runs/features --batch-size "$BATCH" --eval-every "$every"
        --ckpt-every "$every" --device "$DEVICE")
distill() { python3 -m edge_msd.cli distill "${common[@]}" "$@" 2>&1 | tail -3; }
distill --steps "$STEPS" --force --out "$OUT/single"
ran="1 process ($DEVICE)"
# Cut as a preemption would: killed once its first checkpoint is written, then resumed to the end.
python3 -m edge_msd.cli distill "${common[@]}" --steps "$STEPS" --force --out "$OUT/resumed" \
    > "$OUT/resumed.log" 2>&1 &
pid=$!
until [ -f "$OUT/resumed/checkpoints/last.pt" ] || ! kill -0 "$pid" 2> /dev/null; do sleep 1; done
kill -TERM "$pid" 2> /dev/null || true
wait "$pid" || true
distill --steps "$STEPS" --resume --out "$OUT/resumed"
ran="$ran; killed after its first checkpoint and resumed"
distill --steps "$every" --force --num-workers 2 --predecode-mb 0 --out "$OUT/workers"
ran="$ran; 2 DataLoader workers"
differ=0
if [ "$NGPU" -ge 2 ]; then
    torchrun --standalone --nproc_per_node="$NGPU" -m edge_msd.cli distill "${common[@]}" --steps "$STEPS" \
        --force --test-split= --out "$OUT/ddp" 2>&1 | tail -3
    ran="$ran; torchrun with $NGPU ranks on $NGPU GPUs (DDP, NCCL)"
    if [ -n "${TEACHER:-}" ]; then
        feat=(--teacher "$TEACHER" --split val --device cuda --force)
        python3 -m edge_msd.cli features "${feat[@]}" --out "$OUT/feat1/val" 2>&1 | tail -1
        torchrun --standalone --nproc_per_node="$NGPU" -m edge_msd.cli features "${feat[@]}" \
            --out "$OUT/featN/val" 2>&1 | tail -1
        (cd "$OUT/feat1/val" && sha256sum image/*.npy text/*.npy) > "$OUT/feat1.sha"
        (cd "$OUT/featN/val" && sha256sum image/*.npy text/*.npy) > "$OUT/featN.sha"
        if cmp -s "$OUT/feat1.sha" "$OUT/featN.sha"; then
            echo "features: $NGPU ranks == 1 process (shard bytes)"
        else
            echo "features: $NGPU ranks DIFFER from 1 process"; differ=1
        fi
        ran="$ran; features sharded over $NGPU GPUs"
    fi
else
    echo "NOT RUN: several GPUs (this machine has $NGPU): DDP over NCCL and SyncBatchNorm stay unchecked"
fi
echo "RAN: $ran"
python3 - "$OUT" "$TOL" <<'PY' || differ=1
import json, statistics, sys
from pathlib import Path
out, tol = Path(sys.argv[1]), float(sys.argv[2])
last_val, differ = {}, False
for run in ("single", "resumed", "workers", "ddp"):
    path = out / run / "metrics.jsonl"
    if not path.is_file():
        continue
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r]
    rates = rates[min(20, len(rates) // 2):]  # past the warm-up steps
    val = [r["val"]["mean_R@1"] for r in recs if "val" in r]
    last_val[run] = val[-1] if val else None
    line = f"{run}: median {statistics.median(rates):.0f} samples/s over {len(rates)} steps (all ranks)"
    print(line + (f", last val mean R@1 {val[-1]:.1f}" if val else ""))
for run in ("resumed", "ddp"):
    a, b = last_val.get("single"), last_val.get(run)
    if a is not None and b is not None:
        same = abs(a - b) <= tol
        differ |= not same
        print(f"{run} vs single: last val mean R@1 {b:.1f} vs {a:.1f}: {'same' if same else 'DIFFER'} "
              f"(within {tol} pt)")
ev = out / "single" / "eval.json"
if ev.is_file():
    e = json.loads(ev.read_text())
    print("eval (single):", {k: e[k]["mean_R@1"] for k in ("teacher", "student")})
sys.exit(1 if differ else 0)
PY
exit "$differ"
