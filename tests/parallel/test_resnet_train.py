"""resnet-small trains on the synthetic CIFAR-shaped set under `mpiexec -n 2 mpifc train`,
as dp=2 and as tp=2 (the block convs sharded out/in): in float64 the per-step losses of
the two layouts agree to 1e-8 (float32 rounding grows over steps through BatchNorm), and
the loss falls."""
import json
import os
import sys

import pytest

from joblaunch import MPIEXEC, run_job

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
STEPS = 12


def train(tmp_path, tag, *sets):
    out = tmp_path / tag
    args = [sys.executable, "-m", "mpifc", "train", "resnet-small", "--out", str(out),
            "--set", f"train.max_steps={STEPS}", "--set", "train.batch_size=32",
            "--set", "train.log_every=1", "--set", "schedule.name=none",
            "--set", "train.dtype=float64", *sets]
    p, _ = run_job(args, 2, timeout=300, cwd=str(tmp_path),
                   env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "epoch_s" not in r and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), rows
    assert (out / "checkpoints" / f"ckpt-{STEPS:06d}.h5").exists()
    return [r["loss"] for r in steps], p


def test_resnet_small_trains_under_dp_and_tp(tmp_path):
    dp_loss, _ = train(tmp_path, "dp2")
    tp_loss, p = train(tmp_path, "tp2", "--set", "parallel.tp=2")
    assert "dp=1 x tp=2" in p.stdout + p.stderr
    print("dp=2:", [round(v, 4) for v in dp_loss])
    print("tp=2:", [round(v, 4) for v in tp_loss])
    for a, b in zip(dp_loss, tp_loss):
        assert abs(a - b) <= 1e-8 * max(1.0, abs(a)), (dp_loss, tp_loss)
    first, last = sum(dp_loss[:3]) / 3, sum(dp_loss[-3:]) / 3
    assert last < 0.8 * first, dp_loss
