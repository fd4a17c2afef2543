"""A reference PyTorch ClientApp for users who do not have one.

It is an ordinary Flower ClientApp (the quickstart-pytorch shape: read
``msg.content["arrays"]``, train, reply ``ArrayRecord(model.state_dict())`` and a
MetricRecord with ``num-examples``) that runs H local SGD steps (or epochs) per round,
with optional momentum. Compression is not its business: ``compression_mod`` is
attached by :func:`make_client_app` and does that around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from .mod import compression_mod
from .records import to_record


class ClientData(NamedTuple):
    """One client's local data: what ``data_fn`` returns to :func:`make_client_app`.

    Labels are class indices for cross-entropy: one per input, or one per position for
    a sequence model. The validation pair is what ``evaluate`` reports on.
    """

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    val_inputs: torch.Tensor
    val_labels: torch.Tensor


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains in one round.

    steps
        Local SGD steps H (mini-batches). If 0, ``epochs`` passes over the data instead.
    epochs
        Used when ``steps`` is 0.
    """

    steps: int = 10
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    @staticmethod
    def from_config(config: dict, default: LocalTraining | None = None) -> LocalTraining:
        """Read ``local-steps``, ``local-epochs``, ``batch-size``, ``lr``, ``momentum``,
        ``weight-decay`` from a run config or ConfigRecord (missing keys keep defaults)."""
        d = default or LocalTraining()
        return LocalTraining(
            steps=int(config.get("local-steps", d.steps)),
            epochs=int(config.get("local-epochs", d.epochs)),
            batch_size=int(config.get("batch-size", d.batch_size)),
            lr=float(config.get("lr", d.lr)),
            momentum=float(config.get("momentum", d.momentum)),
            weight_decay=float(config.get("weight-decay", d.weight_decay)),
        )


def train_local(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: LocalTraining, generator: torch.Generator | None = None
) -> float:
    """Run the plan's SGD steps on (x, y); returns the mean training loss.

    Batches are drawn by reshuffling each pass with ``generator``, so a client's run is
    reproducible from its seed.
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    n = x.shape[0]
    if n == 0:
        return float("nan")
    total_steps = plan.steps if plan.steps > 0 else plan.epochs * -(-n // plan.batch_size)
    losses = []
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(total_steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos : pos + plan.batch_size]
        pos += plan.batch_size
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y), per target.

    ``y`` may hold one target per sample (classification) or several (a sequence
    model's next-token targets, with logits of shape (N, classes, T)): both are averaged
    over every target.
    """
    model.eval()
    if x.shape[0] == 0:
        return float("nan"), float("nan")
    loss, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    return loss / y.numel(), correct / y.numel()


def make_client_app(
    model_fn: Callable[[Context], nn.Module],
    data_fn: Callable[[Context], ClientData],
    *,
    default: LocalTraining | None = None,
    mods: tuple = (compression_mod,),
    on_trained: Callable[[Context, float], None] | None = None,
) -> ClientApp:
    """A ClientApp training ``model_fn(context)`` on ``data_fn(context)``.

    Local training settings come from the message's ConfigRecord, then the run config,
    then ``default``. ``on_trained(context, seconds)`` runs after local training (the
    simulations use it to emulate slower devices).
    """
    app = ClientApp(mods=list(mods))

    def plan_for(msg: Message, context: Context) -> LocalTraining:
        base = LocalTraining.from_config(dict(context.run_config), default)
        return LocalTraining.from_config(dict(msg.content.get("config", {})), base)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = model_fn(context)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y, _, _ = data_fn(context)
        round_ = int(msg.content.get("config", {}).get("server-round", 0))
        seed = (
            int(context.run_config.get("seed", 0)) * 7919
            + round_ * 104729
            + int(context.node_config.get("partition-id", 0))
        )
        started = time.perf_counter()
        loss = train_local(model, x, y, plan_for(msg, context), torch.Generator().manual_seed(seed))
        if on_trained is not None:
            on_trained(context, time.perf_counter() - started)
        metrics = MetricRecord({"train_loss": loss, "num-examples": int(x.shape[0])})
        content = RecordDict({"arrays": to_record(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        model = model_fn(context)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        _, _, xv, yv = data_fn(context)
        loss, acc = evaluate(model, xv, yv)
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": int(xv.shape[0])})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app
