"""Flower's bytes per message around qfl's payload, from Flower's own serialisation.

Flower (>= 1.38) moves a Message as a tree of content-addressed objects: the Message
(its metadata), a RecordDict, each record, and for an ArrayRecord one ``Array`` object
(JSON metadata) plus ``ArrayChunk`` objects (the data) per array, each with a header
naming its children by 64-hex SHA-256 id. The SuperLink's Fleet API counts, per reply a
SuperNode pushes, ``PushMessagesRequest.ByteSize()`` (metadata and object tree) plus the
length of every object pushed as inbound, and ``PushMessagesResponse.ByteSize()`` (the
ids of the objects it wants) as outbound; per message a SuperNode pulls, the
``PullMessagesRequest`` as inbound and ``PullMessagesResponse.ByteSize()`` plus every
object pulled as outbound (``superlink/servicer/fleet/fleet_handlers.py`` on flwr 1.41,
``server/superlink/fleet/message_handler/message_handler.py`` on 1.39).

This builds a train reply and a downlink message of the simulation CNN as qfl builds
them (the default qsparse uplink and downlink, a resync and a delta), serialises them
with Flower's functions, and prints Flower's bytes next to qfl's payload bytes for two
layouts of the same blobs: one Array per tensor (qfl before the container) and the one
Array of :func:`qfl.clients.records.encode_record`. Nothing runs over a network; the
counts are those of the Fleet API handlers, reproduced.

    .venv/bin/python benchmarks/flower_overhead.py
    .venv139/bin/python benchmarks/flower_overhead.py --model cnn --ratio 0.05
"""

from __future__ import annotations

