"""Constraints for the structured-output tests: 20 JSON schemas (nested objects, arrays, enums, patterns, required
and optional properties) and regexes, chosen so that a random-weight model often finishes them (enums, short
bounds) and sometimes runs out of tokens inside them (free strings)."""

from __future__ import annotations

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 2},
    {"enum": ["alpha", "beta", 7, None]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}}, "required": ["code"]},
    {"type": "string", "pattern": "^(yes|no)-[0-9]{2}$"},
    {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"enum": [True, False]}}, "required": ["b"]}},
        "required": ["a"],
    },
    {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "tag": {"enum": ["x", "y"]}},
        "required": ["id", "tag"],
    },
    {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "xy": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 2}},
        "required": ["kind", "xy"],
    },
    {"type": "object", "properties": {"opt": {"type": "boolean"}}},  # nothing required
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 4}, "admin": {"type": "boolean"}},
        "required": ["admin"],
    },
    {"type": "string", "maxLength": 3},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "boolean"},
    {"type": "null"},
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"q": {"enum": [1, 2]}}, "required": ["q"]},
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    {"anyOf": [{"type": "boolean"}, {"enum": ["none"]}]},
    {
        "type": "object",
        "properties": {"level": {"enum": ["low", "high"]}, "note": {"type": "string", "pattern": "^[a-z]{1,3}$"}},
        "required": ["level", "note"],
    },
]

REGEXES: list[str] = [
    r"[a-c]{3}-\d{2}",
    r"(cat|dog)s?",
    r"\d{1,3}(\.\d{1,2})?",
    r"[A-Z][a-z]{0,4}",
    r"(0|1){2,4}",
    r"id_[0-9a-f]{4}",
]
