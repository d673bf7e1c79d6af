"""The network: our own GRU cell, stacked into a GRU, wrapped as a forecaster; checkpoints and training."""

from model.cell import GRUCell
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.forecaster import Forecaster, ForecasterConfig
from model.gru import GRU

__all__ = [
    "GRU",
    "CheckpointError",
    "Forecaster",
    "ForecasterConfig",
    "GRUCell",
    "load_checkpoint",
    "save_checkpoint",
]
