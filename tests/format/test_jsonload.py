"""``sparkbridge.format.jsonload.loads`` is ``json.loads``, faster: for every document, the same
value (types included) or the same exception. The differences of the compiled parser are the
cases below: each must come out as the standard library decides it."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkbridge.format.jsonload import loads


def same(a, b) -> bool:
    """Equal JSON values of equal types (NaN equals NaN; 1 and 1.0 and True differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


EDGES = [
    b'{"a": 1, "a": 2}',  # a repeated key: the last one wins
    b'[NaN, Infinity, -Infinity]',  # not JSON, but json.loads reads them
    b'[1e400, -1e400, 1e-400, -0.0, -0, 0.1, 1.7976931348623157e308, 5e-324]',
    b'[18446744073709551615, 18446744073709551616, -9223372036854775809, 123456789012345678901234567890]',
    b'["\\ud800", "\\udc00x", "\\ud83d\\ude00", "\xc3\xa9", "\\u00e9"]',  # lone surrogates: json keeps them
    '{"é": "ü"}'.encode("utf-16"),  # json.loads detects UTF-16 and UTF-32 bytes
    '{"k": [1, 2]}'.encode("utf-32-le"),
    b'\xef\xbb\xbf{"bom": true}',  # a UTF-8 byte-order mark
    b' \t\r\n{"ws" : [ ] } \n',
    b'{"nested": ' + b"[" * 200 + b"]" * 200 + b"}",
    b'{"shards": [{"samples": 16, "raw_data": {"basename": "w/a.mds", "bytes": 280, "hashes": {}}}], "version": 2}',
    '"\u2028\u2029"'.encode(),
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8: json.loads decodes bytes with surrogatepass
]

BROKEN = [
    b"", b"{", b'{"a": 1,}', b"[1 2]", b'{"a"}', b"nul", b'"\x01"', b"\xff\xfe\x00", b'{"a": 1} x', b"01",
    b"[" * 300 + b"]" * 299,
    b"[" * 3000 + b"]" * 3000,  # deeper than the recursion limit: RecursionError, as json.loads raises it
]


def outcome(parse, doc):
    """What parsing ``doc`` gives: its value, or its exception's type and message."""
    try:
        return ("value", parse(doc))
    except Exception as exc:  # noqa: BLE001 - whatever json.loads raises, loads must raise too
        return ("error", type(exc), str(exc))


def same_outcome(doc) -> bool:
    got, expected = outcome(loads, doc), outcome(json.loads, bytes(doc) if isinstance(doc, memoryview) else doc)
    if got[0] == "value" and expected[0] == "value":
        return same(got[1], expected[1])
    return got == expected


@pytest.mark.parametrize("doc", EDGES, ids=range(len(EDGES)))
def test_the_same_value_as_json_loads(doc):
    assert outcome(json.loads, doc)[0] == "value"
    assert same_outcome(doc)
    assert same_outcome(memoryview(doc))
    assert same_outcome(doc.decode("utf-8", "replace"))


@pytest.mark.parametrize("doc", BROKEN, ids=range(len(BROKEN)))
def test_the_same_error_as_json_loads(doc):
    assert outcome(json.loads, doc)[0] == "error"
    assert same_outcome(doc)
    assert same_outcome(memoryview(doc))


values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(values, st.booleans())
def test_every_value_json_dumps_writes_reads_back_as_json_loads_reads_it(value, ascii_only):
    doc = json.dumps(value, ensure_ascii=ascii_only)
    for form in (doc, doc.encode("utf-8", "surrogatepass")):  # (a lone surrogate written raw: not UTF-8)
        assert same_outcome(form)
