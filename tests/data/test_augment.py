"""Augmentation, validation rows and the training loaders, serially (issue 18 item 3).

Crop and flip on hand-made images; draws keyed by (seed, epoch, row) and not by the
order of the rows; the held-out validation rows; evaluation loaders never augmented;
bad config values are one ConfigError line.
"""
import subprocess
import sys

import numpy as np
import pytest

from mpifc.config import ConfigError, load_config
from mpifc.data.augment import Augment, sample_hash
from mpifc.data.format import write_dataset
from mpifc.data.validation import split_rows


class FakeComm:
    """Rank ``rank`` of ``size`` for slice mode (no communication needed)."""

    def __init__(self, rank=0, size=1):
        self.rank, self.size = rank, size

    def allgather_obj(self, obj):
        return [obj] * self.size


def _find(aug, epoch, want, n=10000):
    """The first sample index whose draws are ``want(flip, dy, dx)``."""
    flip, dy, dx = aug.draws(epoch, np.arange(n))
    hits = np.flatnonzero(want(flip, dy, dx))
    assert hits.size, "no sample with these draws"
    return int(hits[0])


def test_flip_mirrors_width_and_only_when_drawn():
    aug = Augment(("flip",), seed=3)
    x = np.array([[[[1, 2, 3], [4, 5, 6]]]], dtype=np.uint8)      # (1, 1, 2, 3)
    i = _find(aug, 0, lambda f, dy, dx: f)
    j = _find(aug, 0, lambda f, dy, dx: ~f)
    np.testing.assert_array_equal(aug(x, 0, [i]), [[[[3, 2, 1], [6, 5, 4]]]])
    np.testing.assert_array_equal(aug(x, 0, [j]), x)


def test_crop_is_a_window_of_the_zero_padded_image():
    aug = Augment(("crop",), pad=1, seed=0)
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)     # 1..9
    i = _find(aug, 2, lambda f, dy, dx: (dy == 0) & (dx == 2))
    # padded rows 0..2, columns 2..4: the window moved up-left by one pixel of zeros
    np.testing.assert_array_equal(aug(x, 2, [i])[0, 0], [[0, 0, 0], [2, 3, 0], [5, 6, 0]])
    k = _find(aug, 2, lambda f, dy, dx: (dy == 1) & (dx == 1))       # the centre: unchanged
    np.testing.assert_array_equal(aug(x, 2, [k]), x)


def test_crop_and_flip_together_flip_the_crop():
    both, crop = Augment(("crop", "flip"), pad=2, seed=5), Augment(("crop",), pad=2, seed=5)
    x = np.random.default_rng(0).integers(0, 256, (50, 3, 6, 5), dtype=np.uint8)
    idx = np.arange(100, 150)
    flip, dy, dx = both.draws(1, idx)
    assert flip.any() and not flip.all()
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    want = np.stack([padded[r, :, dy[r]:dy[r] + 6, dx[r]:dx[r] + 5] for r in range(50)])
    np.testing.assert_array_equal(crop(x, 1, idx), want)           # same hash: same window
    want[flip] = want[flip][..., ::-1]
    np.testing.assert_array_equal(both(x, 1, idx), want)


def test_draws_depend_on_seed_epoch_and_row_not_on_order():
    aug = Augment(("crop", "flip"), pad=4, seed=7)
    x = np.random.default_rng(1).standard_normal((40, 2, 8, 8)).astype(np.float32)
    idx = np.random.default_rng(2).permutation(1000)[:40]
    perm = np.random.default_rng(3).permutation(40)
    out = aug(x, 3, idx)
    np.testing.assert_array_equal(aug(x[perm], 3, idx[perm]), out[perm])      # any order/split
    np.testing.assert_array_equal(aug(x[:7], 3, idx[:7]), out[:7])
    assert not np.array_equal(aug(x, 4, idx), out)                             # another epoch
    assert not np.array_equal(Augment(("crop", "flip"), pad=4, seed=8)(x, 3, idx), out)
    # the draws look uniform: every offset of [0, 2P] and both flips appear about evenly
    flip, dy, dx = aug.draws(0, np.arange(9000))
    assert abs(flip.mean() - 0.5) < 0.03
    for d in (dy, dx):
        counts = np.bincount(d, minlength=9)
        assert counts.size == 9 and counts.min() > 850 and counts.max() < 1150
    assert sample_hash(7, 0, [5])[0] != sample_hash(7, 0, [6])[0]


def test_no_ops_is_identity_and_bad_shapes_refused():
    x = np.ones((2, 1, 3, 3), np.float32)
    assert Augment((), seed=0)(x, 0, [0, 1]) is x
    assert Augment(("crop",), pad=0)(x, 0, [0, 1]) is x
    with pytest.raises(ValueError, match="image batches"):
        Augment(("flip",))(np.ones((2, 9), np.float32), 0, [0, 1])
    with pytest.raises(ValueError):
        Augment(("rotate",))


def test_validation_rows_fixed_disjoint_nested():
    train, val = split_rows(100, 0.1)
    assert val.size == 10 and train.size == 90
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert np.all(np.diff(val) > 0) and np.all(np.diff(train) > 0)
    assert not np.array_equal(val, np.arange(90, 100))          # a permutation, not the tail
    np.testing.assert_array_equal(split_rows(100, 0.1)[1], val)  # no seed, no rank: fixed
    assert set(val) <= set(split_rows(100, 0.25)[1])            # a larger f holds out more
    assert split_rows(7, 0.01)[1].size == 1                      # ceil: at least one row
    all_rows, none = split_rows(5, 0.0)
    assert none is None and all_rows.tolist() == list(range(5))
    with pytest.raises(ConfigError, match="leaves no training row"):
        split_rows(1, 0.5)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """uint8 images (37, 2, 4, 5): pixel [0, 0, 0] is the sample id."""
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (37, 2, 4, 5), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(37)
    y = np.arange(37) % 3
    p = tmp_path_factory.mktemp("img") / "img.h5"
    return str(write_dataset(p, (x, y), (x[:9], y[:9]), class_names="abc", source="ids")), x


