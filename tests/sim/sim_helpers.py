"""A synthetic transformer-like workload shared by the engine and planner tests."""
from mpifc.sim.engine import Phase, Workload


def big_workload(dp, tp, layers=48):
    ph = []
    for i in range(layers):
        ph += [Phase("compute", f"l{i}.fwd", flops=4e9 / tp),
               Phase("comm", f"l{i}.fwd.ag", op="allgatherv", group="tp", bytes=2e6)]
    for i in reversed(range(layers)):
        ph += [Phase("compute", f"l{i}.bwd", flops=8e9 / tp, stage="backward"),
               Phase("comm", f"l{i}.bwd.ar(dx)", op="allreduce", group="tp", bytes=2e6,
                     stage="backward"),
               Phase("comm", f"l{i}.grad", op="allreduce", group="dp", bytes=16e6 / tp,
                     overlappable=True, stage="backward")]
    ph.append(Phase("compute", "adam", op_kind="elementwise", bytes=4e8 / tp, stage="optimizer"))
    return Workload("big", ph, samples_per_step=32 * dp, memory_bytes_per_rank=2e9 / tp,
                    dp=dp, tp=tp)


def count_calls(fn) -> int:
    """Python and C function calls made by ``fn()``: a measure of work that, unlike a
    wall-clock time, does not change with the load on the machine."""
    import sys

    n = 0

    def prof(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(old)
    return n
