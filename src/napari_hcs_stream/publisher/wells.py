"""Which wells stream: the well-filter grammar (first N, names, rectangles, rows, columns).

A screen of 384 or 1536 wells is too much to watch; users say which wells they want in a short
text, the way they talk about a plate (``"row:B"``, ``"A01:C03"``, ``"col:12"``). The text is
parsed once, when the config is built, so a typo fails before any worker starts, with a message
that names the bad token and lists the accepted forms.

Grammar (case-insensitive, spaces ignored)::

    spec    := N | token ("," token)*       N > 0: the first N wells in plate order
    token   := WELL                         one well: "B03", "b3", "AF48"
             | WELL ":" WELL                the rectangle with these two corners:
                                            "A01:C03" is rows A..C x columns 01..03
             | "row:" ROW                   a whole row: "row:B", "row:AF"
             | "col:" COL                   a whole column: "col:3", "col:03"

A list of tokens (or of comma-separated specs) is the union of its items. ``mode="exclude"``
keeps every well *not* selected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from ..labels import parse_well as _parse_any_well
from ..labels import row_name, well_name

MAX_ROWS = 32  # A..AF (1536-well plates)
MAX_COLS = 48

FilterMode = Literal["include", "exclude"]

ACCEPTED_FORMS = (
    "accepted forms: N (the first N wells in plate order, e.g. 24), a well 'B03', "
    "a rectangle 'A01:C03' (rows A..C x columns 01..03), a row 'row:B', a column 'col:03', "
    "comma-separated combinations such as 'row:A,col:12,B03:B05', or a list of these"
)


class WellFilterError(ValueError):
    """A well filter that cannot be parsed or does not fit the plate; the text says why."""


# -- well names (napari_hcs_stream.labels spells them; a filter also bounds them) ----------
_ROW_RE = re.compile(r"^[A-Za-z]{1,2}$")


def parse_well(name: str) -> tuple[int, int]:
    """``"B03"``, ``"b3"``, ``"AF48"`` -> 0-based (row, column) on a plate of at most
    32 x 48 wells; ValueError otherwise."""
    try:
        row, col = _parse_any_well(name)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    if row >= MAX_ROWS or col >= MAX_COLS:
        raise ValueError(f"{name!r} is outside the largest plate (rows A..AF, columns 01..48)")
    return row, col


def _row_index(row: str) -> int:
    """``"A"`` -> 0, ``"AF"`` -> 31; ValueError for anything else."""
    if not _ROW_RE.match(row):
        raise ValueError(f"{row!r} is not a row name (A..AF)")
    index = _parse_any_well(f"{row}1")[0]
    if index >= MAX_ROWS:
        raise ValueError(f"row {row.upper()!r} is outside A..AF")
    return index


# -- the filter ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WellFilter:
    """A parsed well selection. Immutable and picklable: it travels to workers with the plan.

    ``first`` (the first N wells) depends on the plate's order, so membership needs the plate:
    :meth:`apply` takes the plate's wells, and :meth:`bind` turns ``first`` into explicit wells
    before the filter is shipped to workers that test one well at a time with ``in``.
    """

    spec: str
    mode: FilterMode = "include"
    first: int | None = None
    wells: frozenset[tuple[int, int]] = frozenset()
    rows: frozenset[int] = frozenset()
    cols: frozenset[int] = frozenset()
    rects: tuple[tuple[int, int, int, int], ...] = ()  # (row0, row1, col0, col1), inclusive

    @classmethod
    def parse(cls, spec: int | str | Sequence[str] | WellFilter,
              mode: FilterMode | None = None) -> WellFilter:
        """Parse any accepted form; raise :class:`WellFilterError` naming the bad token.

        ``mode`` None keeps a given filter's own mode, and means ``"include"`` for text.
        """
        if mode is not None and mode not in ("include", "exclude"):
            raise WellFilterError(f"well filter mode must be 'include' or 'exclude', got {mode!r}")
        if isinstance(spec, WellFilter):
            return spec if mode is None else replace(spec, mode=mode)
        mode = mode or "include"
        if isinstance(spec, bool) or not isinstance(spec, (int, str, list, tuple)):
            raise WellFilterError(
                f"a well filter is an int, a string or a list of strings, got "
                f"{type(spec).__name__} {spec!r}; {ACCEPTED_FORMS}"
            )
        if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
            n = int(spec)
            if n <= 0:
                raise WellFilterError(f"the first N wells needs N > 0, got {spec!r}")
            return cls(spec=str(n), mode=mode, first=n)
        items = [spec] if isinstance(spec, str) else list(spec)
        tokens: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise WellFilterError(
                    f"bad well filter item {item!r} in {spec!r}: list items must be strings; "
                    f"{ACCEPTED_FORMS}"
                )
            tokens.extend(t.strip() for t in item.split(","))
        text = ",".join(tokens)
        wells: set[tuple[int, int]] = set()
        rows: set[int] = set()
        cols: set[int] = set()
        rects: list[tuple[int, int, int, int]] = []
        for token in tokens:
            _parse_token(token.replace(" ", ""), text, wells, rows, cols, rects)
        return cls(spec=text, mode=mode, wells=frozenset(wells), rows=frozenset(rows),
                   cols=frozenset(cols), rects=tuple(rects))

    # -- membership ---------------------------------------------------------------------------
    def _selects(self, row: int, col: int) -> bool:
        return (
            (row, col) in self.wells
            or row in self.rows
            or col in self.cols
            or any(r0 <= row <= r1 and c0 <= col <= c1 for r0, r1, c0, c1 in self.rects)
        )

    def __contains__(self, well: object) -> bool:
        if self.first is not None:
            raise WellFilterError(
                f"the filter {self.spec!r} (the first {self.first} wells) depends on the "
                "plate's order: use apply(wells) or bind(wells) first"
            )
        if not isinstance(well, str):
            return False
        try:
            row, col = parse_well(well)
        except ValueError:
            return False
        return self._selects(row, col) != (self.mode == "exclude")

    def apply(self, wells: Iterable[str]) -> list[str]:
        """The wells this filter keeps, in the order given (the plate's order)."""
        wells = list(wells)
        if self.first is not None:
            head = set(wells[: self.first])
            return [w for w in wells if (w in head) != (self.mode == "exclude")]
        return [w for w in wells if w in self]

    def bind(self, wells: Iterable[str]) -> WellFilter:
        """An equivalent filter without ``first``: N is resolved against the plate's wells."""
        if self.first is None:
            return self
        picked = frozenset(parse_well(w) for w in list(wells)[: self.first])
        return WellFilter(spec=self.spec, mode=self.mode, wells=picked)

    def check_plate(self, n_rows: int, n_cols: int) -> None:
        """Raise if the filter names a well, row or column the plate does not have.

        Selecting nothing because of a typo ("row:Q" on a 96-well plate) would look like a
        broken viewer, so it is an error, raised before any work is submitted.
        """
        bad: list[str] = []
        bad += [well_name(r, c) for r, c in sorted(self.wells) if r >= n_rows or c >= n_cols]
        bad += [f"row:{row_name(r)}" for r in sorted(self.rows) if r >= n_rows]
        bad += [f"col:{c + 1:02d}" for c in sorted(self.cols) if c >= n_cols]
        bad += [f"{well_name(r0, c0)}:{well_name(r1, c1)}" for r0, r1, c0, c1 in self.rects
                if r1 >= n_rows or c1 >= n_cols]
        if bad:
            raise WellFilterError(
                f"the well filter {self.spec!r} names {', '.join(bad)}, outside this "
                f"{n_rows * n_cols}-well plate (rows A..{row_name(n_rows - 1)}, "
                f"columns 01..{n_cols:02d})"
            )

    def __repr__(self) -> str:
        return f"WellFilter({self.spec!r}, mode={self.mode!r})"

    def __str__(self) -> str:
        return self.spec if self.mode == "include" else f"all but {self.spec}"


def _parse_token(token: str, spec: str, wells: set[tuple[int, int]], rows: set[int],
                 cols: set[int], rects: list[tuple[int, int, int, int]]) -> None:
    def fail(why: str) -> WellFilterError:
        return WellFilterError(f"bad well filter token {token!r} in {spec!r}: {why}; "
                               f"{ACCEPTED_FORMS}")

    if not token:
        raise fail("empty token (a stray comma?)")
    head, sep, tail = token.partition(":")
    key = head.lower()
    try:
        if sep and key in ("row", "rows"):
            rows.add(_row_index(tail))
        elif sep and key in ("col", "cols", "column"):
            if not tail.isdigit() or not 1 <= int(tail) <= MAX_COLS:
                raise ValueError(f"column {tail!r} is not a number in 01..{MAX_COLS}")
            cols.add(int(tail) - 1)
        elif sep:
            if ":" in tail:
                raise ValueError("a range has exactly two wells, such as 'A01:C03'")
            (r0, c0), (r1, c1) = parse_well(head), parse_well(tail)
            rects.append((min(r0, r1), max(r0, r1), min(c0, c1), max(c0, c1)))
        elif token.isdigit():
            raise ValueError("a number (the first N wells) must be the whole filter")
        else:
            wells.add(parse_well(token))
    except ValueError as exc:
        raise fail(str(exc)) from None

