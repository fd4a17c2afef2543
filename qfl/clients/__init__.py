"""Client side: the compression mod, and a reference PyTorch ClientApp."""

from .mod import FIRST_CONTACT, compression_mod, make_compression_mod
from .torch_app import ClientData, LocalTraining, evaluate, make_client_app, train_local

__all__ = [
    "ClientData",
    "FIRST_CONTACT",
    "LocalTraining",
    "compression_mod",
    "evaluate",
    "make_client_app",
    "make_compression_mod",
    "train_local",
]
