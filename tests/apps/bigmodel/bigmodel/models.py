"""The models of the scale benchmarks and their synthetic training (unaware of qfl).

They live in the app, not in ``benchmarks/``, because ``flwr run`` ships only the app's
directory to the simulation engine; ``benchmarks/scale.py`` imports them from here so
that the codec-level and the end-to-end benchmarks measure the same models.

* ``resnet18``: ResNet-18 (BasicBlock, 10 classes, 32x32 inputs), 11.2M parameters;
* ``gpt2``: GPT-2 small's shapes (vocab 50257, 12 layers, width 768, 1024 positions,
  tied head), 124M parameters;
* ``mlp``: a two-layer perceptron (256-128-10, 34k parameters) for runs with many clients.

``tiny=True`` shrinks every width (for smoke tests); the data are random images, tokens
or vectors drawn from a seeded generator, so that a step costs what it costs on real data.
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("resnet18", "gpt2", "mlp")


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def resnet18(classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18 (He et al. 2016): four stages of two BasicBlocks, ``width``-8x``width`` channels."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for scale, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        layers += [_Block(c, scale * width, stride), _Block(scale * width, scale * width, 1)]
        c = scale * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


class GPT2Shaped(nn.Module):
    """GPT-2 small's shapes (Radford et al. 2019): pre-norm decoder blocks, tied head."""

    def __init__(self, vocab: int = 50257, width: int = 768, layers: int = 12, heads: int = 12, positions: int = 1024):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(positions, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids):
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t))
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.norm(self.blocks(h, mask=mask, is_causal=True))
        return h @ self.tok.weight.T


def mlp(inputs: int = 256, hidden: int = 128, classes: int = 10) -> nn.Module:
    """A two-layer perceptron: the small model of runs whose cost is the number of clients."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def build(name: str, tiny: bool = False) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`), full size or shrunk for smoke tests."""
    if name == "resnet18":
        return resnet18(width=8 if tiny else 64)
    if name == "gpt2":
        return GPT2Shaped(vocab=512, width=32, layers=2, heads=2, positions=128) if tiny else GPT2Shaped()
    if name == "mlp":
        return mlp(inputs=64, hidden=32) if tiny else mlp()
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def train_steps(name: str, model: nn.Module, steps: int, batch: int, seq: int, seed: int, lr: float = 0.01) -> float:
    """``steps`` SGD steps (momentum 0.9) on synthetic data; the mean loss.

    ResNet-18: ``batch`` random 32x32 images; GPT-2 shape: ``batch`` x ``seq`` random
    tokens, next-token loss; MLP: ``batch`` random vectors. Labels are random too: the
    point is a real gradient through every layer, not learning.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    total = 0.0
    for _ in range(steps):
        opt.zero_grad()
        if name == "resnet18":
            x = torch.randn(batch, 3, 32, 32, generator=g)
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (batch,), generator=g))
        elif name == "gpt2":
            ids = torch.randint(0, model.tok.num_embeddings, (batch, seq + 1), generator=g)
            logits = model(ids[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        else:
            x = torch.randn(batch, model[0].in_features, generator=g)
            loss = nn.functional.cross_entropy(
                model(x), torch.randint(0, model[-1].out_features, (batch,), generator=g)
            )
        loss.backward()
        opt.step()
        total += float(loss)
    return total / max(steps, 1)
