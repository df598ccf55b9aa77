#!/usr/bin/env bash
# Reshard on load: train digits-cnn 30 steps under tp=2 (2 ranks), save, then continue
# 30 steps from that checkpoint under tp=2, dp=2 (2 ranks) and tp=1 (1 rank), and print
# the relative difference of each continued run's per-step loss from the tp=2 one.
#   bash bench/reshard.sh [float32|float64]
set -euo pipefail
DT="${1:-float32}"
R="$(mktemp -d)"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
C=(--set "data.dir=$R/data" --set train.log_every=1 --set "train.dtype=$DT" --set train.trace=false --quiet)
mpiexec -n 2 mpifc train digits-cnn "${C[@]}" --set parallel.tp=2 --set train.max_steps=30 --out "$R/src" >/dev/null
mpiexec -n 2 mpifc train digits-cnn "${C[@]}" --set parallel.tp=2 --set train.max_steps=60 --resume "$R/src/checkpoints" --out "$R/tp2" >/dev/null
mpiexec -n 2 mpifc train digits-cnn "${C[@]}" --set parallel.dp=2 --set train.max_steps=60 --resume "$R/src/checkpoints" --out "$R/dp2" >/dev/null
mpifc train digits-cnn "${C[@]}" --set train.max_steps=60 --resume "$R/src/checkpoints" --out "$R/tp1" >/dev/null
python - "$R" "$DT" <<'PY'
import json, sys
R, dt = sys.argv[1:]
def losses(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if "epoch_s" not in r}
ref = losses(f"{R}/tp2/metrics.jsonl")
print(f"{dt}: continued from the tp=2 checkpoint at step 30; relative loss difference vs tp=2")
print(f"{'layout':>8} {'step 31':>9} {'steps 31-40':>12} {'steps 31-60':>12}")
for k in ("dp2", "tp1"):
    got = losses(f"{R}/{k}/metrics.jsonl")
    assert sorted(got) == sorted(ref), (k, sorted(got))
    d = [abs(got[s] - ref[s]) / abs(ref[s]) for s in sorted(ref)]
    print(f"{k:>8} {d[0]:9.1e} {max(d[:10]):12.1e} {max(d):12.1e}")
PY
rm -rf "$R"
