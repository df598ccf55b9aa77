"""Cluster description: links, TOML round trip, presets, hostfiles, measured tables."""
import math

import pytest

from dataclasses import replace

from mpifc.sim.cluster import (Cluster, ClusterError, ComputeRates, LinkModel, MeasuredTable, Thresholds,
                               fastest_of, from_hostfile, load, loads, median_of, parse_hostfile, preset,
                               preset_names)


def _cluster():
    return Cluster(
        name="test \"quoted\" name", nodes=3, ranks_per_node=4,
        intra=LinkModel([(0, 4e-7, 1e9), (65536, 1.5e-6, 6.5e9)]),
        inter=LinkModel([(8, 1.25e-6, 2e9), (4194304, 5e-6, 11.5e9)]),
        reduction_Bps=3.3e9,
        compute=ComputeRates(gemm_gflops=12.5, conv_gflops=7.0, elementwise_gbps=2.25,
                             gemm_curve=[(2e5, 3.0), (2e8, 12.5)]),
        thresholds=Thresholds(allreduce_short_msg_size=4096, hierarchical=False,
                              algorithms={"allreduce": "ring"}),
        measured=[MeasuredTable("allreduce", 2, 1, [8, 1024, 65536], [1e-5, 2e-5, 1e-3]),
                  MeasuredTable("bcast", 4, 2, [8.0, 64.0], [3e-6, 4e-6])],
        memory_per_rank_bytes=2.5e9, hosts=[("n1", 4), ("n2", 4), ("n3", 2)],
        source="unit test", notes="two lines\nwith a \\ backslash", overlap_efficiency=0.25)


def test_toml_round_trip(tmp_path):
    c = _cluster()
    assert loads(c.to_toml()) == c
    path = tmp_path / "c.toml"
    c.save(path)
    assert load(path) == c
    assert not (tmp_path / "c.toml.tmp").exists()


def test_overlap_efficiency_is_a_share():
    assert "overlap_efficiency = 0.25" in _cluster().to_toml()
    assert preset(preset_names()[0]).overlap_efficiency == 1.0       # not measured: all hidden
    assert replace(_cluster(), overlap_efficiency=-0.5).overlap_efficiency == -0.5
    for bad in (-1.1, 1.5):
        with pytest.raises(ValueError, match="overlap_efficiency must be in"):
            replace(_cluster(), overlap_efficiency=bad)


def _scaled(c, k):
    """c with every measured time multiplied by k (rates divided by k)."""
    cr = c.compute
    return replace(
        c, intra=LinkModel([(b, l * k, bw / k) for b, l, bw in c.intra.points]),
        inter=LinkModel([(b, l * k, bw / k) for b, l, bw in c.inter.points]),
        reduction_Bps=c.reduction_Bps / k,
        compute=replace(cr, gemm_gflops=cr.gemm_gflops / k,
                        gemm_curve=[(f, r / k) for f, r in cr.gemm_curve], call_s=1e-6 * k),
        measured=[replace(t, seconds=[x * k for x in t.seconds]) for t in c.measured],
        overlap_efficiency=min(0.2 * k, 1.0))


def test_median_of_takes_each_figure_from_the_middle_round():
    c = _cluster()
    m = median_of([_scaled(c, 3.0), _scaled(c, 1.0), _scaled(c, 2.0)])
    assert m == _scaled(c, 2.0)
    assert median_of([c]) == c
    # figures move independently: the median is per figure, not per round
    a, b = _scaled(c, 1.0), _scaled(c, 2.0)
    odd = replace(_scaled(c, 3.0), reduction_Bps=c.reduction_Bps * 10)
    m = median_of([a, b, odd])
    assert m.reduction_Bps == pytest.approx(c.reduction_Bps)       # 1/2, 1, 10 -> 1
    assert m.compute.call_s == pytest.approx(2e-6)


