"""Models for the simulations: Fashion-MNIST classifiers and a Shakespeare character model.

The CNN is deliberately small (~222k parameters): large enough that update
compression matters (a float32 update is ~0.9 MB per client per round) yet
fast enough to train many simulated clients on two CPU cores. It has one
BatchNorm layer on purpose, so that state dicts contain non-float entries
(the int64 ``num_batches_tracked`` buffer) and running statistics, which the
compression and aggregation code must handle correctly.

The tiny models (logistic regression, a one-hidden-layer MLP) exist for tests
that need a real model but not real accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CharLSTM", "FashionCNN", "MLP", "LogisticRegression", "MODELS", "build_model", "count_parameters"]

IMAGE_SIZE = 28
NUM_CLASSES = 10


class FashionCNN(nn.Module):
    """conv5x5(1->16)+BN+ReLU+pool, conv5x5(16->32)+ReLU+pool, fc(512->400), fc(400->10).

    Parameters
    ----------
    hidden : int
        Width of the fully connected hidden layer, which holds most of the
        parameters (and hence most of the communication volume) while adding
        little compute compared with the convolutions.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, hidden: int = 400, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5)  # 28 -> 24
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)  # 12 -> 8
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))  # (N, 16, 12, 12)
        x = self.pool(torch.relu(self.conv2(x)))  # (N, 32, 4, 4)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class MLP(nn.Module):
    """One hidden layer on flattened pixels (~25k parameters): a fast stand-in.

    Parameters
    ----------
    hidden : int
        Hidden width.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, hidden: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (7,850 parameters): the cheapest real model.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc = nn.Linear(IMAGE_SIZE * IMAGE_SIZE, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class CharLSTM(nn.Module):
    """Embedding, one LSTM layer, and a linear read-out at every position (~89k parameters).

    LEAF's Shakespeare model stacks two 256-unit LSTMs (~0.8M parameters), which
    trains at ~140 sequences/s on one CPU core; one 128-unit layer trains ~12x faster
    and still learns the plays' spelling and rhythm. The output has shape
    (batch, vocabulary, sequence): the layout ``cross_entropy`` expects for one target
    per position.

    Parameters
    ----------
    vocab_size : int
        Number of tokens (characters).
    embed : int
        Width of the character embedding.
    hidden : int
        LSTM units.
    """

    def __init__(self, vocab_size: int = 96, embed: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))  # (N, T, hidden)
        return self.out(h).transpose(1, 2)  # (N, vocab, T)


#: Model name -> constructor; the names are what run configs use.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": FashionCNN,
    "mlp": MLP,
    "logreg": LogisticRegression,
    "char-lstm": CharLSTM,
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """Build a model with a deterministic initialisation.

    Every client and the server must start from bit-identical weights for a
    given seed, without disturbing the caller's global RNG (which drives
    data shuffling); so initialisation runs under a forked, seeded CPU RNG.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS` (case-insensitive).
    seed : int
        Initialisation seed.

    Returns
    -------
    torch.nn.Module
        The model in training mode, float32, on CPU.

    Raises
    ------
    ValueError
        If ``name`` is unknown; the message lists the known names.
    """
    key = name.lower().strip() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = MODELS[key]()
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as BN statistics excluded).

    Parameters
    ----------
    model : torch.nn.Module
        Model to inspect.

    Returns
    -------
    int
        Total number of elements of parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
