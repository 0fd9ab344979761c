"""Pure tests of the codec: every frame either decodes or raises the right error."""

import json

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import codec
from protocol.messages import Command, valid_id, valid_key


def test_roundtrip_both_encodings():
    msg = {"op": "gift", "id": 7, "room": "alice", "gift": "rose", "count": 3, "key": "k"}
    for as_json in (False, True):
        frame = codec.encode(msg, json=as_json)
        assert isinstance(frame, str if as_json else bytes)
        assert codec.decode_command(frame) == Command(
            "gift", 7, {"room": "alice", "gift": "rose", "count": 3, "key": "k"}
        )


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated
        msgpack.packb([1, 2]),  # a list
        msgpack.packb({"op": "ping"}),  # no id
        msgpack.packb({"op": "ping", "id": "1"}),  # string id
        msgpack.packb({"op": "ping", "id": 1.0}),  # float id
        msgpack.packb({"op": "ping", "id": True}),  # bool is not an int here
        msgpack.packb({1: 2, "id": 1}),  # non-string key
        msgpack.packb({"op": "ping", "id": 1}) + b"\x00",  # trailing data
        "not json",
        "[1,2]",
        '{"op":"ping","id":NaN}',
        '{"op":"ping","id":1,"x":Infinity}',
        "[" * 5000 + "]" * 5000,
        '{"id":' + "9" * 5000 + "}",  # longer than Python's int parsing limit
        '{"id": 99999999999999999999999}',  # beyond int64
        "",
        b"",
    ],
)
def test_undecodable(frame):
    with pytest.raises(codec.UndecodableFrame):
        codec.decode_command(frame)


def test_deep_msgpack_nesting_is_undecodable():
    frame = b"\x81\xa1a" * 40 + b"\x00"
    with pytest.raises(codec.UndecodableFrame):
        codec.decode_command(frame)


@pytest.mark.parametrize(
    "msg",
    [
        {"id": 0, "op": "ping"},
        {"id": -5, "op": "ping"},
        {"id": 2**31, "op": "ping"},
        {"id": 3},  # no op
        {"id": 3, "op": 5},
        {"id": 3, "op": None},
    ],
)
def test_malformed_with_id(msg):
    for as_json in (False, True):
        with pytest.raises(codec.MalformedCommand) as exc:
            codec.decode_command(codec.encode(msg, json=as_json))
        assert exc.value.id == msg["id"]


def test_ids_and_keys():
    assert valid_id("a") and valid_id("A_b-9" * 12 + "abcd")
    assert not valid_id("") and not valid_id("a" * 65) and not valid_id("a b")
    assert not valid_id("ü") and not valid_id(5) and not valid_id("a:b")
    assert valid_key(" ~") and valid_key("x" * 64)
    assert not valid_key("") and not valid_key("x" * 65) and not valid_key("é")
    assert not valid_key("a\n") and not valid_key(None)


@given(st.binary(max_size=256))
def test_random_bytes_never_crash(data):
    try:
        codec.decode_command(data)
    except (codec.UndecodableFrame, codec.MalformedCommand):
        pass


@given(st.text(max_size=256))
def test_random_text_never_crash(data):
    try:
        codec.decode_command(data)
    except (codec.UndecodableFrame, codec.MalformedCommand):
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), _values, max_size=6))
def test_random_maps_decode_or_raise(value):
    try:
        frame = json.dumps(value)
    except ValueError:
        return
    try:
        cmd = codec.decode_command(frame)
    except (codec.UndecodableFrame, codec.MalformedCommand):
        return
    assert type(cmd.id) is int and 1 <= cmd.id < 2**31 and isinstance(cmd.op, str)