def test_fastest_of_takes_each_figure_from_its_fastest_round():
    c = _cluster()
    rounds = [_scaled(c, 3.0), _scaled(c, 1.0), _scaled(c, 2.0)]
    # every time from k = 1, every rate too; the overlap share is the median (0.2 k)
    assert fastest_of(rounds) == replace(_scaled(c, 1.0), overlap_efficiency=0.4)
    odd = replace(_scaled(c, 3.0), reduction_Bps=c.reduction_Bps * 10)
    m = fastest_of([_scaled(c, 2.0), odd])
    assert m.reduction_Bps == pytest.approx(c.reduction_Bps * 10)  # figures move independently
    assert m.compute.call_s == pytest.approx(2e-6)
    with pytest.raises(ValueError, match="fastest_of: the calibrations differ"):
        fastest_of([c, replace(c, measured=c.measured[:1])])


def test_median_of_refuses_different_calibrations():
    c = _cluster()
    other = replace(c, intra=LinkModel([(0, 4e-7, 1e9), (4096, 1.5e-6, 6.5e9)]))
    with pytest.raises(ValueError, match="differ in intra link sizes"):
        median_of([c, other])
    with pytest.raises(ValueError, match="differ in measured collective tables"):
        median_of([c, replace(c, measured=c.measured[:1])])
    with pytest.raises(ValueError, match="at least one"):
        median_of([])


def test_toml_errors():
    text = _cluster().to_toml()
    with pytest.raises(ValueError, match="unknown keys"):
        loads("bogus = 1\n" + text)
    with pytest.raises(ValueError, match="missing key 'nodes'"):
        loads("\n".join(l for l in text.splitlines() if not l.startswith("nodes =")))
    with pytest.raises(ValueError, match="not valid TOML"):
        loads("nodes = = 3")
    with pytest.raises(ValueError, match=r"unknown \[thresholds\] keys"):
        loads(text.replace("[thresholds]", "[thresholds]\nallreduce_shrot_msg_size = 3"))


