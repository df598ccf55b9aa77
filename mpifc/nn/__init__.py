"""Layers that own parameters, built on the pure math of :mod:`mpifc.nn.functional`."""
from mpifc.nn import functional, init
from mpifc.nn.activation import GELU, Dropout, LeakyReLU, ReLU, Sigmoid, Tanh
from mpifc.nn.container import Sequential
from mpifc.nn.conv import Conv2d
from mpifc.nn.embedding import Embedding, EmbeddingBag
from mpifc.nn.linear import Linear
from mpifc.nn.loss import MSELoss, SoftmaxCrossEntropy
from mpifc.nn.module import Module, Parameter, ShapeError, Sharding
from mpifc.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from mpifc.nn.pool import AvgPool2d, GlobalAvgPool2d, MaxPool2d
from mpifc.nn.residual import Residual
from mpifc.nn.shape import Flatten

__all__ = [
    "functional", "init", "Module", "Parameter", "Sharding", "ShapeError",
    "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d",
    "ReLU", "LeakyReLU", "GELU", "Tanh", "Sigmoid", "Dropout", "Flatten",
    "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Embedding", "EmbeddingBag", "Sequential",
    "Residual",
    "SoftmaxCrossEntropy", "MSELoss",
]
