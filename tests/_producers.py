"""Producer processes for the viewer tests: real Publishers in spawned processes.

Pixel values encode where a frame belongs (:func:`value_of`), so a test can check every plane
of every layer without keeping the frames.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence

import numpy as np

CHANNELS = ("DAPI", "GFP", "Cy5")
SHAPE = (64, 64)


def value_of(well: str, site: int, channel: str) -> int:
    """1000 + 100 * row + column + 10 * site + channel index: unique per plane, never 0."""
    row = ord(well[0]) - ord("A")
    col = int(well[1:])
    return 1000 + 100 * row + col + 1000 * site + 3000 * CHANNELS.index(channel)


def plane_for(well: str, site: int, channel: str) -> np.ndarray:
    frame = np.full(SHAPE, value_of(well, site, channel), dtype=np.uint16)
    frame[:8, :8] = 0  # a corner that is not flat: contrast estimates need two values
    return frame


def produce(endpoint: str, runtime_dir: str, producer: str, wells: Sequence[str],
            sites: Sequence[int], run: str, results: mp.Queue) -> None:
    """Publish every (well, site, channel) plane, then report (producer, last seq, sent)."""
    import os

    os.environ["NAPARI_HCS_STREAM_RUNTIME_DIR"] = runtime_dir
    from napari_hcs_stream.publisher import Publisher

    sent = 0
    with Publisher(endpoint, run=run, producer=producer, connect_timeout=20.0,
                   send_timeout=2.0) as pub:
        for well in wells:
            for site in sites:
                for channel in CHANNELS:
                    sent += bool(pub.publish(plane_for(well, site, channel), well=well,
                                             site=site, channel=channel, source="plate"))
        results.put((producer, pub.last_seq, sent))


def start_producers(endpoint: str, runtime_dir: str, plan: dict[str, Sequence[str]],
                    sites: Sequence[int] = (1, 2), run: str = "plate1"
                    ) -> tuple[list[mp.Process], mp.Queue]:
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=produce, args=(endpoint, runtime_dir, name, wells, sites, run,
                                               results), daemon=True)
             for name, wells in plan.items()]
    for proc in procs:
        proc.start()
    return procs, results
