"""Headers and control messages: round trips, version negotiation, and every rejection."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_hcs_stream.protocol import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Bye,
    Coords,
    FrameHeader,
    FrameRef,
    HeaderDecoder,
    Limits,
    ProtocolError,
    ShmRef,
    VersionError,
    decode_control,
    decode_message,
    encode_bye,
    encode_control,
    encode_frame_header,
)

SHM = ShmRef("hcs_123_0123abcd", 4096, 512 * 512 * 2, 0, 2)


def header(**changes: Any) -> FrameHeader:
    fields: dict[str, Any] = {
        "producer": "host:1:abcd", "seq": 7, "run": "run-1", "source": "nuclei",
        "kind": "image", "dtype": "uint16", "shape": (512, 512), "pixels": SHM,
        "coords": Coords(well="B03", site=2, channel="DAPI", z=4, t=0), "meta": {"um": 0.65}}
    fields.update(changes)
    return FrameHeader(**fields)


def raw(**changes: Any) -> dict[str, Any]:
    """A valid header as a dict, with some fields replaced (None: removed)."""
    obj = json.loads(encode_frame_header(header()))
    for key, value in changes.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def decode(obj: Any, nframes: int | None = None, limits: Limits = DEFAULT_LIMITS) -> Any:
    return decode_message(json.dumps(obj).encode(), limits, nframes)


@pytest.mark.parametrize("h", [
    header(),
    header(pixels=FrameRef(1), coords=Coords()),
    header(kind="labels", dtype="int32", shape=(3, 64, 64), meta={}, pixels=FrameRef(1)),
    header(dtype="uint8", shape=(32, 32, 3), rgb=True, pixels=FrameRef(1)),
    header(dtype="float32", shape=(5, 6, 7, 4), rgb=True, pixels=FrameRef(1),
           coords=Coords(channel=3)),
    header(producer="ü" * 256, run="r" * 256, source="s" * 256),
])
def test_frame_header_round_trip(h: FrameHeader) -> None:
    got = decode_message(encode_frame_header(h), nframes=2)
    assert got == h


def test_bye_round_trip() -> None:
    assert decode_message(encode_bye(Bye("p", 41))) == Bye("p", 41)


def test_header_is_compact_json_with_version() -> None:
    data = encode_frame_header(header())
    assert b" " not in data
    obj = json.loads(data)
    assert obj["hcs"] == list(PROTOCOL_VERSION)
    assert obj["type"] == "frame"
    assert obj["pixels"] == {"shm": {"segment": SHM.segment, "offset": 4096,
                                     "nbytes": 524288, "slot": 0, "generation": 2}}


def test_newer_minor_with_unknown_fields_is_accepted() -> None:
    got = decode(raw(hcs=[1, 9], colour_space="sRGB", coords={"well": "A1", "plate": "P7"}))
    assert got.version == (1, 9)
    assert got.coords == Coords(well="A1")


@pytest.mark.parametrize("major", [0, 2, 17])
def test_other_major_is_a_version_error(major: int) -> None:
    with pytest.raises(VersionError, match=f"protocol major version {major} is not supported "
                                           r"by this viewer \(speaks 1.x\)"):
        decode(raw(hcs=[major, 0]))


BAD: list[tuple[dict[str, Any], str]] = [
    (raw(hcs=None), "'hcs' must be the protocol version"),
    (raw(hcs=[1]), "'hcs' must be the protocol version"),
    (raw(hcs=[True, 0]), "'hcs' must be the protocol version"),
    (raw(type="picture"), "'type' must be"),
    (raw(producer=""), "'producer' must be 1 to 256 characters"),
    (raw(producer="p" * 257), "'producer' must be 1 to 256 characters"),
    (raw(producer=5), "'producer' must be a string"),
    (raw(seq=-1), "'seq' must be between 0"),
    (raw(seq=True), "'seq' must be an integer"),
    (raw(seq=1.0), "'seq' must be an integer"),
    (raw(seq="1"), "'seq' must be an integer"),
    (raw(run=None), "'run' must be a string"),
    (raw(source=["a"]), "'source' must be a string"),
    (raw(kind="movie"), "'kind' must be"),
    (raw(dtype="float16"), "'dtype' must be one of"),
    (raw(dtype=">u2"), "'dtype' must be one of"),
    (raw(dtype="object"), "'dtype' must be one of"),
    (raw(kind="labels", dtype="float32"), "labels need an integer dtype"),
    (raw(shape=[512]), "'shape' must have 2 to 4 dimensions"),
    (raw(shape=[2, 2, 2, 2, 2]), "'shape' must have 2 to 4 dimensions"),
    (raw(shape="512x512"), "'shape' must be a list of integers"),
    (raw(shape=[512, 512.0]), "'shape' must be a list of integers"),
    (raw(shape=[512, True]), "'shape' must be a list of integers"),
    (raw(shape=[512, 0]), "each side in 'shape' must be 1 to 65536"),
    (raw(shape=[512, -3]), "each side in 'shape' must be 1 to 65536"),
    (raw(shape=[65537, 1]), "each side in 'shape' must be 1 to 65536"),
    (raw(shape=[65536, 65536, 4]), "more than the limit"),
    (raw(rgb=1), "'rgb' must be true or false"),
    (raw(rgb=True), "rgb image needs a trailing colour axis"),
    (raw(coords=[1]), "'coords' must be a JSON object"),
    (raw(coords={"well": "B-3"}), "coords 'well' must be a well name"),
    (raw(coords={"well": "ABC1"}), "coords 'well' must be a well name"),
    (raw(coords={"well": 3}), "coords 'well' must be a well name"),
    (raw(coords={"well": "B03\n"}), "coords 'well' must be a well name"),
    (raw(coords={"site": -1}), "coords 'site' must be between 0"),
    (raw(coords={"site": True}), "coords 'site' must be an integer"),
    (raw(coords={"z": 1.5}), "coords 'z' must be an integer"),
    (raw(coords={"t": "0"}), "coords 't' must be an integer"),
    (raw(coords={"channel": ["DAPI"]}), "coords 'channel' must be a name"),
    (raw(coords={"channel": ""}), "coords 'channel' must be a name"),
    (raw(coords={"channel": -2}), "coords 'channel' must be a name"),
    (raw(meta=[1, 2]), "'meta' must be a JSON object"),
    (raw(pixels=None), "'pixels' must be"),
    (raw(pixels={"shm": {}, "frame": 1}), "'pixels' must be"),
    (raw(pixels={"frame": 0}), "pixels 'frame' must be between 1"),
    (raw(pixels={"frame": "1"}), "pixels 'frame' must be an integer"),
    (raw(pixels={"shm": {**SHM.__dict__, "segment": "../../etc/passwd"}}),
     "pixels 'segment' must be a name like"),
    (raw(pixels={"shm": {**SHM.__dict__, "segment": "psm_123"}}),
     "pixels 'segment' must be a name like"),
    (raw(pixels={"shm": {**SHM.__dict__, "segment": SHM.segment + "\n"}}),
     "pixels 'segment' must be a name like"),
    (raw(pixels={"shm": {**SHM.__dict__, "nbytes": 12}}), "pixels 'nbytes' is 12 but"),
    (raw(pixels={"shm": {**SHM.__dict__, "offset": -4096}}), "pixels 'offset' must be"),
    (raw(pixels={"shm": {**SHM.__dict__, "slot": 1.0}}), "pixels 'slot' must be an integer"),
    (raw(pixels={"shm": {**SHM.__dict__, "generation": 3}}), "generation' 3 is odd"),
]


@pytest.mark.parametrize(("obj", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_header_is_rejected_with_a_clear_reason(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(obj, nframes=2)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "not valid UTF-8 JSON"),
    (b"\xff\xfe{", "not valid UTF-8 JSON"),
    (b"{\"hcs\": [1, 0]", "not valid UTF-8 JSON"),
    (b"{} {}", "not valid UTF-8 JSON"),
    (b"[1, 0]", "must be a JSON object"),
    (b"[" * 100000, "not valid UTF-8 JSON|more than the limit"),
    (b" " * (DEFAULT_LIMITS.max_header_bytes + 1), "more than the limit"),
])
def test_garbage_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_message(data)


def test_frame_index_must_exist() -> None:
    obj = raw(pixels={"frame": 2})
    with pytest.raises(ProtocolError, match="frame 2 but the message has only 2 frame"):
        decode(obj, nframes=2)
    assert decode(obj, nframes=3).pixels == FrameRef(2)


def test_rejection_names_the_producer_when_it_could_be_read() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(raw(dtype="complex64"))
    assert (info.value.producer, info.value.seq) == ("host:1:abcd", 7)
    with pytest.raises(ProtocolError) as info:
        decode(raw(producer=3))
    assert info.value.producer is None


def test_limits_are_configurable() -> None:
    small = Limits(max_ndim=2, max_side=100, max_string=12, max_frame_bytes=100)
    with pytest.raises(ProtocolError, match="2 to 2 dimensions"):
        decode(raw(shape=[2, 2, 2]), limits=small)
    with pytest.raises(ProtocolError, match="1 to 100"):
        decode(raw(shape=[2, 101]), limits=small)
    with pytest.raises(ProtocolError, match="more than the limit of 100"):
        decode(raw(shape=[10, 10]), limits=small)
    with pytest.raises(ProtocolError, match="1 to 12 characters"):
        decode(raw(run="r" * 13), limits=small)


def test_control_round_trip_and_errors() -> None:
    req = decode_control(encode_control({"cmd": "flush", "until": {"p": 3}, "timeout": 5}))
    assert req == {"hcs": [1, 0], "cmd": "flush", "until": {"p": 3}, "timeout": 5}
    assert decode_control(encode_control({"ok": True}), reply=True)["ok"] is True
    with pytest.raises(ProtocolError, match="unknown command str 'rm -rf'"):
        decode_control(encode_control({"cmd": "rm -rf"}))
    with pytest.raises(ProtocolError, match="'hcs' must be"):
        decode_control(b'{"cmd": "ping"}')
    with pytest.raises(VersionError):
        decode_control(b'{"hcs": [2, 0], "cmd": "ping"}')
    with pytest.raises(ProtocolError, match="needs 'ok'"):
        decode_control(encode_control({"error": "x"}), reply=True)
    with pytest.raises(ProtocolError, match="not valid"):
        decode_control(b"\x80\x04\x95")  # a pickle is just garbage here


# -- the receiver's cache of validated static header parts ------------------------------------
START = (b'{"hcs":[1,0],"type":"frame","producer":"host:1:abcd","run":"run-1","seq":%d,'
         b'"source":"nuclei","kind":"image","dtype":"uint16","shape":[512,512],"rgb":false,')
TAIL = (b'"coords":{"well":"B03","z":%d},"meta":{"um":0.65},"pixels":{"shm":{"segment":'
        b'"hcs_123_0123abcd","offset":4096,"nbytes":524288,"slot":0,"generation":%d}}}')


def published(seq: int, z: int = 4, gen: int = 2, tail: bytes | None = None) -> bytes:
    """A header laid out as the Publisher lays it out."""
    return START % seq + (TAIL % (z, gen) if tail is None else tail)


def test_cached_static_part_gives_what_decode_message_gives() -> None:
    decoder = HeaderDecoder()
    for seq in range(5):
        data = published(seq, z=seq, gen=2 * seq)
        got = decoder.decode(data, 1)
        assert got == decode_message(data, DEFAULT_LIMITS, 1)
        assert isinstance(got, FrameHeader) and got.seq == seq and got.coords.z == seq
        assert got.__dict__ == FrameHeader(**got.__dict__).__dict__
    assert len(decoder._cache) == 1  # learnt from the first, used by the others
    assert decoder.decode(encode_bye(Bye("p", 3))) == Bye("p", 3)


@pytest.mark.parametrize(("data", "message"), [
    (published(1, tail=b'"coords":{"well":"B3x"},"meta":{},"pixels":{"frame":1}}'),
     "coords 'well' must be a well name"),
    (published(1, gen=3), "generation' 3 is odd"),
    (published(1, tail=b'"coords":{},"meta":[],"pixels":{"frame":1}}'),
     "'meta' must be a JSON object"),
    (published(1, tail=b'"coords":{},"meta":{},"pixels":{"frame":5}}'),
     "frame 5 but the message has only 1"),
    (published(1, tail=b'"coords":{},"meta":{},"pixels":{"shm":{"segment":"../etc","offset"'
                       b':4096,"nbytes":524288,"slot":0,"generation":2}}}'), "'segment' must"),
    (published(1, tail=b'"coords":{},"meta":{},"pixels":{"shm":{"segment":"hcs_123_0123abcd",'
                       b'"offset":4096,"nbytes":8,"slot":0,"generation":2}}}'),
     "'nbytes' is 8 but dtype and shape need 524288"),
    (published(1, tail=b'"coords":{},"meta":{},"pixels":{"frame":1},"dtype":"complex64"}'),
     "'dtype' must be one of"),
    (published(1, tail=b'"coords":{},"meta":{},"pixels":{"frame":1},"shape":[0,1]}'),
     "each side in 'shape'"),
    (published(1) + b" x", "not valid UTF-8 JSON"),
    (published(1)[:-1], "not valid UTF-8 JSON"),
    (published(1)[:-4] + b"\xff}}}", "not valid UTF-8 JSON"),
    (START.replace(b"%d", b"01") + TAIL % (4, 2), "not valid UTF-8 JSON"),
    (START.replace(b"%d", b"-1") + TAIL % (4, 2), "'seq' must be between"),
    (START.replace(b"%d", b"1.0") + TAIL % (4, 2), "'seq' must be an integer"),
    (published(2**63), "'seq' must be between"),
    (published(1) + b" " * DEFAULT_LIMITS.max_header_bytes, "more than the limit"),
])
def test_cached_static_part_with_a_bad_tail_is_rejected(data: bytes, message: str) -> None:
    decoder = HeaderDecoder()
    decoder.decode(published(0), 1)
    assert decoder._cache
    with pytest.raises(ProtocolError, match=message) as info:
        decoder.decode(data, 1)
    with pytest.raises(ProtocolError) as slow:
        decode_message(data, DEFAULT_LIMITS, 1)
    assert str(info.value) == str(slow.value)
    assert (info.value.producer, info.value.seq) == (slow.value.producer, slow.value.seq)


def test_a_tail_may_override_nothing_that_was_cached() -> None:
    """JSON's last duplicate wins: a tail repeating a static member is decoded in full."""
    decoder = HeaderDecoder()
    decoder.decode(published(0), 1)
    data = published(1, tail=b'"coords":{},"meta":{},"pixels":{"frame":1},"kind":"labels"}')
    got = decoder.decode(data, 2)
    assert isinstance(got, FrameHeader) and got.kind == "labels"
    assert got == decode_message(data, DEFAULT_LIMITS, 2)