@pytest.mark.parametrize("edit, msg", [
    (("nodes = 3", 'nodes = "two"'), "c.toml: nodes must be a positive integer, got 'two'"),
    (("nodes = 3", "nodes = inf"), "c.toml: nodes must be a positive integer, got inf"),
    (("nodes = 3", "nodes = 2.5"), "c.toml: nodes must be a positive integer, got 2.5"),
    (("ranks_per_node = 4", "ranks_per_node = true"),
     "c.toml: ranks_per_node must be a positive integer, got True"),
    (("points = [\n  [0.0, 4e-07, 1000000000.0],\n  [65536.0, 1.5e-06, 6500000000.0],\n]",
      "points = 5"), "c.toml: intra.points must be a list"),
    (("[8.0, ", "[\"a\", "),
     r"c.toml: inter.points\[0\] must be \[bytes, latency_s, bandwidth_Bps\]"),
    (("reduction_Bps = ", "reduction_Bps = inf\nx = "), "unknown keys"),
    (("reduction_Bps = 3300000000.0", "reduction_Bps = inf"),
     "c.toml: reduction_Bps must be a finite number > 0, got inf"),
    (("gemm_gflops = 12.5", 'gemm_gflops = "fast"'),
     "c.toml: compute.gemm_gflops must be a finite number >= 0, got 'fast'"),
    (("nodes = 3", "nodes = 3\nhosts = 3"), "not valid TOML"),    # hosts is defined below too
    (('name = "n1"\nslots = 4', 'name = "n1"\nslots = "four"'),
     r"c.toml: hosts\[0\].slots must be a positive integer, got 'four'"),
    (("group_size = 2", "group_size = 0"),
     r"c.toml: measured\[0\].group_size must be a positive integer, got 0"),
    (("overlap_efficiency = 0.25", "overlap_efficiency = 3"), "overlap_efficiency must be a number in"),
    (("[inter]\n", "[inter]\nlatency = 3\n"), r"unknown \[inter\] keys \['latency'\]"),
    (("hierarchical = false", "hierarchical = 1"), "thresholds.hierarchical must be true or"),
])
def test_cluster_file_errors_name_the_key(tmp_path, edit, msg):
    """Every bad value of a cluster TOML is one ClusterError naming the file and the key."""
    text = _cluster().to_toml()
    assert loads(text) == _cluster()
    assert edit[0] in text, edit
    f = tmp_path / "c.toml"
    f.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ClusterError, match=msg) as e:
        load(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_cluster_values_of_the_wrong_type():
    text = preset("eth25").to_toml()
    for bad, msg in ((text.replace("nodes = 16", "nodes = 16\nhosts = 3"), "hosts must be a list"),
                     (text.replace("nodes = 16", "nodes = 16\nmeasured = [1]"),
                      r"measured\[0\] must be a table")):
        with pytest.raises(ClusterError, match=msg):
            loads(bad, where="x.toml")


def test_binary_cluster_file_and_hostfile(tmp_path, capsys):
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ClusterError, match=f"cluster file {blob}: not a text file"):
        load(blob)
    with pytest.raises(ClusterError, match=f"hostfile {blob}: not a text file"):
        from_hostfile(blob, "eth25")
    nul = tmp_path / "nul"
    nul.write_bytes(b"node01 slots=4\n\x00\x00\n")
    with pytest.raises(ClusterError, match=f"hostfile {nul}: not a text file"):
        from_hostfile(nul, "eth25")
    bad = tmp_path / "hosts"
    bad.write_text("node01 slots=4\nnode02 slots=four\n")
    with pytest.raises(ClusterError, match=f"{bad}:2: 'node02 slots=four': slot count"):
        from_hostfile(bad, "eth25")
    # the CLI: one line naming the file, exit status non-zero
    from mpifc.cli import main

    with pytest.raises(SystemExit) as e:
        main(["simulate", "digits-mlp", "--cluster", str(blob), "--ranks", "2"])
    assert str(e.value) == f"mpifc simulate: --cluster cluster file {blob}: not a text file " \
                           "(byte 128 is not UTF-8)"


def test_presets_load_and_round_trip():
    names = preset_names()
    assert {"shm-node", "ib-hdr100", "eth25", "ib-ndr400"} <= set(names)
    for n in names:
        c = preset(n)
        assert "not measurements" in c.notes
        assert loads(c.to_toml()) == c
    with pytest.raises(ValueError, match="no network preset"):
        preset("token-ring")


def test_link_constant_and_interpolation():
    link = LinkModel.constant(2e-6, 1e9)
    assert link.alpha(0) == 2e-6 and link.beta(1e6) == 1e-9
    assert link.time(1000) == pytest.approx(2e-6 + 1000 * 1e-9)
    # breakpoints at 0 and 1023 bytes: log2(n+1) = 0 and 10; n = 31 is halfway
    link = LinkModel([(1023, 3e-6, 3e9), (0, 1e-6, 1e9)])   # unsorted on purpose
    assert link.alpha(31) == pytest.approx(2e-6)
    assert link.beta(31) == pytest.approx(1 / 2e9)
    assert link.alpha(1e9) == pytest.approx(3e-6)          # clamped beyond the last point
    with pytest.raises(ValueError):
        LinkModel([])
    with pytest.raises(ValueError):
        LinkModel([(0, 1e-6, 0.0)])


def test_link_from_pingpong_reproduces_measurements():
    sizes = [8, 1024, 65536, 1048576]
    times = [2e-6, 3e-6, 1.2e-5, 1.1e-4]
    link = LinkModel.from_pingpong(sizes, times)
    for n, t in zip(sizes, times):
        assert link.time(n) == pytest.approx(t, rel=1e-3)


