"""The ``napari-hcs-stream`` command: open a listening viewer, run the demo, talk to a viewer.

Only ``viewer`` imports napari; every other subcommand runs on a machine without a GUI stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__


def _viewer(args: argparse.Namespace) -> int:
    from ._qt.launch import run_viewer

    return run_viewer(args.endpoint, title=args.title, keep_runs=args.keep_runs,
                      memory_cap_gib=args.memory_cap)


def _gib(text: str) -> float:
    """An argparse ``type`` for a memory cap: 0 (the default cap) or at least MIN_CAP_GIB."""
    from .assembler import parse_cap_gib

    try:
        return parse_cap_gib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def whole_number(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number from ``lo`` (to ``hi``), else a usage error."""
    span = f">= {lo}" if hi is None else f"from {lo} to {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text!r}")
        return value

    return parse


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _control(args: argparse.Namespace) -> int:
    from .publisher.viewer import ViewerManager

    manager = ViewerManager(args.endpoint)
    if args.command == "status":
        reply = manager.ping()
        if reply is None:
            print(f"no viewer answers on endpoint {args.endpoint!r}", file=sys.stderr)
            return 1
        reply["state"] = manager.state()
        if not args.json:
            print(format_status(reply))
            return 0
    elif args.command == "clear":
        reply = manager.clear(args.run)
    else:  # stop
        reply = manager.request("shutdown", close=True)
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok", False) else 1


def format_status(reply: dict[str, Any]) -> str:
    """A viewer's ping reply with its ``state`` in it, for a person to read."""
    from .labels import LOWERED_NOTE, human_bytes

    state = reply.get("state") or {}
    receiver = state.get("receiver") or {}
    lines = [f"viewer on {reply.get('endpoint')!r}: napari-hcs-stream {reply.get('version')} "
             f"(pid {reply.get('pid')}), protocol "
             f"{'.'.join(map(str, reply.get('protocol') or []))}, "
             f"{'listening' if reply.get('ready') else 'not ready'}"]
    if receiver.get("address"):
        lines.append(f"  data {receiver['address']}  control {receiver.get('control_address')}")
    layers = state.get("layers") or []
    keep = state.get("keep_runs") or 0
    step = state.get("downsample") or 1
    dropped = state.get("runs_dropped") or 0
    lines.append(
        f"  memory {human_bytes(state.get('nbytes', 0))} of "
        f"{human_bytes(state.get('max_bytes', 0))} in "
        f"{len(layers)} layers ({state.get('frames', 0)} frames); keep runs: {keep or 'all'}"
        f"{f' ({dropped} dropped)' if dropped else ''}; new layers at "
        f"{'full resolution' if step == 1 else f'1/{step}'}")
    for run in state.get("runs") or []:
        mine = [la for la in layers if la.get("run") == run]
        steps = sorted({la.get("downsample") or 1 for la in mine} - {1})
        lowered = LOWERED_NOTE if run in (state.get("lowered") or []) else ""
        lines.append(f"  run {run}: {len(mine)} layers, "
                     f"{sum(la.get('frames', 0) for la in mine)} frames"
                     f"{''.join(f', 1/{s}' for s in steps)}{lowered}")
    producers = receiver.get("producers") or {}
    if producers:
        lines.append(f"  {'producer':<28} {'received':>9} {'dropped':>8} {'torn':>5} "
                     f"{'rejected':>8} {'held back':>10}")
        for name, p in producers.items():
            closed = " (closed)" if p.get("closed") else ""
            lines.append(f"  {name[:28]:<28} {p.get('received', 0):>9} {p.get('dropped', 0):>8} "
                         f"{p.get('torn', 0):>5} {p.get('rejected', 0):>8} "
                         f"{p.get('waited_s', 0.0):>9.1f}s{closed}")
    if receiver.get("last_error"):
        lines.append(f"  last error: {receiver['last_error']}")
    return "\n".join(lines)


def _keys(args: argparse.Namespace) -> int:
    from . import auth

    try:
        if args.action == "authorize":
            path = auth.authorize(args.key, args.name)
            print(f"authorized: {path} (viewers read it when they start listening)")
            return 0
        public, _secret = auth.key_pair()
    except (auth.AuthError, OSError, RuntimeError) as exc:  # RuntimeError: a folder not ours
        print(f"error: {exc}", file=sys.stderr)
        return 1
    folder = auth.keys_dir()
    print(f"this machine's public key: '{public.decode()}'")
    print(f"  in {folder / 'id.key'} (its secret half: id.key_secret, never share that)")
    print("  - producers elsewhere use it to reach a viewer here: server_key= or "
          "NAPARI_HCS_STREAM_SERVER_KEY (the key, quoted, or a copy of id.key)")
    print("  - a viewer elsewhere admits producers from here after: napari-hcs-stream keys "
          "authorize '<this key>' (or a copy of id.key)")
    names = sorted(set(auth.authorized_keys().values()))
    print(f"authorized producers ({auth.authorized_dir()}): {', '.join(names) or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-hcs-stream",
        description="Stream high-content-screening pipeline results, live, into napari.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("viewer", help="open napari with the HCS Stream widget listening")
    p.add_argument("--endpoint", default="default",
                   help="endpoint name (default: %(default)s) or address such as tcp://127.0.0.1:5555")
    p.add_argument("--title", default=None, help="window title")
    p.add_argument("--keep-runs", type=whole_number(0), default=None, metavar="N",
                   help="keep only the newest N runs, clearing older ones once they are quiet "
                        "(0: every run; default: the plugin setting)")
    p.add_argument("--memory-cap", type=_gib, default=None, metavar="GIB",
                   help="the most memory streamed layers may take, in GiB; a run that needs "
                        "more is shown at a lower resolution (0: half this machine's memory; "
                        "default: the plugin setting)")
    p.set_defaults(func=_viewer)

    from .demo import add_demo_arguments

    p = sub.add_parser("demo", help="run a pipeline on a synthetic plate, streaming into napari")
    add_demo_arguments(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "keys", help="this machine's CURVE key, and producers authorized for viewers here",
        description="A viewer listening beyond loopback (tcp://0.0.0.0:PORT, a LAN address) "
                    "admits only producers whose key is authorized. Without arguments: print "
                    "this machine's public key (made on first use) and the authorized keys.")
    p.set_defaults(func=_keys, action="show")
    actions = p.add_subparsers(dest="action")
    actions.add_parser("show", help="print this machine's key and the authorized ones")
    a = actions.add_parser("authorize", help="admit a producer's key to viewers on this machine")
    a.add_argument("key", help="the producer machine's public key (40 characters, quoted) or "
                               "a copy of its id.key file")
    a.add_argument("--name", default=None, help="a name for it (file authorized/NAME.key)")

    for name, text in (("status", "ping a viewer and print its state"),
                       ("clear", "clear one run's layers (or all) in a viewer"),
                       ("stop", "ask a viewer to close")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--endpoint", default="default")
        if name == "status":
            p.add_argument("--json", action="store_true",
                           help="print the viewer's whole reply as JSON")
        if name == "clear":
            p.add_argument("--run", default=None, help="run id (default: every run)")
        p.set_defaults(func=_control)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)
