"""Flower records <-> tensors without needless copies: what a large model's client and the
server's new model cost in memory and time (benchmarks/SCALE.md, issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import FakeGrid, wire_copy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from qfl.clients import compression_mod
from qfl.clients.records import (
    array_record,
    blob_array,
    consume_to_record,
    numpy_array,
    to_record,
    to_tensors,
    to_views,
)
from qfl.clients.state import held_memory, load_replica
from qfl.strategies import Compressed

ARRAYS = {
    "f32": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
    "f64": np.random.default_rng(1).standard_normal(7),
    "f16": np.arange(6, dtype=np.float16).reshape(2, 3),
    "i64": np.array(12, dtype=np.int64),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "big-endian": np.arange(4, dtype=">i4"),
}


def _inside(t: torch.Tensor, data: bytes) -> bool:
    start = np.frombuffer(data, dtype=np.uint8).ctypes.data
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + len(data)


@pytest.mark.parametrize("name", list(ARRAYS))
def test_numpy_array_writes_the_bytes_flower_writes(name):
    a = ARRAYS[name]
    for _ in range(2):  # the header written, then the one kept for this dtype and shape
        ours, flowers = numpy_array(a), Array(a)
        assert (ours.data, ours.dtype, ours.shape, ours.stype) == (
            flowers.data,
            flowers.dtype,
            flowers.shape,
            flowers.stype,
        )
        assert np.array_equal(ours.numpy(), a) and ours.numpy().dtype == a.dtype


def test_a_record_of_arrays_holds_them_and_serialises_as_flowers_own():
    """``array_record`` skips Flower's copy of each Array; the record is the same object
    tree on the wire (equal content-derived ids) and keeps Flower's checks of keys and values."""
    arrays = {k: numpy_array(a) for k, a in ARRAYS.items()}
    ours = array_record(arrays)
    assert all(ours[k] is arrays[k] for k in arrays) and list(ours) == list(arrays)
    assert ours.object_id == ArrayRecord(arrays).object_id
    assert wire_copy(RecordDict({"m": ours}))["m"].object_id == ours.object_id
    with pytest.raises(TypeError):
        array_record({"w": np.zeros(3)})


def test_numpy_array_stores_a_fortran_array_c_ordered_and_refuses_objects():
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T
    assert np.array_equal(numpy_array(a).numpy(), a)
    with pytest.raises(ValueError, match="object"):
        numpy_array(np.array([{}, 1], dtype=object))


@pytest.mark.parametrize("name", list(ARRAYS))
def test_views_read_the_values_without_a_copy(name):
    a = ARRAYS[name]
    record = ArrayRecord({name: Array(a)})
    view = to_views(record)[name]
    assert torch.equal(view, torch.from_numpy(a.astype(a.dtype.newbyteorder("="))))
    if a.dtype.isnative:
        copy = to_tensors(record)[name]
        assert view.dtype == copy.dtype and torch.equal(view, copy)
        assert not view.numel() or (_inside(view, record[name].data) and not _inside(copy, record[name].data))


def test_views_of_a_fortran_array_keep_its_values():
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T  # np.save writes it column-major
    assert torch.equal(to_views(ArrayRecord({"w": Array(a)}))["w"], torch.from_numpy(a.copy()))


def test_views_of_a_header_seen_before_read_their_own_bytes():
    # The second read of each header comes from the parsed-header cache: the same dtype,
    # shape and order, the values of the Array at hand, and data shorter than the header
    # declares still refused.
    from qfl.clients import records

    records._seen_header.cache_clear()
    arrays = {**ARRAYS, "fortran": np.arange(12, dtype=np.float32).reshape(3, 4).T}
    for name, a in arrays.items():
        first = to_views(ArrayRecord({name: Array(a)}))[name]
        other = np.asarray(a[::-1] if a.ndim else a).copy(order="K")
        again = to_views(ArrayRecord({name: Array(other)}))[name]
        assert again.dtype == first.dtype and again.shape == first.shape
        assert torch.equal(again, torch.from_numpy(other.astype(other.dtype.newbyteorder("="))))
    assert records._seen_header.cache_info().currsize
    data = Array(np.ones(4, np.float32)).data
    to_views(ArrayRecord({"w": Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data)}))
    with pytest.raises(ValueError, match="w"):
        to_views(ArrayRecord({"w": Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=data[:-4])}))


