"""mpifc calibrate / mpifc simulate from the command line (serial; calibrate launches
its own ``mpiexec -n 2`` job, without the enclosing launcher's variables)."""
import importlib.util
import json
import os
import sys

import pytest

from joblaunch import run_job
from mpifc.cli import main
from mpifc.comm import world
from mpifc.sim.cluster import load

pytestmark = pytest.mark.skipif(world().size != 1, reason="serial CLI tests")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def run(capsys, *argv):
    main(list(argv))
    return capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["simulate", "calibrate"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: mpifc " + cmd in capsys.readouterr().out


def test_simulate_table_up_to_16384_ranks(capsys):
    out = run(capsys, "simulate", "digits-cnn", "--cluster", "ib-hdr100",
              "--ranks", "2,8,64,1024,16384", "--tp", "2", "--batch-per-rank", "64")
    lines = out.splitlines()
    assert "digits-cnn on ib-hdr100" in lines[0] and "weak scaling" in lines[0]
    head = lines[1].split()
    for col in ("compute", "allreduce(dp)", "allreduce(tp)", "exposed", "overlapped", "step",
                "samples/s", "MiB/rank"):
        assert col in head, col
    rows = [l.split() for l in lines[2:] if l.strip() and l.split()[0].rstrip("*").isdigit()]
    assert [r[0].rstrip("*") for r in rows] == ["2", "8", "64", "1024", "16384"]
    assert rows[-1][1] == "8192x2"
    assert "extrapolated" in out                       # 16384 > the preset's 512 ranks


def test_simulate_one_config_at_16384_ranks():
    from mpifc.config import load_config
    from mpifc.sim.commands import load_cluster
    from mpifc.sim.engine import simulate
    from mpifc.sim.workload import describe_step

    cfg, cl = load_config("digits-mlp"), load_cluster("ib-ndr400")
    r = simulate(describe_step(cfg, 16384, 1, global_batch=64 * 16384).workload, cl)
    assert r.ranks == 16384 and r.step_s > r.compute_s > 0    # its speed: bench/sim_speed.py


def _seconds(text: str) -> float:
    for unit, k in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * k
    return float(text)


def test_simulate_batch_is_the_global_batch_as_in_training(capsys):
    """train.batch_size is the global batch in `mpifc train` (split over dp) and in
    `mpifc simulate` alike: a step of the digits-mlp preset processes 64 samples at
    every rank count; --batch-per-rank n gives each dp replica n (n x dp in all)."""
    out = run(capsys, "simulate", "digits-mlp", "--cluster", "shm-node", "--ranks", "1,2,4")
    lines = out.splitlines()
    assert "global batch 64 (train.batch_size)" in lines[0]
    assert lines[1].split()[-3:] == ["step", "samples/s", "MiB/rank"]
    rows = [l.split() for l in lines[2:] if l.split() and l.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "4"]
    for r in rows:
        assert _seconds(r[-3]) * float(r[-2]) == pytest.approx(64, rel=1e-2), r
    out = run(capsys, "simulate", "digits-mlp", "--cluster", "shm-node", "--layout", "2x2",
              "--batch-per-rank", "32")
    lines = out.splitlines()
    assert "32 samples per dp replica (weak scaling)" in lines[0]
    r = lines[2].split()
    assert _seconds(r[-3]) * float(r[-2]) == pytest.approx(64, rel=1e-2)   # 32 x dp = 2


def test_simulate_plan_and_memory_cap(capsys):
    out = run(capsys, "simulate", "digits-mlp", "--cluster", "eth25", "--ranks", "4",
              "--plan", "--mem-cap", "0.0007")
    body = [l.split() for l in out.splitlines() if l.split()[:1] == ["4"] and "ranks:" not in l]
    fits = [r for r in body if "infeasible:" not in r]
    over = [r for r in body if "infeasible:" in r]
    assert {r[1] for r in body} == {"4x1", "2x2", "1x4"}
    assert fits and over and "cap" in out
    steps = [float(r[-3].rstrip("ms")) if r[-3].endswith("ms") else None for r in fits]
    assert steps == sorted(steps)                       # fastest first


def test_simulate_layouts_and_errors(capsys):
    out = run(capsys, "simulate", "digits-mlp", "--cluster", "eth25", "--layout", "2x1,1x2,2x2",
              "--batch", "64")
    assert "global batch 64" in out
    assert [l.split()[1] for l in out.splitlines()[2:5]] == ["2x1", "1x2", "2x2"]
    out = run(capsys, "simulate", "digits-mlp", "--cluster", "eth25", "--ranks", "3", "--tp", "2")
    assert "does not divide" in out
    out = run(capsys, "simulate", "digits-mlp", "--cluster", "eth25", "--ranks", "128",
              "--batch", "64")
    assert "infeasible: dp=128 > global batch 64" in out
    for argv, msg in ((["--cluster", "nowhere"], "neither a file nor a network preset"),
                      (["--cluster", "eth25", "--ranks", "2,x"], "comma-separated integers"),
                      (["--cluster", "eth25", "--dp", "2", "--tp", "2"], "give --dp or --tp")):
        with pytest.raises(SystemExit, match=msg):
            main(["simulate", "digits-mlp", *argv])
    with pytest.raises(SystemExit, match="neither a config file nor a preset"):
        main(["simulate", "no-such-config", "--cluster", "eth25"])


def test_simulate_plot(capsys, tmp_path):
    png = tmp_path / "scaling.png"
    argv = ["simulate", "digits-mlp", "--cluster", "eth25", "--ranks", "2,8,64", "--plot", str(png)]
    if HAS_MPL:
        out = run(capsys, *argv)
        assert png.stat().st_size > 1000 and f"wrote {png}" in out
    else:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1
        io = capsys.readouterr()
        assert "samples/s" in io.out                     # the table still came out
        assert "needs matplotlib" in io.err and "mpifc[plot]" in io.err
        assert not png.exists()


def _write_trace(d):
    """A 2-rank dp=2 trace: a forward allreduce and a gradient iallreduce per step."""
    os.makedirs(d, exist_ok=True)
    for r in (0, 1):
        t, lines = 0.0, []
        for _ in range(6):
            lines.append({"op": "allreduce", "comm": "dp", "comm_size": 2, "rank": r,
                          "dtype": "float32", "count": 250, "bytes": 1000, "t0": t + 1e-3,
                          "t1": t + 1.1e-3, "phase": "bn1.forward"})
            lines.append({"op": "iallreduce", "comm": "dp", "comm_size": 2, "rank": r,
                          "dtype": "float32", "count": 2500, "bytes": 10000, "t0": t + 2e-3,
                          "t1": t + 2.2e-3, "phase": "dp.grad_bucket0"})
            t += 2.2e-3
        with open(os.path.join(d, f"trace.rank{r}.jsonl"), "w") as f:
            f.write("".join(json.dumps(e) + "\n" for e in lines))


def test_simulate_replay(capsys, tmp_path):
    _write_trace(tmp_path / "trace")
    out = run(capsys, "simulate", "digits-mlp", "--cluster", "shm-node", "--ranks", "2,64",
              "--replay", str(tmp_path / "trace"), "--batch-per-rank", "32")
    assert "replay of a 2-rank run (dp=2 x tp=1)" in out
    assert "replay of" in out and "allreduce(dp)" in out
    rows = [l.split() for l in out.splitlines() if l.split() and l.split()[0].rstrip("*") in ("2", "64")]
    assert [r[1] for r in rows[-2:]] == ["2x1", "64x1"]
    with pytest.raises(SystemExit, match="no trace files"):
        main(["simulate", "digits-mlp", "--cluster", "eth25", "--replay", str(tmp_path / "none")])


def test_calibrate_under_mpiexec(tmp_path):
    out = tmp_path / "cluster.toml"
    p, _ = run_job([sys.executable, "-m", "mpifc", "calibrate", "--quick", "--out", str(out)],
                   2, timeout=300, env={"OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    c = load(out)
    assert c.ranks_per_node * c.nodes == 2 and c.measured
    assert f"wrote {out}" in p.stdout and p.stdout.count("wrote") == 1     # rank 0 only
    line = next(l for l in p.stdout.splitlines() if "overlap efficiency" in l)
    assert any(w in line for w in ("hides", "models the gradient overlap as a loss")), line


def test_cores_shared_by_more_ranks(capsys):
    from mpifc.sim.commands import load_cluster, share_cores

    cl = load_cluster("eth25")                             # 32 ranks per node
    half = share_cores(cl, cl.ranks_per_node // 2)
    assert half.compute.seconds("gemm", 1e8) == pytest.approx(2 * cl.compute.seconds("gemm", 1e8))
    assert half.compute.seconds("elementwise", 0, 1e6) == pytest.approx(
        2 * cl.compute.seconds("elementwise", 0, 1e6))
    assert share_cores(cl, 64) is cl                        # enough cores: unchanged
    base = run(capsys, "simulate", "digits-mlp", "--cluster", "eth25", "--ranks", "8")
    shared = run(capsys, "simulate", "digits-mlp", "--cluster", "eth25", "--ranks", "8",
                 "--cores-per-node", "16")
    comp = [_seconds(l.split()[2]) for l in (base.splitlines()[2], shared.splitlines()[2])]
    assert comp[1] == pytest.approx(2 * comp[0], rel=0.01)
