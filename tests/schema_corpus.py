"""JSON schemas written for the constrained-decoding tests: nested objects, arrays with
minItems/maxItems, enums, bounded integers and numbers, string patterns and lengths, required and
optional properties, $defs/$ref, anyOf. Every string and array is bounded, so that even a random model
completes each one within the tests' token budget."""
from __future__ import annotations

S = {"type": "string", "maxLength": 8}
I = {"type": "integer", "minimum": -50, "maximum": 50}

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": I}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"v": {"type": "null"}}, "required": ["v"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 100, "maximum": 999}}, "required": ["n"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": I, "minItems": 2, "maxItems": 4}},
     "required": ["xs"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}}, "required": ["s"]},
    {"type": "object", "properties": {"a": S, "b": I}, "required": ["a"]},
    {"type": "object", "properties": {"a": S, "b": I, "c": {"type": "boolean"}}, "required": ["a", "b", "c"]},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"x": I, "y": I},
                                                "required": ["x", "y"]}}, "required": ["inner"]},
    {"type": "object", "properties": {"l1": {"type": "object", "properties": {
        "l2": {"type": "object", "properties": {"l3": S}, "required": ["l3"]}}, "required": ["l2"]}},
     "required": ["l1"]},
    {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"name": S, "age": I}, "required": ["name", "age"]}}},
     "required": ["people"]},
    {"type": "array", "items": I, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
    {"type": "string", "maxLength": 6},
    {"type": "integer", "minimum": 1, "maximum": 5},
    {"type": "boolean"},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}}, "required": ["p"],
     "$defs": {"point": {"type": "object", "properties": {"x": I, "y": I}, "required": ["x", "y"]}}},
    {"type": "object", "properties": {"ps": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/p"}}},
     "required": ["ps"], "$defs": {"p": {"type": "object", "properties": {"id": I}, "required": ["id"]}}},
    {"type": "object", "properties": {"v": {"anyOf": [I, {"type": "boolean"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"v": {"anyOf": [S, {"type": "null"}]}}, "required": ["v"]},
    {"anyOf": [{"type": "object", "properties": {"cat": S}, "required": ["cat"]},
               {"type": "object", "properties": {"dog": I}, "required": ["dog"]}]},
    {"type": "object", "properties": {"status": {"const": "done"}, "n": I}, "required": ["status", "n"]},
    {"type": "object", "properties": {"grid": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}}},
     "required": ["grid"]},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"]},
    {"type": "object", "properties": {"opt": S}, "required": []},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 1000},
                                      "kind": {"enum": ["a", "b", "c"]},
                                      "meta": {"type": "object", "properties": {"k": S}, "required": ["k"]}},
     "required": ["id", "kind", "meta"]},
]
