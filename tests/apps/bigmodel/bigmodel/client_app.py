"""A user's ClientApp: builds the model, trains it locally, replies the trained model.

The only qfl line is ``compression_mod`` among the mods; ``outer_clock`` and
``inner_clock`` are the benchmark's instruments (:mod:`bigmodel.measure`), not qfl's.
"""

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from qfl.clients import compression_mod

from .measure import inner_clock, outer_clock
from .models import build, train_steps

app = ClientApp(mods=[outer_clock, compression_mod, inner_clock])


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    name, steps, batch = str(cfg["model"]), int(cfg["local-steps"]), int(cfg["batch-size"])
    model = build(name, bool(cfg["tiny"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    # Data differ per client and round, and are the same in the plain and the qfl run.
    seed = int(cfg["seed"]) * 1_000_003 + int(context.node_config["partition-id"]) * 1009
    seed += int(msg.content["config"]["server-round"])
    start = time.perf_counter()
    loss = train_steps(name, model, steps, batch, int(cfg["seq"]), seed, float(msg.content["config"]["lr"]))
    train_s = time.perf_counter() - start
    metrics = MetricRecord({"train_loss": loss, "train-s": train_s, "num-examples": steps * batch})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)
