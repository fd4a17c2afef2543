"""The typed protocol, a hostile server's messages to compression_mod, and crafted decoder blobs."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
import torch
from conftest import tiny_data, tiny_model
from fakes import FakeGrid, contained, per_tensor
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

import qfl
from qfl.clients import LocalTraining, make_client_app
from qfl.clients.mod import FIRST_CONTACT, compression_mod
from qfl.clients.records import blob_array
from qfl.protocol import FULL, DownlinkHeader, ProtocolError, ReplyInfo, Settings
from qfl.spec import Policy
from qfl.strategies import Compressed
from qfl.wire import Limits, WireFormatError, decode, decode_all
from qfl.wire.fuzz import frame, varint

PLAN = LocalTraining(steps=2, lr=0.1)


# ------------------------------------------------------------------ fields
SETTINGS = Settings("arrays", Policy.build("topk(0.1) | qsgd(16)", 64, {"*.bias": "identity"}), True, 7, 3, 2**61)


def test_every_message_round_trips():
    assert Settings.from_config(SETTINGS.to_config()) == SETTINGS
    for header in (
        DownlinkHeader("model", 4),
        DownlinkHeader("delta", 9, 6, 123),
        DownlinkHeader("anchor", 2, FULL, 0),
    ):
        assert DownlinkHeader.from_config(header.to_config()) == header
    for info in (ReplyInfo("update", 10, (3, 2**32 - 1), 400), ReplyInfo("report", 0)):
        assert ReplyInfo.from_config(info.to_config()) == info


BAD_SETTINGS = {
    "qfl.seed": [[1, 2], True, 1.5, -1, 2**63, "7"],
    "qfl.round": [[3], False, math.inf],
    "qfl.session": [math.nan, None],
    "qfl.error-feedback": [1, "yes", [True]],
    "qfl.key": [["arrays"], 3, "x" * 5000],
    "qfl.uplink.spec": [["topk(0.1)"], "nonsense(3)", 4],
    "qfl.uplink.min-elements": [-1, 2.0, [64]],
    "qfl.uplink.override-patterns": ["*.bias", [1]],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in BAD_SETTINGS.items() for v in vs])
def test_settings_refuse_wrong_types_and_ranges(key, value):
    config = SETTINGS.to_config()
    config[key] = value
    with pytest.raises(ProtocolError):
        Settings.from_config(config)


@pytest.mark.parametrize(
    "key,value",
    [
        ("qfl.mode", "teleport"),
        ("qfl.mode", ["delta"]),
        ("qfl.version", [1]),
        ("qfl.version", math.inf),
        ("qfl.version", True),
        ("qfl.base", [1]),
        ("qfl.base", -2),
        ("qfl.base", 10),
        ("qfl.digest", 2**32),
        ("qfl.digest", -1),
        ("qfl.digest", 1.0),
    ],
)
def test_downlink_header_refuses_wrong_types_and_ranges(key, value):
    config = DownlinkHeader("delta", 9, 6, 123).to_config()
    config[key] = value
    with pytest.raises(ProtocolError):
        DownlinkHeader.from_config(config)


@pytest.mark.parametrize(
    "key,value",
    [
        ("qfl.kind", "refused"),
        ("qfl.version", [1, 2]),
        ("qfl.version", math.inf),
        ("qfl.digest", True),
        ("qfl.state-bytes", -5),
        ("qfl.full-bytes", 1e9),
        ("qfl.extra", 1),
        ("qfl.kind", None),
    ],
)
def test_reply_info_refuses_wrong_types_ranges_and_extra_fields(key, value):
    config = ReplyInfo("update", 10, (3, 5), 400).to_config()
    config[key] = value
    with pytest.raises(ProtocolError):
        ReplyInfo.from_config(config)


def test_no_qfl_key_is_spelled_outside_the_protocol_module():
    """Every "qfl.<field>" the peers exchange is written and read in qfl/protocol.py only."""
    import pathlib
    import re

    root = pathlib.Path(qfl.__file__).parent
    fields = set(re.findall(r'"(qfl\.[a-z-]+(?:\.[a-z-]+)?)"', (root / "protocol.py").read_text()))
    assert {"qfl.mode", "qfl.version", "qfl.seed", "qfl.kind"} <= fields
    for path in root.rglob("*.py"):
        if path.name == "protocol.py":
            continue
        text = path.read_text()
        for key in fields:
            assert f'"{key}"' not in text, f"{path.relative_to(root)} spells {key}"


# ------------------------------------------------------------------ hostile server
def fedavg() -> FedAvg:
    return FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)


def client():
    return make_client_app(tiny_model, tiny_data, default=PLAN, mods=(compression_mod,))


def downlink_message(grid: FakeGrid, strategy: Compressed, arrays: ArrayRecord, server_round: int = 1) -> Message:
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    return Message(content=RecordDict(dict(msgs[0].content.items())), metadata=msgs[0].metadata)


def state_snapshot(context: Context) -> dict:
    out = {}
    for key, record in context.state.items():
        if isinstance(record, ArrayRecord):
            out[key] = {k: bytes(a.data) for k, a in record.items()}
        else:
            out[key] = dict(record)
    return out


def tampered(msg: Message, **fields) -> Message:
    content = RecordDict(dict(msg.content.items()))
    config = ConfigRecord(dict(content["config"]))
    config.update(fields)
    content["config"] = config
    return Message(content=content, metadata=msg.metadata)


@pytest.mark.parametrize(
    "fields",
    [
        {"qfl.base": [1]},
        {"qfl.seed": [1, 2]},
        {"qfl.version": math.inf},
        {"qfl.mode": "zip"},
        {"qfl.key": "elsewhere"},
        {"qfl.uplink.spec": ["x"]},
        {"qfl.digest": 12345},
        {"qfl.session": True},
        {"clipping_norm": math.nan},
        {"clipping_norm": "2"},
    ],
)
def test_malformed_settings_get_an_error_reply_and_leave_the_state_untouched(fields):
    grid = FakeGrid(client(), 1)
    strategy = Compressed(fedavg(), uplink="topk(0.2)", downlink="delta | qsgd(64)")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny_model().state_dict()), num_rounds=2)
    context = grid.contexts[grid.node_ids[0]]
    before = state_snapshot(context)
    assert "qfl.replica" in before and "qfl.memory" in before
    msg = tampered(downlink_message(grid, strategy, ArrayRecord(tiny_model().state_dict()), 3), **fields)
    reply = grid.app(msg, context)
    assert reply.has_error() and "qfl could not rebuild the model" in reply.error.reason
    assert state_snapshot(context) == before


def test_wrong_shape_payload_gets_an_error_reply():
    grid = FakeGrid(client(), 1)
    strategy = Compressed(fedavg(), downlink="delta | qsgd(64)")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny_model().state_dict()), num_rounds=1)
    context = grid.contexts[grid.node_ids[0]]
    before = state_snapshot(context)
    msg = downlink_message(grid, strategy, result.arrays, 2)  # one step to apply to the replica
    content = RecordDict(dict(msg.content.items()))
    arrays = per_tensor(content["arrays"])
    name = next(iter(arrays))
    arrays[name] = blob_array(qfl.wire.encode(qfl.parse("qsgd(64)").compress(torch.randn(7, 3))))
    content["arrays"] = contained(arrays)
    reply = grid.app(Message(content=content, metadata=msg.metadata), context)
    assert reply.has_error() and "shape" in reply.error.reason
    assert state_snapshot(context) == before


CONTAINER_RECORDS = {
    # an older qfl: one Array per tensor
    "per-tensor arrays": (
        lambda arrays: per_tensor(arrays),
        "one Array, 'qfl' .* one Array per tensor as older qfl versions sent",
    ),
    "not qfl's stype": (lambda arrays: ArrayRecord({"qfl": Array(np.zeros(3, np.float32))}), "has stype"),
    "a tensor twice": (
        lambda arrays: ArrayRecord({"qfl": blob_array(twice(bytes(arrays["qfl"].data)))}),
        "appears twice in the container",
    ),
    "missing tensor": (
        lambda arrays: contained(ArrayRecord(dict(list(per_tensor(arrays).items())[1:]))),
        r"missing \['0.weight'\]",
    ),
}


def twice(data: bytes) -> bytes:
    """A container whose first tensor appears again at its end (its count raised by one)."""
    first = wire_entries(data)[0]
    return data[:3] + bytes([data[3] + 1]) + data[4:] + first


def wire_entries(data: bytes) -> list[bytes]:
    """The raw entries (name and data with their lengths) of a container with fewer than 128 tensors."""
    views, out, pos = qfl.wire.unpack(data), [], 4
    for name, view in views.items():
        size = len(varint(len(name.encode()))) + len(name.encode()) + len(varint(len(view))) + len(view)
        out.append(data[pos : pos + size])
        pos += size
    return out


@pytest.mark.parametrize("name", list(CONTAINER_RECORDS))
def test_a_downlink_record_that_is_not_one_valid_container_gets_an_error_reply(name):
    grid = FakeGrid(client(), 1)
    strategy = Compressed(fedavg(), downlink="delta | qsgd(64)")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny_model().state_dict()), num_rounds=1)
    context = grid.contexts[grid.node_ids[0]]
    before = state_snapshot(context)
    msg = downlink_message(grid, strategy, result.arrays, 2)
    make, reason = CONTAINER_RECORDS[name]
    content = RecordDict(dict(msg.content.items()))
    content["arrays"] = make(content["arrays"])
    reply = grid.app(Message(content=content, metadata=msg.metadata), context)
    assert reply.has_error() and "could not rebuild the model" in reply.error.reason
    assert re.search(reason, reply.error.reason), reply.error.reason
    assert state_snapshot(context) == before


def topk_blob(n: int, k: int, stream_bytes: int) -> bytes:
    """A top-k(k) blob declaring ``n`` elements with a Rice index stream of ``stream_bytes``
    zero bytes: a small blob that asks for a large allocation."""
    head = bytes([1, 7, 2, 0, 1]) + varint(k << 1) + bytes([1, 1]) + varint(n) + varint(k)
    return frame(head + bytes([1, 0]) + varint(8 * stream_bytes) + bytes(stream_bytes))


def test_a_16kb_downlink_declaring_2_28_elements_is_refused_without_allocating():
    grid = FakeGrid(client(), 1)
    strategy = Compressed(fedavg(), downlink="model | grid(8)")
    msg = downlink_message(grid, strategy, ArrayRecord(tiny_model().state_dict()))
    content = RecordDict(dict(msg.content.items()))
    names = list(per_tensor(content["arrays"]))
    hostile = topk_blob(1 << 28, 1 << 20, (16 << 10) // len(names))
    content["arrays"] = contained(ArrayRecord({k: blob_array(hostile) for k in names}))
    assert sum(len(a.data) for a in content["arrays"].values()) <= 17 << 10
    process = psutil.Process()
    before = process.memory_info().rss
    reply = grid.app(Message(content=content, metadata=msg.metadata), grid.contexts[grid.node_ids[0]])
    assert reply.has_error() and "max_expansion" in reply.error.reason
    assert process.memory_info().rss - before < 256 << 20


def test_a_client_holding_a_replica_bounds_steps_by_its_shapes():
    grid = FakeGrid(client(), 1)
    strategy = Compressed(fedavg(), downlink="delta | topk(0.1)")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(tiny_model().state_dict()), num_rounds=1)
    msg = downlink_message(grid, strategy, ArrayRecord(tiny_model().state_dict()), 2)
    assert msg.content["config"]["qfl.base"] != FULL
    content = RecordDict(dict(msg.content.items()))
    arrays = per_tensor(content["arrays"])
    name = next(iter(arrays))
    arrays[name] = blob_array(topk_blob(1 << 20, 1, 64))  # a step far larger than the replica's tensor
    content["arrays"] = contained(arrays)
    reply = grid.app(Message(content=content, metadata=msg.metadata), grid.contexts[grid.node_ids[0]])
    assert reply.has_error() and "exceeds the allowed maximum 1280" in reply.error.reason  # 0.weight: 64 x 20


def test_first_contact_limits_let_real_models_through():
    model = {"w": torch.randn(300, 200), "b": torch.randn(200)}
    for spec in ("identity", "grid(8)", "qsgd(16)", "sign"):
        blob = qfl.wire.encode(qfl.parse(spec).compress(model["w"], torch.Generator().manual_seed(0)))
        assert decode_all(blob, FIRST_CONTACT)[0].shape == (300, 200)


# ------------------------------------------------------------------ decoder
def test_expansion_is_bounded():
    blob = topk_blob(1 << 26, 1, 8)  # ~30 bytes declaring 64M elements
    with pytest.raises(WireFormatError, match="max_expansion"):
        decode(blob)
    with pytest.raises(WireFormatError, match="truncated|corrupt"):  # without the bound: the stream is checked
        decode(blob, Limits(max_expansion=None))


def test_limits_refuse_nonsense():
    for bad in ({"max_elements": -1}, {"max_expansion": 1.5}, {"max_ndim": True}):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_crafted_blobs_raise_wire_errors_under_an_address_space_limit():
    """A 41-byte blob declaring 2^28 Rice-coded positions, decoded with an address-space
    limit 512 MB above what the process uses: a WireFormatError, never a MemoryError."""
    blob = topk_blob(1 << 28, 1 << 28, 4)
    assert len(blob) <= 44  # wire v2: a 64-bit checksum
    script = textwrap.dedent(f"""
        import resource, sys
        import psutil
        from qfl.wire import Limits, WireFormatError, decode
        blob = {blob!r}
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
        for limits in (Limits(), Limits(max_expansion=None)):
            try:
                decode(blob, limits)
            except WireFormatError as exc:
                print("wire:", exc)
            else:
                sys.exit("decoded a hostile blob")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("wire:") == 2, out.stdout


def test_the_first_contact_bound_is_configurable():
    from qfl.clients import make_compression_mod

    tight = make_compression_mod(first_contact=Limits(max_elements=100))
    grid = FakeGrid(make_client_app(tiny_model, tiny_data, default=PLAN, mods=(tight,)), 1)
    msg = downlink_message(grid, Compressed(fedavg()), ArrayRecord(tiny_model().state_dict()))
    reply = grid.app(msg, grid.contexts[grid.node_ids[0]])
    assert reply.has_error() and "max_elements=100" in reply.error.reason
    grid = FakeGrid(client(), 1)
    assert not grid.app(
        downlink_message(grid, Compressed(fedavg()), ArrayRecord(tiny_model().state_dict())),
        grid.contexts[grid.node_ids[0]],
    ).has_error()
