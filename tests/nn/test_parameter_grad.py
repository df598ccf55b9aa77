"""Parameter.zero_grad defers its zeros: whatever path a gradient takes next, last
step's values never show through, and a layer that writes every row writes into the
array without a fill first."""
import numpy as np
import pytest

from mpifc.nn import Linear, Sequential, ReLU
from mpifc.nn.module import Parameter


def stale(shape=(4, 3)):
    p = Parameter(np.zeros(shape))
    p.grad[...] = 7.0                       # last step's gradient
    return p


def test_zero_grad_reads_zeros_and_keeps_the_array():
    p = stale()
    arr = p._grad
    p.zero_grad()
    assert p._grad is arr and (arr == 7).all()   # nothing written yet ...
    assert p.grad is arr and not p.grad.any()    # ... until it is read


def test_accumulate_rows_writes_fresh_rows_without_a_fill():
    p = stale()
    p.grad_rows = (0, 1, 4)
    p.zero_grad()
    seen = []

    def block(r0, r1, out):
        seen.append(out is not None and (out == 7).all())   # the array as it was: no fill
        out[...] = r0 + 1
        return out
    p.accumulate_rows(block)
    assert seen == [True, True]
    np.testing.assert_array_equal(p.grad, [[1] * 3] + [[2] * 3] * 3)
    p.accumulate_rows(lambda r0, r1, out: np.ones((r1 - r0, 3)))       # no zero_grad: adds
    np.testing.assert_array_equal(p.grad, [[2] * 3] + [[3] * 3] * 3)


def test_add_grad_assigns_after_zero_grad_then_adds():
    p = stale()
    p.zero_grad()
    p.add_grad(np.full((4, 3), 2.0))
    p.add_grad(np.full((4, 3), 0.5))
    np.testing.assert_array_equal(p.grad, np.full((4, 3), 2.5))


def test_setting_grad_drops_the_deferred_zeros():
    p = stale()
    p.zero_grad()
    p.grad = np.full((4, 3), 3.0)
    np.testing.assert_array_equal(p.grad, np.full((4, 3), 3.0))


@pytest.mark.parametrize("steps", [1, 3])
def test_training_steps_match_eager_zeros(steps):
    """The same model trained with the deferred zero_grad and with zeros written at once."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((8, 5)), rng.standard_normal((8, 2))
    nets = [Sequential(Linear(5, 6, seed=1, dtype=np.float64), ReLU(), Linear(6, 2, seed=2, dtype=np.float64))
            for _ in range(2)]
    for _ in range(steps):
        for k, net in enumerate(nets):
            for p in net.parameters():
                p.zero_grad()
                if k:
                    p.settle_grad()            # eager: the zeros written now
            net.forward(x)
            net.backward(dy)
            for p in net.parameters():
                p.data -= 0.1 * p.grad
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.grad, b.grad)
