"""Learning-rate schedules and gradient clipping."""
import math

import numpy as np
import pytest

from mpifc.backend import available_backends, backend_module, to_host
from mpifc.nn import Parameter
from mpifc.optim import SGD, CosineWarmup, ReduceLROnPlateau, StepLR, clip_grad_norm, grad_sq_sum


def opt(lr=1.0):
    return SGD([Parameter(np.zeros(1), "w")], lr=lr)


def test_step_lr():
    o = opt(0.1)
    s = StepLR(o, step_size=3, gamma=0.5)
    lrs = [s.step() for _ in range(7)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])


def test_cosine_warmup():
    o = opt(1.0)
    s = CosineWarmup(o, warmup_steps=4, total_steps=12, min_lr=0.1)
    lrs = [o.lr] + [s.step() for _ in range(13)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    for t in range(4, 12):
        u = (t - 4) / 8
        assert lrs[t] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u)))
    assert lrs[12] == lrs[13] == 0.1
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))        # decays monotonically


def test_reduce_on_plateau_min():
    o = opt(1.0)
    s = ReduceLROnPlateau(o, mode="min", factor=0.5, patience=2, cooldown=1, min_lr=0.2)
    metrics = [5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3]
    lrs = [s.step(m) for m in metrics]
    # bad epochs after 4: #3 at index 4 -> reduce to 0.5; cooldown 1 epoch; 3 more bad -> 0.25 at index 8;
    # then at index 11 it would be 0.125 but min_lr clamps at 0.2 - yet 3 is an improvement there
    assert lrs == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]
    for m in [3] * 4:
        s.step(m)
    assert o.lr == 0.2                        # clamped at min_lr


def test_reduce_on_plateau_max_abs_threshold():
    o = opt(1.0)
    s = ReduceLROnPlateau(o, mode="max", factor=0.1, patience=0, threshold=0.1, threshold_mode="abs")
    assert s.step(0.5) == 1.0                 # improvement on -inf
    assert s.step(0.55) == pytest.approx(0.1)  # not better by 0.1: one bad epoch > patience 0
    assert s.step(0.7) == pytest.approx(0.1)


@pytest.fixture(params=available_backends())
def xp(request):
    return backend_module(request.param)


def test_clip_grad_norm(xp):
    ps = [Parameter(xp.zeros(3), "a"), Parameter(xp.zeros((2, 2)), "b")]
    ps[0].grad[...] = xp.asarray([3.0, 0.0, 0.0])
    ps[1].grad[...] = xp.asarray([[0.0, 4.0], [0.0, 0.0]])
    assert grad_sq_sum(ps) == 25.0
    n = clip_grad_norm(ps, max_norm=10.0)
    assert n == 5.0 and float(ps[0].grad[0]) == 3.0           # under the limit: untouched
    n = clip_grad_norm(ps, max_norm=1.0)
    assert n == 5.0
    assert math.sqrt(grad_sq_sum(ps)) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(to_host(ps[0].grad), [3 / 5.000001, 0, 0], rtol=1e-9)


def test_clip_norm_reduce_hook_completes_across_shards(xp):
    """Two 'ranks' holding halves of one tensor: the hook sums both local squares."""
    full = np.array([1.0, 2.0, 2.0, 4.0])
    shards = [Parameter(xp.zeros(2), "w"), Parameter(xp.zeros(2), "w")]
    shards[0].grad[...] = xp.asarray(full[:2])
    shards[1].grad[...] = xp.asarray(full[2:])
    local = [grad_sq_sum([s]) for s in shards]
    seen = []

    def reduce(sq):            # what an allreduce over the tensor-parallel group returns
        seen.append(sq)
        return sum(local)
    n0 = clip_grad_norm([shards[0]], 2.5, norm_reduce=reduce)
    n1 = clip_grad_norm([shards[1]], 2.5, norm_reduce=reduce)
    assert n0 == n1 == 5.0 and seen == local
    clipped = np.concatenate([to_host(s.grad) for s in shards])
    np.testing.assert_allclose(clipped, full * 2.5 / (5.0 + 1e-6))


def test_clip_nonfinite(xp):
    p = Parameter(xp.zeros(2), "w")
    p.grad[...] = xp.asarray([np.inf, 1.0])
    assert math.isinf(clip_grad_norm([p], 1.0))
    with pytest.raises(FloatingPointError):
        clip_grad_norm([p], 1.0, error_if_nonfinite=True)
