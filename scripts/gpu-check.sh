#!/usr/bin/env bash
# GPU check (issue 15), for a machine with an NVIDIA GPU; about 3-5 minutes:
#   1. the CuPy cases of the layer, functional and optimizer tests (backend-parametrised)
#   2. mpiexec -n 1/2/4/8 mpifc train cifar-cnn --set train.device=cuda, 300 steps each
#      (4 and 8 ranks as dp x tp=2); the trace's staged/device calls and their copy time
#      (ranks share the GPU(s) when there are fewer GPUs than ranks: train.share_gpu)
#   3. the 2-rank run's checkpoint evaluated on the GPU and on the CPU: same test loss
#   4. python bench/layers.py --device cuda (GFLOP/s beside cuBLAS GEMM; the CNN step
#      beside one CPU core and beside torch on the GPU when importable)
# Without a GPU it stops at once with one line and exit status 1.
#   GPU_CHECK_OUT=DIR   where the runs and the log go (default: a temp dir)
#   GPU_CHECK_RANKS="1 2 4 8", GPU_CHECK_STEPS=300   the training jobs
#   MPIFC_CUDA_AWARE=1  the site MPI takes device buffers (default: detected, else staged)
#   MPIFC_DEVICE_MODULE=tests/fakecupy.py   a dry run on the CuPy test double (no GPU;
#                       checks this script, measures nothing about GPUs)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${MPIFC_DEVICE_MODULE:-}" ] && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; }; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi lists none); run it on a GPU machine" >&2
  exit 1
fi
MPIFC_NEED=test . "$ROOT/scripts/env.sh" || exit 1
set +e
if ! python -c "from mpifc import backend; import sys; sys.exit(backend.device_count() == 0)" 2>/dev/null; then
  if [ -z "${MPIFC_DEVICE_MODULE:-}" ] && ! python -c "import cupy" 2>/dev/null; then
    echo "gpu-check: installing the gpu extra (cupy-cuda12x)" >&2
    python -m pip install -q --disable-pip-version-check -e "$ROOT[gpu]" >&2
  fi
  python -c "from mpifc import backend; import sys; sys.exit(backend.device_count() == 0)" 2>/dev/null || {
    echo "gpu-check: cupy sees no CUDA device: pip install mpifc[gpu] with the cupy wheel of this CUDA (README: GPUs)" >&2
    exit 1; }
fi
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$ROOT/runs/cupy-cache}"    # compiled kernels, kept
OUT="${GPU_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
fail=0
say() { echo "$*" | tee -a "$LOG"; }
step() { local name="$1"; shift; say "== $name"; "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]};
         [ "$rc" = 0 ] || { say "gpu-check: FAILED ($rc): $name"; fail=1; }; return "$rc"; }
say "gpu-check $(date -u +%FT%TZ) on $(hostname): $(nvidia-smi -L 2>/dev/null | head -8 | tr '\n' ';')"
python -c "from mpifc import backend; from mpifc.comm.staging import cuda_aware
n = backend.device_count(); print(f'{n} CUDA device(s) visible: ' + ', '.join(backend.device_name(i) for i in range(n)))
print('CUDA-aware MPI: %s (%s)' % cuda_aware())" | tee -a "$LOG"

step "GPU test subset (CuPy cases)" timeout 150 python -m pytest -q -p no:cacheprovider -k cupy \
  tests/nn/test_layers.py tests/nn/test_functional.py tests/optim/test_optimizers.py \
  tests/optim/test_schedules_clip.py

for n in ${GPU_CHECK_RANKS:-1 2 4 8}; do
  tp=1; [ "$n" -ge 4 ] && tp=2       # 4 and 8 ranks: dp x tp=2 (sharded convs, class-parallel loss)
  step "cifar-cnn on $n rank(s) (tp=$tp), train.device=cuda" timeout 120 mpiexec -n "$n" mpifc train cifar-cnn \
    --set train.device=cuda --set "parallel.tp=$tp" --set train.share_gpu=true --set train.epochs=5 --set "train.max_steps=${GPU_CHECK_STEPS:-300}" \
    --set "data.dir=$ROOT/runs/data" --out "$OUT/cifar-$n" --overwrite --progress none
  [ -d "$OUT/cifar-$n/trace" ] && python - "$OUT/cifar-$n/trace" <<'EOF' | tee -a "$LOG"
import glob, json, sys
ev = [json.loads(l) for f in glob.glob(sys.argv[1] + "/*.jsonl") for l in open(f)]
dev = [e for e in ev if "path" in e]
paths = sorted({e["path"] for e in dev})
print(f"  device-buffer calls: {len(dev)} ({', '.join(paths) or 'none'}), "
      f"copy time {sum(e['copy_s'] for e in dev):.3f} s of {sum(e['t1'] - e['t0'] for e in dev):.3f} s in them")
EOF
done

if [ -d "$OUT/cifar-2/checkpoints" ]; then
  say "== the 2-rank checkpoint evaluated on the GPU and on the CPU"
  g=$(timeout 90 mpiexec -n 2 mpifc eval "$OUT/cifar-2" --device cuda --set train.share_gpu=true \
      --set "data.dir=$ROOT/runs/data" 2>&1 | tee -a "$LOG" | sed -n 's/^test_loss \([0-9.e+-]*\).*/\1/p')
  c=$(timeout 90 mpiexec -n 2 mpifc eval "$OUT/cifar-2" --device cpu \
      --set "data.dir=$ROOT/runs/data" 2>&1 | tee -a "$LOG" | sed -n 's/^test_loss \([0-9.e+-]*\).*/\1/p')
  python -c "import sys; g, c = float(sys.argv[1]), float(sys.argv[2]); d = abs(g - c)
print(f'  test_loss cuda {g:.6f}  cpu {c:.6f}  |diff| {d:.2e} (target <= 1e-6; float32 sums differ in order)')
sys.exit(d > 1e-4)" "${g:-nan}" "${c:-nan}" 2>&1 | tee -a "$LOG" || { say "gpu-check: FAILED: cpu/cuda eval"; fail=1; }
fi

step "bench/layers.py --device cuda" timeout 150 python bench/layers.py --device cuda --repeat 10

say "gpu-check: $([ $fail = 0 ] && echo passed || echo FAILED); log $LOG"
exit $fail
