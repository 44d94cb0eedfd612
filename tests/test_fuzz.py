"""Hostile input from a raw socket: every bad message is counted as rejected, nothing breaks.

A bare XPUB socket (no project code on the sending side) sends garbage, almost-right headers,
wrong payload lengths, unknown versions, vanished segments and bad offsets into a real
receiver; after all of it the receiver still serves a good frame exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_hcs_stream.protocol import DTYPES, FrameHeader, FrameRef, encode_frame_header
from napari_hcs_stream.receiver import UNKNOWN, Receiver
from napari_hcs_stream.ring import ShmRing
from transport_helpers import poll_until, raw_xpub

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
GOOD = FrameHeader("fuzzer:1:0", 0, "run", "src", "image", "uint16", (4, 4), FrameRef(1))
PAYLOAD = np.arange(16, dtype="<u2").tobytes()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
not_int = json_values.filter(lambda v: type(v) is not int)
bad_names = st.just("") | st.text(min_size=257, max_size=300) | not_int.filter(
    lambda v: not isinstance(v, str))

#: for each header field, values it can never validly take
BAD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "hcs": json_values.filter(lambda v: not (isinstance(v, list) and len(v) == 2
                                             and type(v[0]) is int and v[0] == 1
                                             and type(v[1]) is int and v[1] >= 0)),
    "type": json_values.filter(lambda v: v not in ("frame", "bye")),
    "producer": bad_names,
    "seq": not_int | st.integers(max_value=-1) | st.integers(min_value=2**63),
    "run": bad_names,
    "source": bad_names,
    "kind": json_values.filter(lambda v: v not in ("image", "labels")),
    "dtype": json_values.filter(lambda v: not (isinstance(v, str) and v in DTYPES))
    | st.sampled_from(
        ["<u2", ">u2", "float16", "complex64", "object", "U8", "V16"]),
    "shape": st.one_of(
        json_values.filter(lambda v: not isinstance(v, list)),
        st.lists(st.integers(1, 8), max_size=1), st.lists(st.integers(1, 8), min_size=5),
        st.lists(st.integers(-(2**40), 0), min_size=2, max_size=4),
        st.lists(st.integers(65537, 2**62), min_size=2, max_size=4),
        st.lists(st.integers(30000, 65536), min_size=3, max_size=4),  # too many bytes
        st.lists(not_int, min_size=2, max_size=4)),
    "rgb": json_values.filter(lambda v: not isinstance(v, bool)) | st.just(True),
    "coords": json_values.filter(lambda v: not isinstance(v, dict)) | st.one_of(
        st.fixed_dictionaries({"well": st.text(max_size=8).filter(
            lambda w: not (w[:1].isalpha() and w[-1:].isdigit()))}),
        st.fixed_dictionaries({"site": not_int.filter(lambda v: v is not None)
                               | st.integers(max_value=-1)}),
        st.fixed_dictionaries({"z": st.booleans() | st.floats(allow_nan=False)}),
        st.fixed_dictionaries({"channel": st.lists(st.integers()) | st.just("")})),
    "meta": json_values.filter(lambda v: v is not None and not isinstance(v, dict)),
    "pixels": json_values.filter(lambda v: not (isinstance(v, dict) and "frame" in v
                                                and type(v["frame"]) is int and v["frame"] == 1)),
}


class Target:
    """A receiver polled in the test thread and a raw socket feeding it."""

    def __init__(self, runtime_dir: Path) -> None:
        self.got: list[np.ndarray] = []
        self.receiver = Receiver("fuzz", on_frame=lambda h, a: self.got.append(a.copy()))
        self.receiver.bind()
        self.sock = raw_xpub(self.receiver.endpoint.data, self.receiver)

    def rejected(self) -> int:
        return self.receiver.stats.rejected

    def send_bad(self, frames: list[bytes]) -> None:
        """Send one message and wait until it is counted as rejected (and nothing else)."""
        before = (self.receiver.stats.rejected, self.receiver.stats.received)
        self.sock.send_multipart(frames)
        poll_until(self.receiver, lambda: self.receiver.stats.rejected == before[0] + 1)
        assert self.receiver.stats.received == before[1]

    def close(self) -> None:
        self.sock.close()
        self.receiver.close()


@pytest.fixture
def target(runtime_dir: Path, recv_mode: str) -> Iterator[Target]:
    t = Target(runtime_dir)
    yield t
    # after everything, a good frame still arrives exactly
    t.sock.send_multipart([encode_frame_header(GOOD), PAYLOAD])
    poll_until(t.receiver, lambda: t.got)
    np.testing.assert_array_equal(t.got[-1], np.arange(16).reshape(4, 4))
    assert t.receiver.stats.received == 1
    t.close()


def good_obj() -> dict[str, Any]:
    return json.loads(encode_frame_header(GOOD))


def test_garbage_bytes(target: Target) -> None:
    @SETTINGS
    @given(st.binary(max_size=600) | st.text(max_size=200).map(str.encode))
    def check(data: bytes) -> None:
        target.send_bad([data, PAYLOAD])

    check()
    assert target.receiver.stats.producers[UNKNOWN].rejected >= 1


def test_arbitrary_json(target: Target) -> None:
    @SETTINGS
    @given(json_values.filter(lambda v: not isinstance(v, dict)) | st.dictionaries(
        st.text(max_size=10), json_values, max_size=6))
    def check(value: Any) -> None:
        target.send_bad([json.dumps(value).encode(), PAYLOAD])

    check()


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_one_bad_field(target: Target, field: str) -> None:
    @settings(SETTINGS, max_examples=15)
    @given(BAD_FIELDS[field] | st.just(KeyError))
    def check(value: Any) -> None:
        obj = good_obj()
        if value is KeyError:
            if field in ("rgb", "coords", "meta"):  # optional fields: absent is fine
                return
            del obj[field]
        else:
            obj[field] = value
        target.send_bad([json.dumps(obj).encode(), PAYLOAD])

    check()


def test_wrong_payload_lengths_and_missing_frames(target: Target) -> None:
    @SETTINGS
    @given(st.binary(max_size=100).filter(lambda b: len(b) != 32),
           st.integers(2, 5))
    def check(payload: bytes, index: int) -> None:
        target.send_bad([encode_frame_header(GOOD), payload])
        obj = good_obj()
        obj["pixels"] = {"frame": index}
        target.send_bad([json.dumps(obj).encode(), PAYLOAD])

    check()
    target.send_bad([encode_frame_header(GOOD)])  # the pixel frame never came


def test_headers_over_the_limit(target: Target) -> None:
    """Rejected with the same reason either way, whatever follows them in the message."""
    limit = target.receiver.limits.max_header_bytes
    for size, rest in ((limit + 1, [PAYLOAD]), (limit + 1, []), (3 * limit, [PAYLOAD, b"x"])):
        target.send_bad([b" " * size, *rest])
        assert target.receiver.stats.last_error == (
            f"header is {size} bytes, more than the limit of {limit}")


def test_unknown_major_versions(target: Target) -> None:
    @SETTINGS
    @given(st.integers(0, 2**31).filter(lambda m: m != 1), st.integers(0, 99))
    def check(major: int, minor: int) -> None:
        obj = good_obj()
        obj["hcs"] = [major, minor]
        target.send_bad([json.dumps(obj).encode(), PAYLOAD])

    check()
    assert "upgrade napari-hcs-stream" in target.receiver.stats.last_error


def test_vanished_segments_and_bad_offsets(target: Target) -> None:
    ring = ShmRing(4096, 4)
    try:
        good_offset = ring.slot_offset(1)

        @SETTINGS
        @given(st.sampled_from(["vanished", "offset", "slot", "nbytes", "generation"]),
               st.integers(0, 2**40))
        def check(case: str, n: int) -> None:
            shm = {"segment": ring.name, "offset": good_offset, "nbytes": 32, "slot": 1,
                   "generation": 2}
            if case == "vanished":
                shm["segment"] = f"hcs_{n % 10**9}_{n % 16**8:08x}"
            elif case == "offset":
                shm["offset"] = n if n != good_offset else n + 1
            elif case == "slot":
                shm["slot"] = 4 + n % 60000
                shm["offset"] = 4096 + shm["slot"] * 4096
            elif case == "nbytes":
                shm["nbytes"] = n if n != 32 else 33
            else:
                shm["generation"] = 2 * n + 1 if n % 2 else 2 * n + 4  # odd, or never written
            obj = good_obj()
            obj["pixels"] = {"shm": shm}
            target.send_bad([json.dumps(obj).encode()]) if case != "generation" or n % 2 \
                else _expect_torn(target, json.dumps(obj).encode())

        check()
    finally:
        ring.close()


def _expect_torn(target: Target, header: bytes) -> None:
    """A generation the slot never had is a torn read: counted, never shown."""
    before = target.receiver.stats.torn
    target.sock.send(header)
    poll_until(target.receiver, lambda: target.receiver.stats.torn == before + 1)
    assert target.receiver.stats.received == 0
