#!/usr/bin/env bash
# One prepared GPU check of the distillation trainer on the demo features (for the `device` tool):
# bf16 autocast in one process, then the same under torchrun, and samples/s of each from metrics.jsonl.
# Needs runs/features/{train,val,test} (carry them) and the wheels the GPU image lacks in .whl/.
set -euo pipefail
OUT=${OUT:-/tmp/gpu_distill}
STEPS=${STEPS:-300}
BATCH=${BATCH:-128}
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .whl/*.whl
export PYTHONPATH="$PWD:/tmp/pylib"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common=(--teacher= --features runs/features --steps "$STEPS" --batch-size "$BATCH" --eval-every 100
        --ckpt-every 100 --force)
python3 -m edge_msd.cli distill "${common[@]}" --out "$OUT/single" --device cuda --bf16 2>&1 | tail -4
torchrun --standalone --nproc_per_node=1 -m edge_msd.cli distill "${common[@]}" --test-split= \
    --out "$OUT/torchrun" --device auto 2>&1 | tail -3
python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
for run in ("single", "torchrun"):
    recs = [json.loads(l) for l in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r][20:]
    print(f"{run}: median {statistics.median(rates):.0f} samples/s over {len(rates)} steps")
ev = Path(sys.argv[1]) / "single" / "eval.json"
if ev.is_file():
    e = json.loads(ev.read_text())
    print("eval:", {k: e[k]["mean_R@1"] for k in ("teacher", "student")})
PY