def test_static_parts_that_are_not_plain_are_never_cached() -> None:
    decoder = HeaderDecoder()
    twice = published(0).replace(b'"rgb":false,', b'"rgb":false,"kind":"labels",')
    nested = published(0).replace(b'"run":"run-1",', b'"run":"run-1","x":{"a":1},')
    for data in (twice, nested, published(0, tail=b'"coords":{},"meta":{},"pixels":{"frame":'
                                                 b'1},"extra":1}')):
        assert decoder.decode(data, 2) == decode_message(data, DEFAULT_LIMITS, 2)
    assert not decoder._cache


# -- the shared-memory fast path: coords/meta reused, pixels matched exactly -------------------
_INTS = [b"0", b"1", b"2", b"3", b"4096", b"524288", b"65535", b"65536", b"9223372036854775806",
         b"9223372036854775807", b"9223372036854775808", b"01", b"-2", b"2.0", b"2e3"]
_SEGMENTS = [b"hcs_123_0123abcd", b"hcs_1_ffffffff", b"hcs_123_0123ABCD", b"../etc/passwd",
             b"hcs_12345678901_0123abcd", b"hcs_123_0123abc\\u0064", b""]
_PARTS = [b'"coords":{"well":"B03","z":4},"meta":{}', b'"coords":{},"meta":{}', b'"coords":{}',
          b'"coords":{"z":4},"meta":{"um":0.65,"note":"x","ok":true,"n":null}',
          b'"coords":{"z":4},"meta":{"plate":{"rows":8}}', b'"coords":{"well":"B3x"},"meta":{}',
          b'"coords":{"z":-1},"meta":{}', b'"coords":{"z":4},"meta":[]',
          b'"coords":{"z":4},"coords":{"z":5},"meta":{}', b'"meta":{},"coords":{"site":2}',
          b'"coords":{"z":4},"meta":{},"pixels":{"frame":1}', b'"coords":{"z":4},"kind":"labels"',
          b'"coords":{"z":4} ,"meta":{}', b'"coords":{"z":NaN},"meta":{"x":NaN}',
          b'"coords":{"z":4},"meta":{"\xff":1}']


