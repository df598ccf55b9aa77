"""examples/ run as users run them (child mpiexec jobs), against the CLI trainer.

examples/tp_mlp.py builds the digits-mlp model by hand and trains it with mpifc.fit;
``mpifc train digits-mlp`` with the same layout, seed and settings must log the same
losses (every logged step and every epoch, to 1e-6): the CLI is a user of the API.
"""
import json
import os
import sys

import pytest

from joblaunch import MPIEXEC, run_job

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tp_mlp.py")
SETTINGS = {"epochs": 2, "log_every": 4, "seed": 2}


def _losses(path):
    with open(path) as f:
        return [(r["step"], r["epoch"], r["loss"], r.get("test_loss")) for r in map(json.loads, f)]


@pytest.mark.parametrize("n,tp", [(1, 1), (2, 2), (4, 2)])
def test_example_losses_equal_the_cli_trainer(tmp_path, n, tp):
    data = str(tmp_path / "data")
    s = SETTINGS
    p, _ = run_job([sys.executable, EXAMPLE, "--tp", str(tp), "--epochs", str(s["epochs"]),
                    "--log-every", str(s["log_every"]), "--seed", str(s["seed"]),
                    "--data-dir", data, "--out", str(tmp_path / "example")], n, timeout=240,
                   cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test accuracy" in p.stdout and "full tensors on rank 0: 1.weight (256, 64)" in p.stdout
    p, _ = run_job([sys.executable, "-m", "mpifc", "train", "digits-mlp", "--quiet",
                    "--set", f"parallel.tp={tp}", "--set", f"train.epochs={s['epochs']}",
                    "--set", f"train.log_every={s['log_every']}", "--set", f"seed={s['seed']}",
                    "--set", f"data.dir={data}", "--out", str(tmp_path / "cli")], n,
                   timeout=240, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    got = _losses(tmp_path / "example" / "metrics.jsonl")
    want = _losses(tmp_path / "cli" / "metrics.jsonl")
    assert [r[:2] for r in got] == [r[:2] for r in want] and len(got) == 2 + 2 * 23 // 4
    diff = max(max(abs(a[2] - b[2]), abs((a[3] or 0) - (b[3] or 0))) for a, b in zip(got, want))
    assert diff <= 1e-6, (diff, got, want)
    print(f"OK n={n} tp={tp}: {len(got)} records, maxdiff = {diff:.2e}")