import argparse

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import (  # pylint: disable=no-name-in-module
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
    PushMessagesResponse,
    Reconnect,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.task_identity import TaskIdentity

from qfl.clients.records import blob_array, encode_record, record_bytes
from qfl.codec import compress_model
from qfl.compress import IDENTITY
from qfl.protocol import REPLY_KEY, DownlinkHeader, ReplyInfo, Settings
from qfl.simulations.models import build_model
from qfl.simulations.server_app import flwr_version
from qfl.spec import Policy, parse_downlink
from qfl.strategies.presets import SPARSE_DOWNLINK, qsparse_uplink
from qfl.wire import encode

NODE = Node(node_id=2**63 - 25)
#: A replica digest and a strategy session as they travel (64-bit integers: full-length varints).
DIGEST, SESSION = 2**63 - 7, 2**61 + 7


def push_bytes(reply: Message) -> tuple[int, int]:
    """(inbound, outbound) bytes the Fleet API counts for a SuperNode pushing ``reply``."""
    objects = get_all_nested_objects(reply)
    request = PushMessagesRequest(
        node=NODE,
        messages_list=[message_to_proto(remove_content_from_message(reply))],
        message_object_trees=[get_object_tree(reply)],
        clientapp_runtime_list=[1.5],
    )
    response = PushMessagesResponse(
        reconnect=Reconnect(reconnect=5),
        results={reply.object_id: 0},
        objects_to_push=list(objects),
        session_id="0" * 64,
    )
    inbound = request.ByteSize() + sum(len(o.deflate()) for o in objects.values())
    return inbound, response.ByteSize()


def pull_bytes(msg: Message) -> tuple[int, int]:
    """(inbound, outbound) bytes the Fleet API counts for a SuperNode pulling ``msg``."""
    objects = get_all_nested_objects(msg)
    response = PullMessagesResponse(
        messages_list=[message_to_proto(remove_content_from_message(msg))],
        message_object_trees=[get_object_tree(msg)],
    )
    outbound = response.ByteSize() + sum(len(o.deflate()) for o in objects.values())
    return PullMessagesRequest(node=NODE).ByteSize(), outbound


def layouts(blobs: dict[str, bytes], payloads: dict | None = None) -> dict[str, ArrayRecord]:
    """The same blobs as one Array per tensor, and as qfl sends them (given the payloads, as
    a client's mod does: its small lossless tensors of one dtype in one group blob)."""
    return {
        "per-tensor": ArrayRecord({k: blob_array(b) for k, b in blobs.items()}),
        "qfl": encode_record(blobs if payloads is None else payloads),
    }


def downlink_message(record: ArrayRecord, settings: Settings, header: DownlinkHeader) -> Message:
    config = ConfigRecord({"lr": 0.05, "local-steps": 20, **settings.to_config(), **header.to_config()})
    msg = Message(RecordDict({"arrays": record, "config": config}), dst_node_id=NODE.node_id, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # what the ServerApp's push sets
    return msg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--ratio", type=float, default=0.01, help="top-k ratio of the qsparse uplink")
    p.add_argument("--min-elements", type=int, default=256)
    args = p.parse_args()
    # The ServerApp's identity, as in a run (64-bit ids: their varints are full length).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 2**63 - 11, 1, 2**63 - 13

    state = {k: v.detach().clone() for k, v in build_model(args.model, 42).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    delta = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    uplink = Policy.build(qsparse_uplink(args.ratio), args.min_elements)
    _, down_spec = parse_downlink(SPARSE_DOWNLINK)
    downlink = Policy.build(down_spec, args.min_elements)
    full = record_bytes(ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}))

    up_payloads = compress_model(delta, uplink, generator)[0]
    up_blobs = {k: encode(p) for k, p in up_payloads.items()}
    delta_blobs = {k: encode(p) for k, p in compress_model(delta, downlink, generator)[0].items()}
    resync_blobs = {k: encode(IDENTITY.compress(v)) for k, v in state.items()}
    settings = Settings("arrays", uplink, True, 42, 3, SESSION)

    print(
        f"flwr {flwr_version()}, model {args.model}: {len(state)} tensors, {full} B as plain Flower arrays;"
        f" uplink {qsparse_uplink(args.ratio)}, downlink {SPARSE_DOWNLINK}"
    )
    print(
        f"{'message':<18}{'layout':<12}{'arrays':>7}{'payload':>10}{'fleet in':>10}{'fleet out':>10}"
        f"{'overhead':>10}{'ratio':>8}"
    )

    def reply(record: ArrayRecord, layout: str, info: bool = True) -> Message:
        request = downlink_message(layouts(delta_blobs)[layout], settings, DownlinkHeader("delta", 3, 2, DIGEST))
        content = RecordDict({"arrays": record, "metrics": MetricRecord({"train_loss": 0.5, "num-examples": 200})})
        if info:
            content[REPLY_KEY] = ConfigRecord(ReplyInfo("update", 3_000_000, (3, DIGEST), full).to_config())
        return Message(content, reply_to=request)

    messages = (("train reply", up_blobs), ("downlink delta", delta_blobs), ("downlink resync", resync_blobs))
    for name, blobs in messages:
        for layout, record in layouts(blobs, up_payloads if name == "train reply" else None).items():
            payload = record_bytes(record)
            if name == "train reply":
                inbound, outbound = push_bytes(reply(record, layout))
                total = inbound
            else:
                header = DownlinkHeader("delta", 3, 2 if "delta" in name else -1, DIGEST)
                inbound, outbound = pull_bytes(downlink_message(record, settings, header))
                total = outbound
            print(
                f"{name:<18}{layout:<12}{len(record):>7}{payload:>10}{inbound:>10}{outbound:>10}"
                f"{total - payload:>10}{total / payload:>8.3f}"
            )
    record = layouts(up_blobs, up_payloads)["qfl"]
    fixed = push_bytes(reply(record, "qfl"))[0] - record_bytes(record)
    floor = push_bytes(reply(record, "qfl", info=False))[0] - record_bytes(record)
    print(
        f"A train reply's fixed inbound cost: {fixed} B, of which qfl's ConfigRecord (ReplyInfo) {fixed - floor} B"
        f" and Flower's own {floor} B (message metadata, object headers and ids, object tree of one ArrayRecord"
        f" and one MetricRecord); within 1.2x of the payload from {fixed / 0.2:.0f} B per reply."
    )


if __name__ == "__main__":
    main()