def _shm_tail(part: bytes, segment: bytes, offset: bytes, nbytes: bytes, slot: bytes,
              gen: bytes) -> bytes:
    return (part + b',"pixels":{"shm":{"segment":"' + segment + b'","offset":' + offset
            + b',"nbytes":' + nbytes + b',"slot":' + slot + b',"generation":' + gen + b"}}}")


def _outcome(call: Any) -> Any:
    try:
        return ("ok", call())
    except ProtocolError as exc:
        return ("error", str(exc), exc.producer, exc.seq)


@given(part=st.sampled_from(_PARTS), segment=st.sampled_from(_SEGMENTS),
       offset=st.sampled_from(_INTS), nbytes=st.sampled_from(_INTS), slot=st.sampled_from(_INTS),
       gen=st.sampled_from(_INTS), seq=st.integers(0, 2**63 - 1), twice=st.booleans())
@settings(max_examples=400, deadline=None)
def test_fast_shm_path_decides_as_decode_message(part: bytes, segment: bytes, offset: bytes,
                                                  nbytes: bytes, slot: bytes, gen: bytes,
                                                  seq: int, twice: bool) -> None:
    decoder = HeaderDecoder()
    decoder.decode(published(0), 1)  # the static part is cached
    data = published(seq, tail=_shm_tail(part, segment, offset, nbytes, slot, gen))
    for _ in range(3 if twice else 1):  # kept the second time, used from the cache the third
        got = _outcome(lambda: decoder.decode(data, 1))
        assert got == _outcome(lambda: decode_message(data, DEFAULT_LIMITS, 1))