def test_measured_table_loglog_interpolation():
    t = MeasuredTable("allreduce", 2, 1, [8, 1024, 65536], [1e-5, 2e-5, 1e-3])
    assert t(8) == pytest.approx(1e-5)
    assert t(1024) == pytest.approx(2e-5)
    # geometric midpoint in size -> geometric midpoint in time
    assert t(math.sqrt(8 * 1024)) == pytest.approx(math.sqrt(1e-5 * 2e-5))
    assert t(8192) == pytest.approx(math.exp(math.log(2e-5) + 0.5 * math.log(1e-3 / 2e-5)))
    assert t.covers(65536) and not t.covers(65537) and not t.covers(4)
    with pytest.raises(ValueError, match="outside the measured range"):
        t(1e6)
    with pytest.raises(ValueError):
        MeasuredTable("allreduce", 2, 1, [8, 16], [1e-5])


def test_hostfile_mpich_syntax():
    text = "# compute nodes\nnode01:4\nnode02:4   # second\n\n  node03\nnode01:2\n"
    assert parse_hostfile(text) == [("node01", 6), ("node02", 4), ("node03", 1)]


def test_hostfile_openmpi_syntax():
    text = "n1 slots=8\nn2 slots=8 max_slots=16\nn3 max_slots=2\n# end\n"
    assert parse_hostfile(text) == [("n1", 8), ("n2", 8), ("n3", 2)]


@pytest.mark.parametrize("bad, msg", [
    ("n1:x\n", "not a positive integer"),
    ("n1:0\n", "not a positive integer"),
    ("n1:\n", "empty count"),
    ("n1 slots=\n", "not a positive integer"),
    ("n1 cpus=4\n", "expected 'slots=N'"),
    ("n1:4 slots=4\n", "neither"),
    ("a:b:c\n", "not a positive integer"),
    ("# nothing\n\n", "no hosts"),
])
def test_hostfile_errors_name_the_line(bad, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_hostfile(bad, where="hosts.txt")
    if "no hosts" not in msg:
        assert "hosts.txt:1:" in str(e.value)


def test_from_hostfile_with_preset(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("a slots=4\nb slots=4\nc slots=2\n")
    c = from_hostfile(f, "ib-hdr100")
    base = preset("ib-hdr100")
    assert (c.nodes, c.ranks_per_node) == (3, 4)
    assert c.inter == base.inter and c.compute == base.compute
    assert c.hosts == [("a", 4), ("b", 4), ("c", 2)]
    assert "differ" in c.notes
    assert loads(c.to_toml()) == c
    c2 = from_hostfile("x:8\ny:8\n", "eth25")
    assert (c2.nodes, c2.ranks_per_node, c2.size) == (2, 8, 16)
    with pytest.raises(ValueError, match="does not exist"):
        from_hostfile(tmp_path / "missing", "eth25")


def test_compute_rates_and_curves():
    r = ComputeRates(gemm_gflops=10.0, conv_gflops=5.0, elementwise_gbps=2.0)
    assert r.seconds("gemm", flops=2e9) == pytest.approx(0.2)
    assert r.seconds("conv", flops=2e9) == pytest.approx(0.4)
    assert r.seconds("elementwise", nbytes=1e9) == pytest.approx(0.5)
    # curve: 2 GFLOP/s at 1e6 flops, 8 GFLOP/s at 1e8; 1e7 is halfway in log -> 5 GFLOP/s
    r = ComputeRates(gemm_curve=[(1e8, 8.0), (1e6, 2.0)])
    assert r.seconds("gemm", flops=1e7) == pytest.approx(1e7 / 5e9)
    assert r.seconds("gemm", flops=1e10) == pytest.approx(1e10 / 8e9)   # clamped
    assert r.seconds("conv", flops=1e9) == pytest.approx(1e9 / 5e9)     # no conv curve
    with pytest.raises(ValueError, match="op_kind"):
        r.seconds("fft", flops=1)
    with pytest.raises(ValueError):
        ComputeRates(gemm_gflops=0)
