"""qfl's reference PyTorch ClientApp (H local SGD steps) with compression_mod attached.

The mod passes messages without qfl settings through untouched, so the same ClientApp
serves the plain-Flower runs (``wrap = false``) and the compressed ones.
"""

from qfl.clients import LocalTraining, make_client_app

from .task import tiny_data, tiny_model

app = make_client_app(tiny_model, tiny_data, default=LocalTraining(steps=5, lr=0.1))
