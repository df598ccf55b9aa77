"""Sharded layers, class-parallel loss and data parallelism; every message explicit and traced.

Each layer documents its row of the communication contract (shared/DESIGN.md) and
describes itself without running (``output_shape``, ``collectives``, ``flops``;
see :mod:`mpifc.parallel.describe`).
"""
from mpifc.parallel.describe import Collective, match_trace
from mpifc.parallel.linear import ColumnParallelLinear, RowParallelLinear
from mpifc.parallel.loss import ParallelSoftmaxCrossEntropy
from mpifc.parallel.conv import InChannelParallelConv2d, OutChannelParallelConv2d
from mpifc.parallel.norm import SyncBatchNorm1d, SyncBatchNorm2d
from mpifc.parallel.spatial import (SpatialGather, SpatialParallelAvgPool2d, SpatialParallelConv2d,
                                    SpatialParallelMaxPool2d)

__all__ = ["Collective", "match_trace", "ColumnParallelLinear", "RowParallelLinear",
           "ParallelSoftmaxCrossEntropy"]
__all__ += ["OutChannelParallelConv2d", "InChannelParallelConv2d", "SyncBatchNorm1d", "SyncBatchNorm2d"]
from mpifc.parallel.data import DataParallel, clip_grad_norm_grid

__all__ += ["DataParallel", "clip_grad_norm_grid"]
from mpifc.parallel.embedding import VocabParallelEmbeddingBag

__all__ += ["VocabParallelEmbeddingBag"]
__all__ += ["SpatialParallelConv2d", "SpatialParallelMaxPool2d", "SpatialParallelAvgPool2d",
            "SpatialGather"]
