"""The CLI reads and writes standard JSON only: no NaN or Infinity (cli/json_text.py)."""

from __future__ import annotations

import json

import pytest

from cli import json_text


@pytest.mark.parametrize("text", ["NaN", "[1, Infinity]", '{"a": -Infinity}'])
def test_reading_refuses_nan_and_infinity(text: str) -> None:
    with pytest.raises(ValueError, match="not standard JSON"):
        json_text.loads(text)


def test_reading_standard_json_is_unchanged() -> None:
    assert json_text.loads('{"a": [1, 2.5, null, "NaN"]}') == {"a": [1, 2.5, None, "NaN"]}


def test_writing_never_produces_nan() -> None:
    text = json_text.dumps({"out": [float("nan"), 1.5, {"x": float("-inf")}]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"wrote {c}")) == {
        "out": [None, 1.5, {"x": None}]
    }
    assert json_text.dumps([1, "a"], separators=(",", ":")) == '[1,"a"]'
