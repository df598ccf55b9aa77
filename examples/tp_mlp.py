"""A tensor-parallel MLP built by hand from mpifc layers, trained with mpifc.fit.

    python examples/tp_mlp.py                          # 1 rank
    mpiexec -n 2 python examples/tp_mlp.py             # tp = 2: every layer split in two
    mpiexec -n 4 python examples/tp_mlp.py --tp 2      # dp = 2 replicas x tp = 2

It is the model of the ``digits-mlp`` preset on scikit-learn's 8x8 digits, so
``mpiexec -n 4 mpifc train digits-mlp --set parallel.tp=2`` trains exactly the same
run: same seed, same losses (tests/test_examples.py checks it to 1e-6 per step).

What runs on a tensor group of P ranks (N rows of this dp rank's batch):

    x (N, 1, 8, 8) -> flatten -> (N, 64)              whole on every tp rank
    fc1  column-parallel 64 -> 256                    W1 split on its 256 outputs -> (N, 256/P),
                                                      no message
    relu                                              on the split activation
    fc2  row-parallel 256 -> 256                      W2 split on its 256 inputs: partial sums,
                                                      allreduce -> (N, 256) whole
    relu
    fc3  column-parallel 256 -> 10                    classes split -> logits (N, 10/P)
    loss class-parallel softmax cross-entropy         allreduce of the row max and the sums;
                                                      the logits are never gathered

Backward runs the adjoints (fc1 and fc3 allreduce their input gradient; fc2 needs none),
then data parallelism allreduces the gradients over the dp replicas in buckets,
overlapped with backward. Rank 0 prints; outputs go to --out (metrics.jsonl,
checkpoints/, trace/), as for ``mpifc train``.
"""
import argparse

import numpy as np

import mpifc
from mpifc import nn, optim
from mpifc.comm import Grid, world
from mpifc.data import prepared
from mpifc.parallel import ColumnParallelLinear, ParallelSoftmaxCrossEntropy, RowParallelLinear


def build_mlp(grid, seed):
    """The MLP on ``grid``'s tensor group. Layer i starts from ``default_rng([seed, i])``,
    as layer i of a config's table does: tp rank 0 draws the full weight, scatter(v)
    hands each rank its slice, so every layout starts from the same model."""
    tp = grid.tp_comm

    def rng(i):
        return np.random.default_rng([seed, i])

    return nn.Sequential(
        nn.Flatten(),                                                # 0
        ColumnParallelLinear(64, 256, tp, rng=rng(1), name="fc1"),   # 1: output stays split
        nn.ReLU(),                                                   # 2
        RowParallelLinear(256, 256, tp, rng=rng(3), name="fc2"),     # 3: takes it split
        nn.ReLU(),                                                   # 4
        ColumnParallelLinear(256, 10, tp, rng=rng(5), name="fc3"),   # 5: class-split logits
        input_grad=False)          # the input is data: fc1 skips its input gradient


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=0, help="tensor-parallel ranks (0: all of them)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global, split over dp")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0, help="also log every N steps")
    p.add_argument("--data-dir", default="runs/data", help="where digits.h5 is (or is made)")
    p.add_argument("--out", default="runs/tp-mlp", help="run directory")
    args = p.parse_args()

    comm = world()
    grid = Grid(comm, tp=args.tp or comm.size)      # dp = ranks / tp
    path = prepared("digits", comm, dir=args.data_dir)   # rank 0 writes it once

    model = build_mlp(grid, args.seed)
    last = mpifc.fit(
        model, path,
        optimizer=optim.Adam(model.parameters(), lr=args.lr),
        loss=ParallelSoftmaxCrossEntropy(10, grid.tp_comm),      # logits stay class-split
        grid=grid, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        log_every=args.log_every, out=args.out, overwrite=True)

    # the trained weights, whole, on rank 0 (e.g. to save them with numpy)
    state = mpifc.gather_state(model)
    if comm.rank == 0:
        shapes = ", ".join(f"{k} {v.shape}" for k, v in state.items())
        print(f"test accuracy {last['test_acc']:.4f}; full tensors on rank 0: {shapes}")


if __name__ == "__main__":
    main()