def _cfg(path, *extra):
    return load_config("cifar-cnn", [f"data.dataset={path!r}".replace("'", '"'),
                                     "model.input=[2, 4, 5]", "train.batch_size=8",
                                     "train.eval_batch_size=8", *extra])


def test_training_loaders_augment_train_only(images):
    from mpifc.data.pipeline import training_loaders

    path, x = images
    cfg = _cfg(path, "data.augment=crop,flip", "data.crop_pad=1", "data.validation_split=0.25")
    plain = _cfg(path, "data.validation_split=0.25")
    lds = training_loaders(cfg, path, FakeComm(), cache=False)
    ref = training_loaders(plain, path, FakeComm(), cache=False)
    try:
        assert lds.train.augment is not None
        assert lds.validation.augment is None and lds.test.augment is None
        # evaluation rows: the stored rows themselves (normalised), same as without augment
        for a, b in ((lds.validation, ref.validation), (lds.test, ref.test)):
            for ba, bb in zip(a, b):
                np.testing.assert_array_equal(ba.x, bb.x)
        vb = lds.validation.get_batch(0, 0)
        np.testing.assert_array_equal(lds.validation.rows, split_rows(37, 0.25)[1])
        assert vb.y.tolist() == (split_rows(37, 0.25)[1][:8] % 3).tolist()
        # training rows: the held-out ones never appear; batches are augmented
        seen, changed = [], False
        for ba, bb in zip(lds.train, ref.train):
            np.testing.assert_array_equal(ba.y, bb.y)                 # same rows, same order
            changed |= not np.array_equal(ba.x, bb.x)
            seen += bb.y.tolist()
        assert changed and len(seen) == 37 - 10
        rows = lds.train.sample_rows(lds.train.plan.global_indices(0, 0))
        np.testing.assert_array_equal(rows, split_rows(37, 0.25)[0][lds.train.plan.order(0)[:8]])
    finally:
        for ld in (*lds, *ref):
            ld.close()


def test_augmented_batch_is_the_augmented_stored_rows(images):
    """The loader augments the stored rows of exactly the samples it serves, then normalises."""
    from mpifc.data.loader import DistributedLoader

    path, x = images
    aug = Augment(("crop", "flip"), pad=2, seed=4)
    for P in (1, 3):
        parts = []
        for r in range(P):
            with DistributedLoader(path, FakeComm(r, P), batch_size=10, seed=4, augment=aug,
                                   normalise=False, dtype=np.uint8) as ld:
                b = ld.get_batch(2, 1)
                idx = ld.plan.local_indices(2, 1, r)
                np.testing.assert_array_equal(b.x, aug(x[idx], 2, idx))
                parts.append(b.x)
        if P == 1:
            whole = parts[0]
        else:
            np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_loader_rows_state_is_checked(images):
    from mpifc.data.loader import DistributedLoader

    path, _ = images
    a = DistributedLoader(path, FakeComm(), batch_size=4, rows=np.arange(0, 37, 2))
    b = DistributedLoader(path, FakeComm(), batch_size=4, rows=np.arange(1, 37, 2))
    try:
        assert a.n == 19 and b.n == 18
        state = a.state_dict()
        with pytest.raises(ValueError, match="another stream"):
            b.load_state_dict(state)
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="distinct indices"):
        DistributedLoader(path, FakeComm(), batch_size=4, rows=[0, 0, 1])


@pytest.mark.parametrize("item, words", [
    ("data.augment=rotate", 'data.augment must be a list of "crop", "flip"'),
    ('data.augment=["flip", "flip"]', "no repeats"),
    ("data.crop_pad=-1", "data.crop_pad must be an integer >= 0"),
    ("data.validation_split=1.0", "data.validation_split must be a number in [0, 1)"),
    ("train.keep_best=val_loss", "needs a validation set"),
    ("train.early_stop=-2", "train.early_stop must be an integer >= 0"),
])
def test_bad_values_are_one_config_line(item, words):
    with pytest.raises(ConfigError) as e:
        load_config("cifar-cnn", [item])
    assert words in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"--set {item}")


def test_augment_needs_image_input():
    with pytest.raises(ConfigError, match=r"needs image input \[C, H, W\]"):
        load_config("text-bow", ["data.augment=flip"])
    cfg = load_config("cifar-cnn", ['data.augment=["flip", "crop"]', "train.early_stop=3"])
    assert cfg["data"]["augment"] == ["flip", "crop"] and cfg["train"]["early_stop"] == 3


def test_cli_bad_augment_and_early_stop_flag(tmp_path):
    """`mpifc train` prints one line and fails; --early-stop N sets train.early_stop."""
    run = [sys.executable, "-m", "mpifc", "train", "cifar-cnn"]
    bad = subprocess.run(run + ["--set", "data.augment=crop,zoom", "--out", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "data.augment" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    ok = subprocess.run(run + ["--early-stop", "4", "--print-config"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "early_stop = 4" in ok.stdout
