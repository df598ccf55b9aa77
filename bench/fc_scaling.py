"""Fully connected scaling: data-parallel MLP and tensor-parallel 4096-wide MLP, P = 1..N.

    mpiexec -n 4 python bench/fc_scaling.py [--quick] [--steps 5] [--repeats 5]

Families (every P that fits the job, run side by side, see bench/_scaling.py):
  mlp-dp     784-1024-1024-10, data parallel (dp = P), global batch 256 (128 quick):
             strong scaling, each rank computes 256 / P rows
  mlp4096-tp 1024-4096-4096-10, tensor parallel (tp = P: column, row, class-split
             column), batch 64 (32 quick) replicated over tp; at P = 4 also dp2 x tp2.
             Its p+o/(1/P) column is the issue's memory target (<= 1.05)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _scaling  # noqa: E402

args = _scaling.parse_args(__doc__)
MLP = {"input": [784], "layers": [
    {"type": "linear", "out": 1024, "shard": "column"}, {"type": "relu"},
    {"type": "linear", "out": 1024, "shard": "row"}, {"type": "relu"},
    {"type": "linear", "out": 10, "shard": "column"}]}
WIDE = {"input": [1024], "layers": [
    {"type": "linear", "out": 4096, "shard": "column"}, {"type": "relu"},
    {"type": "linear", "out": 4096, "shard": "row"}, {"type": "relu"},
    {"type": "linear", "out": 10, "shard": "column"}]}
bd, bt = (128, 32) if args.quick else (256, 64)
specs = [("mlp-dp", MLP, P, 1, bd) for P in (1, 2, 3, 4)]
specs += [("mlp4096-tp", WIDE, 1, P, bt) for P in (1, 2, 3, 4)] + [("mlp4096-tp", WIDE, 2, 2, bt)]
_scaling.run("bench/fc_scaling.py", specs, args)