@pytest.mark.parametrize(
    "array, match",
    [
        (Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=Array(np.ones(4, np.float32)).data[:-4]), "w"),
        (Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"not an npy file"), "w"),
        (blob_array(b"\x00" * 8), "compressed qfl payload"),
    ],
)
def test_views_refuse_what_is_not_a_whole_numpy_array_naming_the_key(array, match):
    with pytest.raises(ValueError, match=match):
        to_views(ArrayRecord({"w": array}))


def test_consume_to_record_empties_the_dict_and_keeps_the_values():
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    expected = {k: t.clone() for k, t in tensors.items()}
    record = consume_to_record(tensors)
    assert tensors == {}
    assert all(torch.equal(to_tensors(record)[k], t) for k, t in expected.items())
    assert to_record(expected)["a"].data == record["a"].data


def test_the_client_holds_the_model_it_trains_on_once():
    """The replica in ``context.state`` shares its bytes with the record the user trained on:
    a large model's client held three copies of it before (benchmarks/SCALE.md)."""
    seen: dict[str, ArrayRecord] = {}
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context):
        seen["arrays"] = msg.content["arrays"]
        out = {k: Array(a.numpy() + 0.01) for k, a in msg.content["arrays"].items()}
        return Message(
            RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg
        )

    model = ArrayRecord({"w": Array(np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32))})
    strategy = Compressed(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1),
        uplink="topk(0.1) | qsgd(levels=7, norm=max, bucket=128)",
        downlink="delta | topk(0.2) | qsgd(levels=15, norm=max, bucket=128)",
    )
    grid = FakeGrid(app, 1)
    state = grid.contexts[grid.node_ids[0]].state
    for rnd in (1, 2, 3):
        new, _ = strategy.aggregate_train(
            rnd, grid.send_and_receive(strategy.configure_train(rnd, model, ConfigRecord(), grid))
        )
        model = new or model
        replica, _ = load_replica(state)
        assert _inside(replica["w"], seen["arrays"]["w"].data)
        assert held_memory(state) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_names_the_first_tensor_with_nan_or_inf_whatever_its_dtype(dtype):
    from qfl.codec import nonfinite

    big = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype)
    assert nonfinite({"ok": torch.randn(4, dtype=dtype), "big": big, "ints": torch.arange(3)}) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(5, dtype=dtype)
        t[3] = bad
        assert nonfinite({"ok": torch.randn(4, dtype=dtype), "bad": t, "also": t.clone()}) == "bad"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_range_check_counts_what_numpy_counts(dtype, kernel_mode):
    """count_outside (one pass, in the values' dtype) against numpy's comparison in float64,
    across chunk boundaries, for bounds a float32 cannot hold exactly and the largest float."""
    import sys

    from qfl.compress._kernels import CHUNK, count_outside

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(3 * CHUNK + 17) * 10).astype(dtype)
    x[[0, CHUNK - 1, CHUNK, 2 * CHUNK + 5, x.size - 1]] = [np.nan, np.inf, -np.inf, 1.5 + 2.0**-30, -(1.5 + 2.0**-30)]
    x[7], x[8] = 1.5, np.nextafter(np.float32(1.5), np.float32(2))  # 1.5 + 2**-23
    # 1.5 + 0.75 * 2**-23 rounds up to x[8] in float32: x[8] is beyond it all the same
    for bound in (1.5, 1.5 + 2.0**-40, 1.5 + 0.75 * 2.0**-23, 1.5 + 2.0**-23, 2.0**40, sys.float_info.max):
        wide = x.astype(np.float64)
        expected = int(np.count_nonzero(~((-bound <= wide) & (wide <= bound))))
        assert count_outside(x, bound) == expected, bound
