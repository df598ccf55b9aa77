"""Convolution scaling: the source articles' classifier on 3x32x32 images, P = 1..N.

    mpiexec -n 4 python bench/conv_scaling.py [--quick] [--steps 5] [--repeats 5]

Model (mpifc/presets/cifar-cnn.toml): conv32-BN-ReLU-maxpool, conv64-BN-ReLU-maxpool,
flatten, dense64, dense10. Families (side by side, see bench/_scaling.py):
  cnn-dp   data parallel (dp = P), global batch 64 (32 quick), SyncBatchNorm over dp
  cnn-tp   tensor parallel (tp = P): output-channel conv, input-channel conv (no
           gather between them), column then row dense; batch replicated over tp;
           at P = 4 also dp2 x tp2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _scaling  # noqa: E402
from mpifc.config import load_config  # noqa: E402

args = _scaling.parse_args(__doc__)
CNN = load_config("cifar-cnn")["model"]
b = 32 if args.quick else 64
specs = [("cnn-dp", CNN, P, 1, b) for P in (1, 2, 3, 4)]
specs += [("cnn-tp", CNN, 1, P, b) for P in (2, 3, 4)] + [("cnn-tp", CNN, 2, 2, b)]
_scaling.run("bench/conv_scaling.py", specs, args)
