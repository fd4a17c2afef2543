"""Client side: the compression mod, and a reference PyTorch ClientApp."""

from .mod import compression_mod
from .torch_app import LocalTraining, evaluate, make_client_app, train_local

__all__ = ["LocalTraining", "compression_mod", "evaluate", "make_client_app", "train_local"]
