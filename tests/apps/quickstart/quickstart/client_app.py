"""quickstart-pytorch's ClientApp; the only qfl line is ``mods=[compression_mod]``."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from qfl.clients import compression_mod

from .task import Net, load_data
from .task import test as test_fn
from .task import train as train_fn

app = ClientApp(mods=[compression_mod])


def _data(context: Context):
    cfg = context.run_config
    return load_data(
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        int(cfg["batch-size"]),
        int(cfg["max-samples"]),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = _data(context)
    loss = train_fn(model, trainloader, int(context.run_config["local-epochs"]), float(msg.content["config"]["lr"]))
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(trainloader.dataset)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testloader = _data(context)
    loss, acc = test_fn(model, testloader)
    content = RecordDict(
        {"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(testloader.dataset)})}
    )
    return Message(content=content, reply_to=msg)
