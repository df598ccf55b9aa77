"""Text batches end to end: a bag-of-words model fed by the loader learns, data parallel
equals serial, and the text-bow preset trains (skipped where the embeddingbag layer type
is missing).

The hand-built model uses mpifc.nn.EmbeddingBag directly on ``batch.x = (tokens,
offsets)``, the flat form the loader hands out.
"""
import json
import os
import sys

import numpy as np
import pytest

from joblaunch import MPIEXEC, run_job
from mpifc.data.textformat import read_text_split
from mpifc.data.textprep import prepare_synthetic_text


def bow(vocab, seed=0, dtype=np.float32):
    from mpifc import nn

    layers = [nn.EmbeddingBag(vocab, 32, mode="mean", seed=seed, dtype=dtype),
              nn.Linear(32, 32, seed=seed + 1, dtype=dtype), nn.ReLU(),
              nn.Linear(32, 4, seed=seed + 2, dtype=dtype)]
    params = [p for l in layers for p in l.parameters()]
    return layers, params


def forward(layers, x):
    h = layers[0].forward(*x)
    for l in layers[1:]:
        h = l.forward(h)
    return h


def backward(layers, d):
    for l in reversed(layers):
        d = l.backward(d)


def sum_loss_step(layers, params, x, y, scale):
    """Forward, loss summed over these rows, gradients of (sum / scale)."""
    from mpifc.nn.functional import softmax_cross_entropy_backward as ce_b
    from mpifc.nn.functional import softmax_cross_entropy_forward as ce_f

    for p in params:
        p.grad[...] = 0
    logits = forward(layers, x)
    if y.size == 0:
        return 0.0
    loss, cache = ce_f(logits, y, 0.0, -100)
    backward(layers, ce_b(cache, y.size / scale))
    return float(loss) * y.size


def test_loader_batches_train_a_bag_of_words_model(comm, tmp_path):
    from mpifc import optim
    from mpifc.data.loader import DistributedLoader

    path = prepare_synthetic_text(tmp_path / "s.h5", n_train=3000, n_test=1000, seed=1)
    tr = DistributedLoader(path, comm, batch_size=32, seed=0, cache=True)
    te = DistributedLoader(path, comm, split="test", batch_size=250, shuffle=False)
    layers, params = bow(tr.vocab_size)
    opt = optim.Adam(params, lr=0.01)
    for epoch in range(3):
        tr.set_position(epoch)
        for b in tr:
            sum_loss_step(layers, params, b.x, b.y, b.y.size)
            opt.step()
    correct = sum(int((forward(layers, b.x).argmax(1) == b.y).sum()) for b in te)
    print(f"bag-of-words test accuracy {correct / te.n:.4f}")
    assert correct / te.n >= 0.9


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("mode", ["slice", "scatter"])
def test_data_parallel_loss_equals_serial(comm, mpi_tmp_path, mode):
    """dp = P over the loader's rows: summed loss and weights equal a serial replica that
    takes each whole global batch (float64, 12 steps)."""
    from mpifc import optim
    from mpifc.data.loader import DistributedLoader

    path = str(mpi_tmp_path / "s.h5")
    if comm.rank == 0:
        prepare_synthetic_text(path, n_train=301, n_test=50, seed=2)
    comm.barrier()
    ld = DistributedLoader(path, comm, batch_size=25, seed=3, mode=mode)
    tok, off, y_all = read_text_split(path, "train")
    layers, params = bow(ld.vocab_size, dtype=np.float64)
    ref_layers, ref_params = bow(ld.vocab_size, dtype=np.float64)
    opt, ref_opt = optim.Adam(params, lr=0.01), optim.Adam(ref_params, lr=0.01)
    worst = 0.0
    for b in ld:
        if b.step == 12:
            break
        mine = sum_loss_step(layers, params, b.x, b.y, b.global_size)
        for p in params:
            comm.allreduce(p.grad, out=p.grad)
        total = float(comm.allreduce(np.array([mine]))[0])
        opt.step()
        idx = ld.plan.global_indices(b.epoch, b.step)
        lens = off[idx + 1] - off[idx]
        flat = np.concatenate([tok[off[i]:off[i + 1]] for i in idx]).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        ref = sum_loss_step(ref_layers, ref_params, (flat, starts), y_all[idx], idx.size)
        ref_opt.step()
        worst = max(worst, abs(total - ref) / idx.size)
    wdiff = max(float(np.abs(p.data - q.data).max()) for p, q in zip(params, ref_params))
    print(f"OK, maxdiff loss/sample = {worst:.2e}, weights = {wdiff:.2e}")
    verdicts = comm.allgather_obj(worst < 1e-10 and wdiff < 1e-10)
    assert all(verdicts), verdicts


