"""EmbeddingBag's flat (tokens, offsets) form with padding_idx: pad tokens are dropped."""
import numpy as np
import pytest

from mpifc import nn

BAGS = [[3, 0, 5, 0], [], [0, 0], [7], [1, 2, 0, 4, 4]]      # 0 = padding; bag 2 only padding


def flat(bags):
    tokens = np.array([t for b in bags for t in b], dtype=np.int64)
    offsets = np.cumsum([0] + [len(b) for b in bags[:-1]]).astype(np.int64)
    return tokens, offsets


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_flat_padding_is_dropped_and_not_counted(mode):
    bag = nn.EmbeddingBag(9, 4, mode=mode, padding_idx=0, rng=np.random.default_rng(0),
                          dtype=np.float64)
    E = bag.weight.data
    tokens, offsets = flat(BAGS)
    y = bag.forward((tokens, offsets))                      # the text model's tuple form
    want = np.zeros((len(BAGS), 4))
    for i, b in enumerate(BAGS):
        real = [t for t in b if t != 0]
        if real:
            want[i] = E[real].sum(0) / (len(real) if mode == "mean" else 1)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-15)
    # the same as the (tokens, offsets) pair and as the padded form
    np.testing.assert_allclose(bag.forward(tokens, offsets), want, rtol=1e-12, atol=1e-15)
    L = max(map(len, BAGS))
    padded = np.array([b + [0] * (L - len(b)) for b in BAGS])
    np.testing.assert_allclose(bag.forward(padded), want, rtol=1e-12, atol=1e-15)
    # gradients: the padding row gets none, the others as the serial sum says
    dy = np.random.default_rng(1).standard_normal(want.shape)
    bag.zero_grad()
    bag.forward((tokens, offsets))
    bag.backward(dy)
    dE = np.zeros_like(E)
    for i, b in enumerate(BAGS):
        real = [t for t in b if t != 0]
        for t in real:
            dE[t] += dy[i] / (len(real) if mode == "mean" else 1)
    np.testing.assert_allclose(bag.weight.grad, dE, rtol=1e-12, atol=1e-15)
    assert not bag.weight.grad[0].any()


def test_drop_padding_keeps_bags():
    tokens, offsets = flat(BAGS)
    t2, o2 = nn.embedding.drop_padding(tokens, offsets, 0)
    assert t2.tolist() == [3, 5, 7, 1, 2, 4, 4]
    assert o2.tolist() == [0, 2, 2, 2, 3]
    t3, o3 = nn.embedding.drop_padding(np.zeros(3, np.int64), np.array([0, 1, 3]), 0)
    assert t3.size == 0 and o3.tolist() == [0, 0, 0]
    t4, o4 = nn.embedding.drop_padding(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    assert t4.size == 0 and o4.size == 0
