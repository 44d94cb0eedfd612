"""The wire protocol: versioned JSON headers, raw pixel payloads, JSON control messages.

Nothing here is ever unpickled: headers and control messages are JSON, pixels are raw
little-endian bytes. Every field read from the network is validated before use, and a bad
message raises :class:`ProtocolError` whose text says what was wrong (it is shown to the user).
The byte-level description for implementers in other languages is ``docs/protocol.md``.
"""

from __future__ import annotations

import json
import json.scanner
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

PROTOCOL_NAME = "hcs-stream"
PROTOCOL_VERSION: tuple[int, int] = (1, 0)

#: numpy dtype names accepted on the wire (always little-endian, C order).
DTYPES: frozenset[str] = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
     "float32", "float64"}
)
#: dtypes a ``labels`` item may use.
LABEL_DTYPES: frozenset[str] = frozenset(
    {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"}
)
KINDS: frozenset[str] = frozenset({"image", "labels"})
COMPONENTS: tuple[str, ...] = ("well", "site", "channel", "z", "t")
CONTROL_COMMANDS: frozenset[str] = frozenset({"ping", "state", "clear", "flush", "shutdown"})
#: ``meta["downsample"]``, a display resolution the viewer honours: 1 (full) to this
MAX_DOWNSAMPLE = 64


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says what was wrong.

    ``producer`` and ``seq`` are set when they could be read, so a rejection is counted
    against the producer that sent it.
    """

    producer: str | None = None
    seq: int | None = None


class VersionError(ProtocolError):
    """A message of a protocol major version this side does not speak."""


@dataclass(frozen=True)
class Limits:
    """Caps applied to everything read from the network (a viewer is not an allocator)."""

    max_header_bytes: int = 256 * 1024
    max_frame_bytes: int = 2 * 1024**3
    max_ndim: int = 4
    max_side: int = 65536
    max_string: int = 256
    max_index: int = 1_000_000


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Coords:
    """Where an item sits in the plate: well name (``"B03"``), site, channel, z, t."""

    well: str | None = None
    site: int | None = None
    channel: str | int | None = None
    z: int | None = None
    t: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COMPONENTS if getattr(self, k) is not None}

    def get(self, component: str) -> str | int | None:
        value: str | int | None = getattr(self, component)
        return value


@dataclass(frozen=True)
class ShmRef:
    """Pixels in slot ``slot`` of the producer's shared-memory ring ``segment``."""

    segment: str
    offset: int
    nbytes: int
    slot: int
    generation: int


@dataclass(frozen=True)
class FrameRef:
    """Pixels in frame ``index`` (>= 1) of the same multipart message."""

    index: int = 1


PixelRef = ShmRef | FrameRef


@dataclass(frozen=True)
class FrameHeader:
    """One item (a plane, a volume or an RGB image) and everything needed to place it."""

    producer: str
    seq: int
    run: str
    source: str
    kind: Literal["image", "labels"]
    dtype: str
    shape: tuple[int, ...]
    pixels: PixelRef
    coords: Coords = field(default_factory=Coords)
    rgb: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    version: tuple[int, int] = PROTOCOL_VERSION

    @property
    def nbytes(self) -> int:
        return expected_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class Bye:
    """A producer says it is closing: its segments may be released, ``seq`` was its last."""

    producer: str
    seq: int
    version: tuple[int, int] = PROTOCOL_VERSION


_ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4,
             "int32": 4, "uint64": 8, "int64": 8, "float32": 4, "float64": 8}


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return _ITEMSIZE[dtype] * math.prod(shape)


# -- encoding ---------------------------------------------------------------------------------
_WELL_RE = re.compile(r"^[A-Za-z]{1,2}[0-9]{1,3}$")
#: only segments of this shape are ever attached: a header cannot point the viewer at some
#: other program's shared memory.
SEGMENT_RE = re.compile(r"^hcs_[0-9]{1,10}_[0-9a-f]{8}$")
_MAX_SEQ = 2**63 - 1
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def pixels_dict(ref: PixelRef) -> dict[str, Any]:
    if isinstance(ref, ShmRef):
        return {"shm": {"segment": ref.segment, "offset": ref.offset, "nbytes": ref.nbytes,
                        "slot": ref.slot, "generation": ref.generation}}
    return {"frame": ref.index}


