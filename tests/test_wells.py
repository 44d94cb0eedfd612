"""The well-filter grammar: every accepted form, every error, plate order, binding."""

from __future__ import annotations

import pickle

import pytest

from napari_hcs_stream.publisher.plate import plate_wells
from napari_hcs_stream.publisher.wells import ACCEPTED_FORMS, WellFilter, WellFilterError

P96 = plate_wells(96)
P1536 = plate_wells(1536)


def names(spec, mode=None, wells=P96):
    return WellFilter.parse(spec, mode=mode).apply(wells)


def test_first_n_in_plate_order():
    assert names(3) == ["A01", "A02", "A03"]
    assert names(14) == P96[:14]
    assert names("24") == P96[:24]  # a number given as text (command lines) is first N too
    assert names(" 2 ") == ["A01", "A02"]
    assert names(500) == P96  # more than the plate: every well


def test_first_n_exclude():
    assert names(90, mode="exclude") == P96[90:]


def test_first_n_of_a_sparse_plate_counts_its_wells():
    sparse = ["B02", "C07", "H12"]
    assert names(2, wells=sparse) == ["B02", "C07"]


def test_single_well_any_spelling():
    assert names("B03") == ["B03"]
    assert names("b3") == ["B03"]
    assert names("B003") == ["B03"]
    assert names("AF48", wells=P1536) == ["AF48"]


def test_list_of_names_keeps_plate_order():
    assert names(["H12", "A01", "c5"]) == ["A01", "C05", "H12"]
    assert names(("A01", "A02")) == ["A01", "A02"]


def test_range_along_a_row():
    assert names("A01:A12") == P96[:12]


def test_range_is_a_rectangle():
    got = names("A01:C03")
    assert got == ["A01", "A02", "A03", "B01", "B02", "B03", "C01", "C02", "C03"]


def test_range_corners_in_any_order():
    assert names("C03:A01") == names("A01:C03")
    assert names("A03:C01") == names("A01:C03")


def test_row_and_column():
    assert names("row:B") == [f"B{c:02d}" for c in range(1, 13)]
    assert names("ROW:h") == [f"H{c:02d}" for c in range(1, 13)]
    assert names("col:03") == [f"{r}03" for r in "ABCDEFGH"]
    assert names("col:3") == names("col:03")
    assert names("row:AF", wells=P1536) == [f"AF{c:02d}" for c in range(1, 49)]


def test_combination_is_a_union():
    got = names("row:A,col:12,B03:B05")
    expected = [w for w in P96 if w[0] == "A" or w.endswith("12") or w in ("B03", "B04", "B05")]
    assert got == expected
    assert len(got) == 12 + 7 + 3


def test_spaces_are_ignored_and_list_items_may_combine():
    assert names(" row:A , B03 ") == names("row:A,B03")
    assert names(["row:A,col:12", "B03:B05"]) == names("row:A,col:12,B03:B05")


def test_exclude_mode():
    got = names("row:A,col:01", mode="exclude")
    assert "A05" not in got and "C01" not in got and "B02" in got
    assert len(got) == 96 - 12 - 7


def test_contains():
    f = WellFilter.parse("row:B,col:03")
    assert "B07" in f and "b7" in f and "E03" in f
    assert "C04" not in f
    assert "not a well" not in f and 3 not in f
    ex = WellFilter.parse("row:B", mode="exclude")
    assert "B01" not in ex and "A01" in ex


def test_first_n_needs_the_plate_for_contains():
    f = WellFilter.parse(5)
    with pytest.raises(WellFilterError, match="plate's order"):
        _ = "A01" in f
    bound = f.bind(P96)
    assert "A05" in bound and "A06" not in bound
    assert bound.apply(P96) == P96[:5]
    ex = WellFilter.parse(5, mode="exclude").bind(P96)
    assert "A05" not in ex and "A06" in ex


def test_parse_keeps_a_filter_mode_unless_told():
    f = WellFilter.parse("row:A", mode="exclude")
    assert WellFilter.parse(f).mode == "exclude"
    assert WellFilter.parse(f, mode="include").mode == "include"


def test_filter_pickles_and_prints():
    f = WellFilter.parse("row:A,B03:C04", mode="exclude")
    assert pickle.loads(pickle.dumps(f)) == f  # noqa: S301 (our own bytes)
    assert "row:A" in str(f) and "all but" in str(f)
    assert repr(f) == "WellFilter('row:A,B03:C04', mode='exclude')"


@pytest.mark.parametrize(
    ("spec", "token"),
    [
        ("Z99", "Z99"),          # column 99 is past 48
        ("A00", "A00"),          # columns start at 1
        ("A49", "A49"),          # column 49 is past 48
        ("AG01", "AG01"),        # rows stop at AF
        ("foo", "foo"),
        ("B-3", "B-3"),
        ("row:", "row:"),
        ("row:1", "row:1"),
        ("row:AG", "row:AG"),
        ("col:X", "col:X"),
        ("col:0", "col:0"),
        ("col:49", "col:49"),
        ("A01:B02:C03", "A01:B02:C03"),
        ("A01:Q", "A01:Q"),
        ("A01,,B02", "''"),      # a stray comma: empty token
        ("row:A,5", "'5'"),      # a number only as the whole filter
        ("", "''"),
        (["A01", "nope"], "nope"),
    ],
)
def test_malformed_tokens_name_the_token_and_the_forms(spec, token):
    with pytest.raises(WellFilterError) as info:
        WellFilter.parse(spec)
    message = str(info.value)
    assert token in message
    assert ACCEPTED_FORMS in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("spec", [0, -3, "0"])
def test_first_n_must_be_positive(spec):
    with pytest.raises(WellFilterError, match="N > 0"):
        WellFilter.parse(spec)


@pytest.mark.parametrize("spec", [True, 3.5, {"A01"}, None, [1, 2]])
def test_wrong_types(spec):
    with pytest.raises(WellFilterError, match="accepted forms"):
        WellFilter.parse(spec)


def test_bad_mode():
    with pytest.raises(WellFilterError, match="'include' or 'exclude'"):
        WellFilter.parse("A01", mode="only")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "bad"),
    [("row:Q", "row:Q"), ("col:13", "col:13"), ("I01", "I01"), ("H12:I13", "H12:I13"),
     ("A01:A24", "A01:A24")],
)
def test_check_plate_rejects_what_the_plate_lacks(spec, bad):
    f = WellFilter.parse(spec)
    with pytest.raises(WellFilterError, match="outside this 96-well plate") as info:
        f.check_plate(8, 12)
    assert bad in str(info.value)
    f.check_plate(32, 48)  # fits a 1536-well plate


def test_check_plate_accepts_what_fits():
    WellFilter.parse("row:H,col:12,A01:H12").check_plate(8, 12)
    WellFilter.parse(1000).check_plate(8, 12)  # first N never names a well
