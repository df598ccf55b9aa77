"""Optimizers, learning-rate schedules and gradient clipping on (local shards of) parameters."""
from mpifc.optim.adam import Adam, AdamW
from mpifc.optim.clip import clip_grad_norm, grad_sq_sum
from mpifc.optim.optimizer import Optimizer
from mpifc.optim.schedule import CosineWarmup, ReduceLROnPlateau, StepLR
from mpifc.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "StepLR", "CosineWarmup", "ReduceLROnPlateau",
           "clip_grad_norm", "grad_sq_sum"]