def encode_frame_header(h: FrameHeader) -> bytes:
    """Frame 0 of a data message (compact UTF-8 JSON; see ``docs/protocol.md``)."""
    return _dumps({
        "hcs": list(h.version), "type": "frame", "producer": h.producer, "seq": h.seq,
        "run": h.run, "source": h.source, "kind": h.kind, "dtype": h.dtype,
        "shape": list(h.shape), "rgb": h.rgb, "coords": h.coords.as_dict(), "meta": h.meta,
        "pixels": pixels_dict(h.pixels),
    }).encode()


def encode_bye(b: Bye) -> bytes:
    return _dumps({"hcs": list(b.version), "type": "bye", "producer": b.producer,
                   "seq": b.seq}).encode()


# -- decoding and validation ----------------------------------------------------------------
def _fail(message: str) -> ProtocolError:
    return ProtocolError(message)


def _is_int(v: object) -> bool:
    return type(v) is int  # bool is a subclass of int and never a valid count


def _int(obj: dict[str, Any], key: str, where: str, lo: int = 0, hi: int = _MAX_SEQ) -> int:
    v: Any = obj.get(key)
    if not _is_int(v):
        raise _fail(f"{where}{key!r} must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise _fail(f"{where}{key!r} must be between {lo} and {hi}, got {v}")
    return int(v)


def _str(obj: dict[str, Any], key: str, limits: Limits, where: str = "") -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise _fail(f"{where}{key!r} must be a string, got {_show(v)}")
    if not 1 <= len(v) <= limits.max_string:
        raise _fail(f"{where}{key!r} must be 1 to {limits.max_string} characters long, "
                    f"got {len(v)}")
    return v


def _show(v: object) -> str:
    text = "nothing (missing or null)" if v is None else f"{type(v).__name__} {v!r}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_version(obj: dict[str, Any]) -> tuple[int, int]:
    """Same major: accepted whatever the minor (unknown fields are ignored). Else VersionError."""
    v = obj.get("hcs")
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v)):
        raise _fail(f"'hcs' must be the protocol version [major, minor], got {_show(v)}")
    if v[0] != PROTOCOL_VERSION[0]:
        raise VersionError(
            f"protocol major version {v[0]} is not supported by this viewer (speaks "
            f"{PROTOCOL_VERSION[0]}.x); upgrade napari-hcs-stream on the "
            f"{'viewer' if v[0] > PROTOCOL_VERSION[0] else 'pipeline'} side"
        )
    return (v[0], v[1])


_decoder = json.JSONDecoder()
_scan: Any = cast(Any, json.scanner).make_scanner(_decoder)  # the C scanner, no setup


