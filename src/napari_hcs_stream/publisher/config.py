"""What a pipeline wants streamed and persisted, declared on steps and inherited.

A screen has many steps and most share the same viewer, wells and colours; repeating them on
every step is how configs drift apart. So every field may be left ``None`` ("inherit") and is
filled, field by field, from the pipeline's config and then from the global defaults:
the most specific value that is not ``None`` wins (step -> pipeline -> global). Mapping fields
(``modes``, ``colormaps``, ``channel_names``) merge key by key instead, so a step can add one
colormap without repeating the rest.

Configs are frozen: one config object is often shared by many steps, and a change through one
of them must not silently change the others (use :func:`dataclasses.replace`). Values are
checked when a config is built, so a wrong type or a malformed well filter fails where it was
written, not in a worker an hour later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from ..auth import AuthError, parse_key
from ..endpoints import EndpointError, check_name
from ..protocol import MAX_DOWNSAMPLE
from .wells import FilterMode, WellFilter

TRANSPORTS = ("auto", "shm", "frames")
WELL_FILTER_MODES = ("include", "exclude")
DISPLAY_MODES = ("stack", "layer")
COMPONENTS = ("well", "site", "channel", "z", "t")
OUTPUTS = ("all", "main", "checkpoint")
MATERIALIZATION_BACKENDS = ("disk", "zarr")

Transport = Literal["auto", "shm", "frames"]
Outputs = Literal["all", "main", "checkpoint"]
WellFilterSpec = int | str | Sequence[str] | WellFilter
_MERGE = {"merge": True}  # field metadata: a mapping merged key by key across levels

C = TypeVar("C", bound="StreamingConfig")


def _check_choice(owner: str, name: str, value: object, choices: Sequence[str]) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))} "
                         f"(or None to inherit), got {value!r}")


def _check_type(owner: str, name: str, value: object, kind: type | tuple[type, ...],
                what: str) -> None:
    # bool is an int: True is never a valid count, and 1 is never a valid flag
    wrong_bool = isinstance(value, bool) != (kind is bool)
    if value is not None and (not isinstance(value, kind) or wrong_bool):
        raise TypeError(f"{owner}.{name} must be {what} (or None to inherit), "
                        f"got {type(value).__name__} {value!r}")


def _check_mapping(owner: str, name: str, value: object, keys: tuple[type, ...],
                   choices: Sequence[str] | None = None) -> dict[Any, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{owner}.{name} must be a dict (or None to inherit), "
                        f"got {type(value).__name__} {value!r}")
    out: dict[Any, str] = {}
    for k, v in value.items():
        if not isinstance(k, keys) or isinstance(k, bool):
            raise TypeError(f"{owner}.{name} key {k!r} must be "
                            f"{' or '.join(t.__name__ for t in keys)}")
        if not isinstance(v, str):
            raise TypeError(f"{owner}.{name}[{k!r}] must be a string, got {v!r}")
        if choices is not None:
            if k not in COMPONENTS:
                raise ValueError(f"{owner}.{name} key {k!r} is not a component; "
                                 f"components are {', '.join(COMPONENTS)}")
            v = v.lower()
            if v not in choices:
                raise ValueError(f"{owner}.{name}[{k!r}] must be one of "
                                 f"{', '.join(map(repr, choices))}, got {v!r}")
        out[k] = v
    return out


@dataclass(frozen=True)
class StreamingConfig:
    """A step's wish to be watched live in some viewer; the base class of every viewer's config.

    Any attribute of a step holding an instance of this class (or of a subclass) is found at
    compile time: the attribute name does not matter, so other viewers can add their own config
    classes without the compiler knowing them.
    """

    #: which kind of viewer the config is for (one viewer is launched per kind and endpoint)
    viewer_kind: ClassVar[str] = "napari"

    enabled: bool | None = None
    #: a viewer name (``"default"``) or an explicit address (``"tcp://127.0.0.1:5555"``)
    endpoint: str | None = None
    #: the viewer outlives the run (the next run reuses it)
    persistent: bool | None = None
    well_filter: WellFilterSpec | None = None
    well_filter_mode: FilterMode | None = None
    #: strict delivery: publishing waits for the viewer and raises instead of dropping
    strict: bool | None = None
    transport: Transport | None = None
    #: which persisted outputs stream: the main output, the checkpoint, or both ("all")
    outputs: Outputs | None = None
    #: the viewer's public key (40 characters of Z85 text, or a key file) for a viewer on
    #: another machine, which requires CURVE (``napari-hcs-stream keys`` prints it there);
    #: None: ``$NAPARI_HCS_STREAM_SERVER_KEY``, or this machine's key for a viewer found here
    server_key: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("enabled", "persistent", "strict"):
            _check_type(owner, name, getattr(self, name), bool, "True or False")
        _check_type(owner, "endpoint", self.endpoint, str, "a viewer name or address")
        if self.endpoint is not None and "://" not in self.endpoint:
            try:
                check_name(self.endpoint)
            except EndpointError as exc:
                raise ValueError(f"{owner}.endpoint: {exc}") from None
        _check_choice(owner, "transport", self.transport, TRANSPORTS)
        _check_type(owner, "server_key", self.server_key, str,
                    "the viewer's public key (40 characters) or a key file")
        if self.server_key is not None:
            try:
                object.__setattr__(self, "server_key", parse_key(self.server_key).decode())
            except AuthError as exc:
                raise ValueError(f"{owner}.server_key: {exc}") from None
        _check_choice(owner, "well_filter_mode", self.well_filter_mode, WELL_FILTER_MODES)
        _check_choice(owner, "outputs", self.outputs, OUTPUTS)
        wf = self.well_filter
        if wf is not None and (isinstance(wf, bool)
                               or not isinstance(wf, (int, str, list, tuple, WellFilter))):
            raise TypeError(f"{owner}.well_filter must be an int (first N wells), a string "
                            f"such as 'A01:B12' or 'row:C', a list of such strings or a "
                            f"WellFilter (or None to inherit), got {type(wf).__name__} {wf!r}")
        if isinstance(wf, list):  # frozen means frozen: a list shared with the caller is not
            object.__setattr__(self, "well_filter", tuple(wf))
        if wf is not None:
            parsed = WellFilter.parse(wf)  # raises WellFilterError naming the bad token
            if (isinstance(wf, WellFilter) and self.well_filter_mode is not None
                    and parsed.mode != self.well_filter_mode):
                raise ValueError(
                    f"{owner}: the well filter {wf.spec!r} has mode {wf.mode!r} but "
                    f"well_filter_mode is {self.well_filter_mode!r}; set only one of them"
                )


@dataclass(frozen=True)
class NapariStreamingConfig(StreamingConfig):
    """Streaming into napari: how each component is shown and how channels look.

    ``modes`` maps a component (well, site, channel, z, t) to ``"stack"`` (a slider) or
    ``"layer"`` (separate layers); ``colormaps`` maps a channel name to a napari colormap;
    ``channel_names`` renames channels for display (key: channel name or 0-based index);
    ``downsample`` asks the viewer to keep every n-th pixel along the image axes (1 to 64;
    None everywhere: the viewer's own resolution setting decides).
    """

    viewer_kind: ClassVar[str] = "napari"

    modes: dict[str, str] | None = field(default=None, metadata=_MERGE)
    colormaps: dict[str, str] | None = field(default=None, metadata=_MERGE)
    channel_names: dict[str | int, str] | None = field(default=None, metadata=_MERGE)
    downsample: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _check_type(owner, "downsample", self.downsample, int,
                    f"a whole number from 1 (full resolution) to {MAX_DOWNSAMPLE}")
        if self.downsample is not None and not 1 <= self.downsample <= MAX_DOWNSAMPLE:
            raise ValueError(f"{owner}.downsample must be from 1 (full resolution) to "
                             f"{MAX_DOWNSAMPLE}, got {self.downsample}")
        object.__setattr__(self, "modes",
                           _check_mapping(owner, "modes", self.modes, (str,), DISPLAY_MODES))
        object.__setattr__(self, "colormaps",
                           _check_mapping(owner, "colormaps", self.colormaps, (str,)))
        object.__setattr__(self, "channel_names",
                           _check_mapping(owner, "channel_names", self.channel_names,
                                          (str, int)))


@dataclass(frozen=True)
class MaterializationConfig:
    """Write a copy of a step's output (a checkpoint) even when its main output stays in memory.

    ``backend`` None inherits the global default (``"disk"``); ``output_dir`` None writes under
    the step's (or the pipeline's) output folder.
    """

    backend: Literal["disk", "zarr"] | None = None
    output_dir: str | Path | None = None
    checkpoint: bool = True

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_choice(owner, "backend", self.backend, MATERIALIZATION_BACKENDS)
        _check_type(owner, "output_dir", self.output_dir, (str, Path), "a folder path")
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir))
        if not isinstance(self.checkpoint, bool):
            raise TypeError(f"{owner}.checkpoint must be True or False, got {self.checkpoint!r}")


def _builtin_streaming() -> NapariStreamingConfig:
    return NapariStreamingConfig(
        enabled=True,
        endpoint="default",
        persistent=True,
        well_filter=None,
        well_filter_mode="include",
        strict=False,
        transport="auto",
        outputs="all",
        modes={"well": "stack", "site": "stack", "channel": "layer", "z": "stack",
               "t": "stack"},
        colormaps={"DAPI": "blue", "Hoechst": "blue", "GFP": "green", "FITC": "green",
                   "RFP": "red", "TRITC": "red", "Cy3": "yellow", "Cy5": "magenta"},
        channel_names={},
    )


_BUILTIN = _builtin_streaming()


@dataclass(frozen=True)
class GlobalConfig:
    """The defaults every step inherits last; give a partial config to change only some.

    ``persist_final_step``: the last step's output is the pipeline's result, so the runner
    writes it to disk even when its backend is ``"memory"`` (and so it streams); set False to
    keep a memory final step in memory (then it streams nothing).
    """

    streaming: StreamingConfig = field(default_factory=_builtin_streaming)
    materialization: MaterializationConfig = field(
        default_factory=lambda: MaterializationConfig(backend="disk"))
    output_dir: str | Path | None = None
    persist_final_step: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.streaming, StreamingConfig):
            raise TypeError(f"GlobalConfig.streaming must be a StreamingConfig, "
                            f"got {self.streaming!r}")
        if not isinstance(self.materialization, MaterializationConfig):
            raise TypeError(f"GlobalConfig.materialization must be a MaterializationConfig, "
                            f"got {self.materialization!r}")
        _check_type("GlobalConfig", "output_dir", self.output_dir, (str, Path), "a folder path")
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", Path(self.output_dir))
        if not isinstance(self.persist_final_step, bool):
            raise TypeError("GlobalConfig.persist_final_step must be True or False")
        # a partial global config is completed from the built-in defaults, so that resolving
        # against it always yields a complete config
        object.__setattr__(self, "streaming",
                           _merge(type(self.streaming), [self.streaming, _BUILTIN], n_user=1))
        if self.materialization.backend is None:
            object.__setattr__(self, "materialization", MaterializationConfig(
                backend="disk", output_dir=self.materialization.output_dir,
                checkpoint=self.materialization.checkpoint))


def resolve(*levels: C | StreamingConfig | None, defaults: GlobalConfig | None = None) -> C:
    """Resolve ``levels`` (most specific first: step, pipeline) over the global defaults.

    Field by field, the first value that is not ``None`` wins; mapping fields merge key by
    key (the more specific key wins). The result is of the most specific level's class and
    its well filter is a parsed :class:`WellFilter` (or None: every well). The filter's mode
    comes from the most specific ``well_filter_mode`` set on a level; if none is set, from a
    :class:`WellFilter` object's own mode; else from the global default.
    """
    chain = [lvl for lvl in levels if lvl is not None]
    for lvl in chain:
        if not isinstance(lvl, StreamingConfig):
            raise TypeError(f"resolve() takes StreamingConfig levels, got {lvl!r}")
    base = (defaults or DEFAULTS).streaming
    cls = type(chain[0]) if chain else type(base)
    # the built-in defaults come last: a global config of a plainer class than the step's
    # (StreamingConfig for a napari step) still leaves no napari field unset
    return _merge(cls, [*chain, base, _BUILTIN], n_user=len(chain))  # type: ignore[return-value]


def _merge(cls: type[StreamingConfig], chain: list[StreamingConfig],
           n_user: int) -> StreamingConfig:
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.metadata.get("merge"):
            merged: dict[Any, str] | None = None
            for lvl in reversed(chain):
                part = getattr(lvl, f.name, None)
                if part is not None:
                    merged = {**(merged or {}), **part}
            values[f.name] = merged
        else:
            values[f.name] = next((v for lvl in chain
                                   if (v := getattr(lvl, f.name, None)) is not None), None)
    user_mode = next((lvl.well_filter_mode for lvl in chain[:n_user]
                      if lvl.well_filter_mode is not None), None)
    spec = values["well_filter"]
    if spec is None:
        values["well_filter_mode"] = user_mode or values["well_filter_mode"] or "include"
    else:
        own = spec.mode if isinstance(spec, WellFilter) else None
        mode = user_mode or own or values["well_filter_mode"] or "include"
        values["well_filter"] = WellFilter.parse(spec, mode=mode)
        values["well_filter_mode"] = mode
    return cls(**values)


#: the built-in global defaults (``GlobalConfig()``)
DEFAULTS = GlobalConfig()
