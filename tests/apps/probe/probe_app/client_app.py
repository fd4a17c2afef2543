"""ClientApp of the probe app: deterministic numpy 'training'.

Each client adds ``partition-id + 1`` to every coordinate of the received
vector and reports ``num-examples = partition-id + 1``, so the FedAvg result
is predictable and the test can check that every SuperNode took part.
"""

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", 1))
    return pid, num


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the received vector shifted by ``partition-id + 1``."""
    pid, num = _partition(context)
    delay = float(context.run_config.get("train-delay", 0.0))
    if delay > 0:
        time.sleep(delay)
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    updated = [a + np.float32(pid + 1) for a in arrays]
    metrics = MetricRecord(
        {
            "num-examples": pid + 1,
            "partition-id": pid,
            "num-partitions": num,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(updated), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report the mean of the received vector as 'loss'."""
    pid, _ = _partition(context)
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    loss = float(np.mean(arrays[0]))
    metrics = MetricRecord({"num-examples": pid + 1, "loss": loss})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
