"""The models of the scale benchmarks and their synthetic training (unaware of qfl).

They live in the app, not in ``benchmarks/``, because ``flwr run`` ships only the app's
directory to the simulation engine; ``benchmarks/scale.py`` imports them from here so
that the codec-level and the end-to-end benchmarks measure the same models.

* ``resnet18``: ResNet-18 (BasicBlock, 10 classes, 32x32 inputs), 11.2M parameters;
* ``gpt2``: GPT-2 small's shapes (vocab 50257, 12 layers, width 768, 1024 positions,
  tied head), 124M parameters;
* ``mlp``: a two-layer perceptron (256-128-10, 34k parameters) for runs with many clients.

A model is named by its family, optionally with sizes, in Python's call syntax
(:func:`parse_model`): ``gpt2(layers=24, width=1024, heads=16)`` is GPT-2 medium's
shape, ``resnet18(width=128)`` a ResNet-18 four times the parameters; so the benchmarks
run at sizes beyond the two they were written for without a change of code.

``tiny=True`` shrinks every width (for smoke tests; sizes in the name still apply); the data are random images, tokens
or vectors drawn from a seeded generator, so that a step costs what it costs on real data.
"""

from __future__ import annotations

import ast

import torch
from torch import nn

MODELS = ("resnet18", "gpt2", "mlp")
#: The sizes each family takes (keyword arguments of its constructor below).
SIZES = {
    "resnet18": ("classes", "width"),
    "gpt2": ("vocab", "width", "layers", "heads", "positions"),
    "mlp": ("inputs", "hidden", "classes"),
}
#: The sizes of ``tiny=True``.
TINY = {
    "resnet18": {"width": 8},
    "gpt2": {"vocab": 512, "width": 32, "layers": 2, "heads": 2, "positions": 128},
    "mlp": {"inputs": 64, "hidden": 32},
}


def parse_model(name: str) -> tuple[str, dict[str, int]]:
    """``"gpt2(layers=24, width=1024)"`` -> ``("gpt2", {"layers": 24, "width": 1024})``;
    a bare family name has no sizes. Parsed by Python's own parser (``ast``): a family of
    :data:`MODELS` and positive integer sizes it takes, else ValueError naming what is allowed."""
    try:
        node = ast.parse(name.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if isinstance(node, ast.Name):
        family, keywords, args = node.id, [], []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        family, keywords, args = node.func.id, node.keywords, node.args
    else:
        raise ValueError(f"model {name!r}: expected a family name or family(size=int, ...), e.g. gpt2(layers=6)")
    if family not in MODELS:
        raise ValueError(f"unknown model {family!r}; known: {', '.join(MODELS)}")
    if args:
        raise ValueError(f"model {name!r}: sizes are keywords, one of {', '.join(SIZES[family])}")
    sizes: dict[str, int] = {}
    for kw in keywords:
        value = kw.value.value if isinstance(kw.value, ast.Constant) else None
        if kw.arg not in SIZES[family] or kw.arg in sizes:
            raise ValueError(f"model {name!r}: {family} takes each of {', '.join(SIZES[family])} at most once")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {name!r}: {kw.arg} must be a positive integer")
        sizes[kw.arg] = value
    return family, sizes


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


def split_models(text: str) -> list[str]:
    """A comma-separated list of model names (commas inside a name's parentheses stay),
    each checked by :func:`parse_model`."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            if text[start:i].strip():
                names.append(text[start:i].strip())
            start = i + 1
    for name in names:
        parse_model(name)
    return names


def build(name: str, tiny: bool = False) -> nn.Module:
    """The model ``name`` (:func:`parse_model`), full size or shrunk for smoke tests."""
    family, sizes = parse_model(name)
    sizes = {**TINY[family], **sizes} if tiny else sizes
    if family == "resnet18":
        return resnet18(**sizes)
    if family == "gpt2":
        if sizes.get("width", 768) % sizes.get("heads", 12):
            raise ValueError(f"model {name!r}: width must be a multiple of heads")
        return GPT2Shaped(**sizes)
    return mlp(**sizes)


def train_steps(name: str, model: nn.Module, steps: int, batch: int, seq: int, seed: int, lr: float = 0.01) -> float:
    """``steps`` SGD steps (momentum 0.9) on synthetic data; the mean loss.

    ResNet-18: ``batch`` random 32x32 images; GPT-2 shape: ``batch`` x ``seq`` random
    tokens, next-token loss; MLP: ``batch`` random vectors. Labels are random too: the
    point is a real gradient through every layer, not learning.
    """
    name = parse_model(name)[0]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    total = 0.0
    for _ in range(steps):
        opt.zero_grad()
        if name == "resnet18":
            x = torch.randn(batch, 3, 32, 32, generator=g)
            classes = model[-1].out_features
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, classes, (batch,), generator=g))
        elif name == "gpt2":
            if seq > model.pos.num_embeddings:
                raise ValueError(f"{seq} tokens per step exceed the model's {model.pos.num_embeddings} positions")
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
        total += float(loss.detach())
    return total / max(steps, 1)