def test_fast_shm_path_is_taken_and_meta_is_never_shared() -> None:
    decoder = HeaderDecoder()
    tail = _shm_tail(b'"coords":{"z":4},"meta":{"um":0.65}', b"hcs_123_0123abcd", b"4096",
                     b"524288", b"0", b"2")
    # the first header teaches the static part, the second the coords/meta part
    decoder.decode(published(0, tail=tail), 1)
    first, second = (decoder.decode(published(s, tail=tail), 1) for s in (1, 2))
    assert isinstance(first, FrameHeader) and isinstance(second, FrameHeader)
    assert len(decoder._parts) == 1 and len(decoder._segments) == 1  # the fast path ran
    assert first.meta == second.meta == {"um": 0.65} and first.meta is not second.meta
    first.meta["um"] = 1.0
    assert decoder.decode(published(3, tail=tail), 1).meta == {"um": 0.65}
    assert second.coords == first.coords and second.seq == 2


def test_a_part_seen_once_is_kept_as_bytes_only() -> None:
    """Unique coords/meta (a timestamp in meta, each plate position once) leave no parsed
    objects behind to age into the garbage collector's oldest generation."""
    decoder = HeaderDecoder()

    def tail(t0: float) -> bytes:
        return _shm_tail(b'"coords":{"z":4},"meta":{"t0":%r}' % t0, b"hcs_123_0123abcd",
                         b"4096", b"524288", b"0", b"2")

    for seq in range(100):
        got = decoder.decode(published(seq, tail=tail(seq / 7)), 1)
        assert isinstance(got, FrameHeader) and got.meta == {"t0": seq / 7}
    assert not decoder._parts and len(decoder._seen_once) == 99  # the first: decoded in full
    assert all(type(part) is bytes for part in decoder._seen_once)
    again = decoder.decode(published(100, tail=tail(3 / 7)), 1)
    assert isinstance(again, FrameHeader) and again.meta == {"t0": 3 / 7}
    assert len(decoder._parts) == 1  # seen twice: kept
    for seq in range(4 * decoder.max_entries):  # bounded
        decoder.decode(published(seq, tail=tail(1000 + seq)), 1)
    assert len(decoder._seen_once) <= 4 * decoder.max_entries