# ------------------------------------------------------------------ the preset
def _has_embeddingbag() -> bool:
    from mpifc.models import LAYERS

    return "embeddingbag" in LAYERS


needs_layer = pytest.mark.skipif(
    not _has_embeddingbag(),
    reason="text-bow needs the `embeddingbag` layer type (issue 13 part 3, branch textlayers); "
           "this test runs once both are merged")
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="mpiexec not in the venv")


def _train(tmp, *sets, n=2):
    out = tmp / ("run" + "".join(s.replace("=", "").replace(".", "") for s in sets))
    p, _ = run_job([sys.executable, "-m", "mpifc", "train", "text-bow", "--set",
                    f"data.dir={tmp}/data", *[a for s in sets for a in ("--set", s)],
                    "--out", str(out)], n, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f], p.stdout


@needs_layer
@needs_mpiexec
def test_text_bow_preset_reaches_90_percent(tmp_path):
    recs, stdout = _train(tmp_path)
    acc = [r["test_acc"] for r in recs if "test_acc" in r]
    assert acc and acc[-1] >= 0.9, stdout


@needs_layer
@needs_mpiexec
def test_text_bow_tp2_equals_dp2(tmp_path):
    """Same seed: tp = 2 gives the loss per step of dp = 2 (to 1e-6)."""
    sets = ("train.epochs=1", "train.max_steps=20", "train.log_every=1", "train.dtype=float64")
    dp, _ = _train(tmp_path, *sets)
    tp, _ = _train(tmp_path, *sets, "parallel.tp=2")
    a = [r["loss"] for r in dp if "samples_per_s" not in r]       # the per-step records
    b = [r["loss"] for r in tp if "samples_per_s" not in r]
    assert a and len(a) == len(b)
    assert np.allclose(a, b, rtol=0, atol=1e-6)


def test_synthetic_text_is_a_named_dataset(comm, tmp_path):
    """data.dataset = "synthetic-text" is prepared once, like the other named sets."""
    from mpifc.data.format import read_info
    from mpifc.train import resolve_dataset

    cfg = {"data": {"dataset": "synthetic-text", "dir": str(tmp_path)},
           "model": {"input": ["tokens"]}, "seed": 7}
    path = resolve_dataset(cfg, comm)
    assert path == str(tmp_path / "synthetic-text.h5")
    info = read_info(path)
    assert info.layout == "text" and info.num_classes == 4
    assert (info.splits["train"].n, info.splits["test"].n) == (8000, 2000)


def test_trainer_refuses_text_data_that_does_not_fit_the_model():
    """A vocab smaller than the file's, or text data for an image model: one clear error."""
    from types import SimpleNamespace

    from mpifc.errors import UserError
    from mpifc.train import check_data_fits_model

    text = SimpleNamespace(text=True, vocab_size=3231, sample_shape=("tokens",))
    bow_cfg = {"input": ["tokens"], "layers": [{"type": "embeddingbag", "vocab": 3000, "dim": 8}]}
    with pytest.raises(UserError, match=r"vocabulary has 3231 ids but the embeddingbag has "
                                        r"vocab = 3000; set model.layers\[0\].vocab >= 3231"):
        check_data_fits_model(text, bow_cfg, "t.h5")
    with pytest.raises(UserError, match=r"a text dataset but model.input is \[1, 8, 8\]"):
        check_data_fits_model(text, {"input": [1, 8, 8], "layers": []}, "t.h5")
    images = SimpleNamespace(text=False, vocab_size=None, sample_shape=(1, 8, 8))
    with pytest.raises(UserError, match="a non-text dataset but model.input is"):
        check_data_fits_model(images, bow_cfg, "d.h5")
    bow_cfg["layers"][0]["vocab"] = 3231
    check_data_fits_model(text, bow_cfg, "t.h5")            # fits: no error
    check_data_fits_model(images, {"input": [1, 8, 8]}, "d.h5")