def _load_object(data: bytes, limits: Limits, what: str) -> dict[str, Any]:
    if len(data) > limits.max_header_bytes:
        raise _fail(f"{what} is {len(data)} bytes, more than the limit of "
                    f"{limits.max_header_bytes}")
    try:
        text = data.decode()
        obj, end = _scan(text, 0)
        if end != len(text) and text[end:].strip():
            raise ValueError(f"extra data after the object at character {end}")
    except StopIteration:
        raise _fail(f"{what} is not valid UTF-8 JSON: no value at the start") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(f"{what} is not valid UTF-8 JSON: {exc}") from None
    if type(obj) is not dict:
        raise _fail(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def decode_message(
    frame0: bytes, limits: Limits = DEFAULT_LIMITS, nframes: int | None = None
) -> FrameHeader | Bye:
    """Decode and validate frame 0 of a data message (``nframes``: frames in the message).

    The raised :class:`ProtocolError` carries ``producer`` and ``seq`` when those were
    readable, so the rejection is counted against the right producer. Each check has a fast
    inline test (this runs for every frame) and a slow helper that words the error.
    """
    obj = _load_object(frame0, limits, "header")
    v = obj.get("hcs")
    if (type(v) is list and len(v) == 2 and v[0] == PROTOCOL_VERSION[0]
            and type(v[0]) is int and type(v[1]) is int and v[1] >= 0):
        version = (v[0], v[1])
    else:
        version = check_version(obj)
    kind = obj.get("type")
    producer = obj.get("producer")
    if type(producer) is not str or not 0 < len(producer) <= limits.max_string:
        producer = _str(obj, "producer", limits)
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        seq = _int(obj, "seq", "")
    if kind == "frame":
        try:
            return _decode_frame(obj, producer, seq, version, limits, nframes)
        except ProtocolError as exc:
            exc.producer, exc.seq = producer, seq
            raise
    if kind == "bye":
        return Bye(producer, seq, version)
    raise _fail(f"'type' must be \"frame\" or \"bye\", got {_show(kind)}")


def _decode_frame(obj: dict[str, Any], producer: str, seq: int, version: tuple[int, int],
                  limits: Limits, nframes: int | None) -> FrameHeader:
    get: Callable[..., Any] = obj.get
    max_string = limits.max_string
    run = get("run")
    if type(run) is not str or not 0 < len(run) <= max_string:
        _str(obj, "run", limits)
    source = get("source")
    if type(source) is not str or not 0 < len(source) <= max_string:
        _str(obj, "source", limits)
    kind = get("kind")
    dtype = get("dtype")
    itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
    if itemsize is None:
        raise _fail(f"'dtype' must be one of {', '.join(sorted(DTYPES))}; got "
                    f"{_show(dtype)}")
    if kind == "labels":
        if dtype not in LABEL_DTYPES:
            raise _fail(f"labels need an integer dtype, got {dtype}")
    elif kind != "image":
        raise _fail(f"'kind' must be \"image\" or \"labels\", got {_show(kind)}")
    shape = get("shape")
    nbytes = itemsize
    if type(shape) is list and 2 <= len(shape) <= limits.max_ndim:
        max_side = limits.max_side
        for side in shape:
            if type(side) is not int or not 0 < side <= max_side:
                _shape(shape, limits)
            nbytes *= side
    else:
        _shape(shape, limits)
    rgb = get("rgb", False)
    if rgb is not False:
        if rgb is not True:
            raise _fail(f"'rgb' must be true or false, got {_show(rgb)}")
        if kind == "labels" or len(shape) < 3 or shape[-1] not in (3, 4):
            raise _fail(f"an rgb image needs a trailing colour axis of 3 or 4 (and kind "
                        f"image), got shape {shape} kind {kind}")
    if nbytes > limits.max_frame_bytes:
        raise _fail(f"the item is {nbytes} bytes, more than the limit of "
                    f"{limits.max_frame_bytes}")
    coords = _coords(get("coords", _EMPTY), limits)
    meta = get("meta")
    if meta is None:
        meta = {}
    elif type(meta) is not dict:
        raise _fail(f"'meta' must be a JSON object, got {_show(meta)}")
    pixels = _pixels(get("pixels"), nbytes, nframes)
    return FrameHeader(producer, seq, run, source, kind, dtype, tuple(shape), pixels, coords,
                       rgb, meta, version)


_EMPTY: dict[str, Any] = {}
_NO_COORDS = Coords()
#: frozen dataclasses (no slots, no __post_init__) keep their fields in __dict__: filling it
#: directly builds an equal object at a fraction of the cost of the generated __init__
_new = object.__new__


def _shape(v: object, limits: Limits) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(_is_int(s) for s in v):
        raise _fail(f"'shape' must be a list of integers, got {_show(v)}")
    if not 2 <= len(v) <= limits.max_ndim:
        raise _fail(f"'shape' must have 2 to {limits.max_ndim} dimensions, got {len(v)}")
    for s in v:
        if not 1 <= s <= limits.max_side:
            raise _fail(f"each side in 'shape' must be 1 to {limits.max_side}, got {v}")
    return tuple(v)


def _coords(v: object, limits: Limits) -> Coords:
    if type(v) is not dict:
        raise _fail(f"'coords' must be a JSON object, got {_show(v)}")
    if not v:
        return _NO_COORDS
    get: Callable[..., Any] = v.get
    well = get("well")
    if well is not None and not (type(well) is str and _WELL_RE.fullmatch(well)):
        raise _fail(f"coords 'well' must be a well name like \"B03\", got {_show(well)}")
    max_index = limits.max_index
    site, z, t = get("site"), get("z"), get("t")
    for key, value in (("site", site), ("z", z), ("t", t)):
        if value is not None and (type(value) is not int or not 0 <= value <= max_index):
            _int(v, key, "coords ", 0, max_index)
    channel = get("channel")
    if channel is not None and not (
        (type(channel) is int and 0 <= channel <= max_index)
        or (type(channel) is str and 0 < len(channel) <= limits.max_string)
    ):
        raise _fail(f"coords 'channel' must be a name or a non-negative integer, "
                    f"got {_show(channel)}")
    c = _new(Coords)  # what Coords(...) builds, without a frozen dataclass's __init__
    c.__dict__.update(well=well, site=site, channel=channel, z=z, t=t)
    return cast(Coords, c)


def _pixels(v: object, nbytes: int, nframes: int | None) -> PixelRef:
    if type(v) is dict and len(v) == 1:
        s = v.get("shm")
        if type(s) is dict:
            get: Callable[..., Any] = s.get
            segment, offset, size = get("segment"), get("offset"), get("nbytes")
            slot, gen = get("slot"), get("generation")
            if not (type(segment) is str and SEGMENT_RE.fullmatch(segment)):
                raise _fail(f"pixels 'segment' must be a name like hcs_<pid>_<8 hex>, "
                            f"got {_show(segment)}")
            if not (type(offset) is int and type(size) is int and type(slot) is int
                    and type(gen) is int and 0 <= offset <= _MAX_SEQ and 0 <= slot <= 65535
                    and 0 <= gen <= _MAX_SEQ):
                _int(s, "offset", "pixels ")
                _int(s, "nbytes", "pixels ")
                _int(s, "slot", "pixels ", 0, 65535)
                _int(s, "generation", "pixels ")
            if size != nbytes:
                raise _fail(f"pixels 'nbytes' is {size} but dtype and shape need {nbytes}")
            if gen % 2:
                raise _fail(f"pixels 'generation' {gen} is odd (a slot being written)")
            ref = _new(ShmRef)  # what ShmRef(...) builds, without a frozen __init__
            ref.__dict__.update(segment=segment, offset=offset, nbytes=size, slot=slot,
                                generation=gen)
            return cast(ShmRef, ref)
        if "frame" in v:
            index = _int(v, "frame", "pixels ", 1, 1 << 20)
            if nframes is not None and index >= nframes:
                raise _fail(f"pixels are in frame {index} but the message has only {nframes} "
                            f"frame(s)")
            return FrameRef(index)
    raise _fail(f"'pixels' must be {{\"shm\": {{...}}}} or {{\"frame\": k}}, got {_show(v)}")


# -- control messages -------------------------------------------------------------------------
def encode_control(message: dict[str, Any]) -> bytes:
    """A control request or reply; the protocol version is added when missing."""
    if "hcs" not in message:
        message = {"hcs": list(PROTOCOL_VERSION), **message}
    return json.dumps(message, separators=(",", ":"), default=str).encode()


def decode_control(
    data: bytes, *, reply: bool = False, limits: Limits = DEFAULT_LIMITS,
    commands: frozenset[str] = CONTROL_COMMANDS,
) -> dict[str, Any]:
    """Decode a control request (``cmd`` one of ``commands``) or, with ``reply=True``, a reply.

    An application may answer more commands than the protocol's five (``commands``).
    """
    what = "control reply" if reply else "control request"
    obj = _load_object(data, limits, what)
    check_version(obj)
    if reply:
        if not isinstance(obj.get("ok"), bool):
            raise _fail(f"{what} needs 'ok': true or false, got {_show(obj.get('ok'))}")
        return obj
    cmd = obj.get("cmd")
    if cmd not in commands:
        raise _fail(f"unknown command {_show(cmd)} (expected one of "
                    f"{', '.join(sorted(commands))})")
    return obj


# -- the receiver's fast path -----------------------------------------------------------------
#: members a cached static part may hold, and the only members its tail may hold.
_STATIC_KEYS = frozenset({"hcs", "type", "producer", "run", "seq", "source", "kind", "dtype",
                          "shape", "rgb"})
_TAIL_KEYS = frozenset({"coords", "meta", "pixels"})
_SEQ_AT, _COORDS_AT = b',"seq":', b',"coords":'
_PIXELS_SHM_AT = b',"pixels":{"shm":'
_DIGITS = rb"(0|[1-9][0-9]{0,18})"
#: the pixels member exactly as the Publisher writes it, to the end of the header
_SHM_TAIL = re.compile(rb',"pixels":\{"shm":\{"segment":"([^"\\]{1,64})","offset":' + _DIGITS
                       + rb',"nbytes":' + _DIGITS + rb',"slot":' + _DIGITS + rb',"generation":'
                       + _DIGITS + rb"\}\}\}")
_SCALARS = (str, int, float, bool, type(None))


class HeaderDecoder:
    """:func:`decode_message` with the static part of a producer's headers validated once.

    A publisher's header is ``<start>,"seq":<digits><middle>,"coords":<tail>`` where
    ``<start>`` and ``<middle>`` (version, producer, run, source, kind, dtype, shape, rgb) do
    not change between frames of one stream. The first header of each such pair of byte
    strings goes through :func:`decode_message`; when the pair provably holds only those
    members, each once, with the sequence number at the top level, and the tail only coords,
    meta and pixels, the validated static fields are kept under the exact bytes. A later
    header with the same bytes then only has its seq digits and its tail parsed and checked
    (coords, meta, pixels: every field, as in :func:`decode_message`). Anything else, and any
    header the fast path cannot accept as it is, goes through :func:`decode_message`, so the
    result and every rejection (with its reason) are exactly what it would give.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_entries: int = 256) -> None:
        self.limits = limits
        self.max_entries = max_entries
        self._cache: dict[tuple[bytes, bytes], tuple[dict[str, Any], int]] = {}
        #: ``"coords":...,"meta":...`` bytes -> validated (coords, meta), or None when that
        #: part cannot be reused (meta holding containers, other members): see _fast_shm
        self._parts: dict[bytes, tuple[Coords, dict[str, Any]] | None] = {}
        #: parts seen once: only a part seen again is kept in ``_parts`` (see _fast_shm)
        self._seen_once: set[bytes] = set()
        self._segments: dict[bytes, str] = {}

    def decode(self, frame0: bytes, nframes: int | None = None) -> FrameHeader | Bye:
        if type(frame0) is not bytes:
            return decode_message(frame0, self.limits, nframes)
        i = frame0.find(_SEQ_AT)
        k = frame0.find(b",", i + 7) if i > 0 else -1
        j = frame0.find(_COORDS_AT, k) if k > 0 else -1
        if j < 0:
            return decode_message(frame0, self.limits, nframes)
        key = (frame0[:i], frame0[k:j])
        entry = self._cache.get(key)
        if entry is not None:
            h = self._fast(frame0, entry, frame0[i + 7:k], j, nframes)
            return decode_message(frame0, self.limits, nframes) if h is None else h
        msg = decode_message(frame0, self.limits, nframes)
        if type(msg) is FrameHeader and self._cacheable(key, frame0[j + 1:]):
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            static = dict(msg.__dict__)
            self._cache[key] = (static, msg.nbytes)
        return msg

    def _fast(self, frame0: bytes, entry: tuple[dict[str, Any], int], digits: bytes, j: int,
              nframes: int | None) -> FrameHeader | None:
        """The header, or None for anything out of the ordinary (the slow path decides)."""
        if (len(frame0) > self.limits.max_header_bytes or not digits.isdigit()
                or len(digits) > 19 or (digits[0] == 48 and len(digits) > 1)):  # 48: b"0"
            return None
        seq = int(digits)
        if seq > _MAX_SEQ:
            return None
        p = frame0.rfind(_PIXELS_SHM_AT)
        if p > j and (m := _SHM_TAIL.fullmatch(frame0, p)) is not None:
            h = self._fast_shm(frame0[j + 1:p], m, entry, seq)
            if h is not None:
                return h
        try:
            text = "{" + frame0[j + 1:].decode()
            obj, end = _scan(text, 0)
        except (StopIteration, UnicodeDecodeError, ValueError, RecursionError):
            return None
        if (end != len(text) and text[end:].strip()) or type(obj) is not dict \
                or not obj.keys() <= _TAIL_KEYS:
            return None
        meta = obj.get("meta")
        if meta is None:
            meta = {}
        elif type(meta) is not dict:
            return None
        try:
            coords = _coords(obj.get("coords", _EMPTY), self.limits)
            pixels = _pixels(obj.get("pixels"), entry[1], nframes)
        except ProtocolError:
            return None
        h = _new(FrameHeader)  # what FrameHeader(...) builds, without a frozen __init__
        fields = h.__dict__
        fields.update(entry[0])
        fields["seq"], fields["coords"], fields["meta"], fields["pixels"] = (
            seq, coords, meta, pixels)
        return cast(FrameHeader, h)

    def _fast_shm(self, part: bytes, m: re.Match[bytes], entry: tuple[dict[str, Any], int],
                  seq: int) -> FrameHeader | None:
        """The commonest header of all: a shared-memory frame whose coords and meta repeat.

        ``part`` is ``"coords":...,"meta":...``; once the same byte string comes a second time
        it is kept, validated, and reused (coords are frozen; meta is only reused when it holds
        scalars, and each header gets its own copy). The pixels member, matched exactly, gets
        every check :func:`_pixels` makes. None: anything else (the general path decides).

        A part seen once is remembered as bytes only. Most parts never repeat (each plate
        position comes once per run; a timestamp in meta makes every header unique), and
        keeping their parsed objects would carry thousands of them a second past the young
        garbage collections into the oldest generation, whose full collection then stalls
        napari's main thread (about 140 ms with napari's own objects, measured). Bytes are
        not tracked by the garbage collector.
        """
        parts = self._parts
        if part in parts:
            cached = parts[part]
        else:
            cached = self._learn_part(part)
            seen = self._seen_once
            if part in seen:
                if len(parts) >= 4 * self.max_entries:
                    parts.clear()
                parts[part] = cached
            else:
                if len(seen) >= 4 * self.max_entries:
                    seen.clear()
                seen.add(part)
        if cached is None:
            return None
        segment_b, offset_b, size_b, slot_b, gen_b = m.groups()
        size, gen, slot = int(size_b), int(gen_b), int(slot_b)
        offset = int(offset_b)
        if (size != entry[1] or gen % 2 or slot > 65535 or offset > _MAX_SEQ
                or gen > _MAX_SEQ):
            return None  # the general path words the rejection
        segment = self._segments.get(segment_b)
        if segment is None:
            text = segment_b.decode("ascii", "replace")
            if not SEGMENT_RE.fullmatch(text):
                return None
            if len(self._segments) >= self.max_entries:
                self._segments.clear()
            segment = self._segments[segment_b] = text
        ref = _new(ShmRef)
        ref.__dict__.update(segment=segment, offset=offset, nbytes=size, slot=slot,
                            generation=gen)
        h = _new(FrameHeader)
        fields = h.__dict__
        fields.update(entry[0])
        fields["seq"], fields["coords"], fields["meta"], fields["pixels"] = (
            seq, cached[0], dict(cached[1]), ref)
        return cast(FrameHeader, h)

    def _learn_part(self, part: bytes) -> tuple[Coords, dict[str, Any]] | None:
        """Validate ``"coords":...,"meta":...`` as the general path would, or None."""
        try:
            text = "{" + part.decode() + "}"
            obj, end = _scan(text, 0)
        except (StopIteration, UnicodeDecodeError, ValueError, RecursionError):
            return None
        if end != len(text) or type(obj) is not dict or not obj.keys() <= {"coords", "meta"}:
            return None
        meta = obj.get("meta")
        if meta is None:
            meta = {}
        if type(meta) is not dict or not all(type(v) in _SCALARS for v in meta.values()):
            return None
        try:
            return _coords(obj.get("coords", _EMPTY), self.limits), meta
        except ProtocolError:
            return None

    @staticmethod
    def _cacheable(key: tuple[bytes, bytes], tail: bytes) -> bool:
        """Whether ``key`` holds static members only, each once, seq at the top level."""
        for sentinel in (0, 1):
            try:
                pairs = json.loads(key[0] + b',"seq":%d' % sentinel + key[1] + b"}",
                                   object_pairs_hook=list)
            except (UnicodeDecodeError, ValueError, RecursionError):
                return False
            if type(pairs) is not list:
                return False
            names = [p[0] for p in pairs]
            seqs = [p[1] for p in pairs if p[0] == "seq"]
            if (len(set(names)) != len(names) or not _STATIC_KEYS.issuperset(names)
                    or seqs != [sentinel] or type(seqs[0]) is not int):
                return False
        try:
            obj = json.loads(b"{" + tail)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
        return type(obj) is dict and obj.keys() <= _TAIL_KEYS
