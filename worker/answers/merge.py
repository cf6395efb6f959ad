"""The chunk answers of a long document merged by rules read from the answer's JSON schema, so that a reduce
asks the model only about what the rules cannot decide: the conflicts, and nothing when there are none.

Most fields of a long document are stated in one chunk and null in the others, or stated alike in several; only
real disagreements need the model, and a long free text (`maxLength` >= 500, e.g. a summary) written differently
by several chunks is always one, since combining texts is a synthesis. The rules:

- scalars: nulls dropped, the rest agree when equal (numbers within a relative 1e-9, so 1200 and 1200.0 agree);
- objects: merged property by property, in the schema's order;
- arrays: concatenated in chunk order without duplicates; objects with a `name` are merged by name (case and
  whitespace ignored) and strings are deduplicated the same way; a merged array over `maxItems` is a conflict.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

Schema = dict[str, Any]

NUMBER_REL_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Conflict:
    """The values at `path` (e.g. "period.end", "segments[Cloud].revenue") that the rules cannot decide between:
    the distinct non-null ones, in chunk order."""

    path: str
    candidates: list[Any]


@dataclass(frozen=True)
class Merged:
    """The merged answer, where a conflicting field holds its first candidate, and the conflicts."""

    value: dict[str, Any]
    conflicts: list[Conflict]


def merge_answers(schema: Schema, answers: list[dict[str, Any]]) -> Merged:
    """The chunk answers, in chunk order, merged under `schema` (an object schema, `$defs` at its root)."""
    if not answers:
        raise ValueError("there are no answers to merge")
    merger = _Merger(schema)
    value = merger.object(merger.resolve(schema), copy.deepcopy(answers), "")
    return Merged(value, merger.conflicts)


def conflict_prompt_text(merged: Merged) -> str:
    """The input of a reduce that the model must finish: the merged answer and, one a line, each conflict."""
    text = "Merged answer:\n" + json.dumps(merged.value, ensure_ascii=False, separators=(",", ":"))
    if not merged.conflicts:
        return text
    lines = [f"- {c.path}: {json.dumps(c.candidates, ensure_ascii=False)}" for c in merged.conflicts]
    return text + "\n\nConflicting values (choose or combine; keep every stated fact):\n" + "\n".join(lines)


class _Merger:
    """One merge: the root schema, against which `$ref`s resolve, and the conflicts found so far."""

    def __init__(self, root: Schema) -> None:
        self.root = root
        self.conflicts: list[Conflict] = []

    def resolve(self, schema: Schema) -> Schema:
        """`schema` with `$ref`s followed and nullability dropped; {} (a scalar) for a union of several types."""
        while True:
            if "$ref" in schema:
                schema = self._lookup(schema["$ref"])
            elif "anyOf" in schema:
                branches = [branch for branch in schema["anyOf"] if branch.get("type") != "null"]
                if len(branches) != 1:
                    return {}
                schema = branches[0]
            else:
                break
        types = schema.get("type")
        if isinstance(types, list):
            non_null = [t for t in types if t != "null"]
            schema = {**schema, "type": non_null[0] if len(non_null) == 1 else None}
        return schema

    def _lookup(self, ref: str) -> Schema:
        if not ref.startswith("#"):
            raise ValueError(f"only a $ref within the schema can be resolved, not {ref!r}")
        node: Any = self.root
        for token in ref[1:].split("/")[1:]:
            node = node[token.replace("~1", "/").replace("~0", "~")]
        return node

    def merge(self, schema: Schema, values: list[Any], path: str) -> Any:
        schema = self.resolve(schema)
        present = [value for value in values if value is not None]
        if not present:
            return None
        # A value not of the schema's shape (an invalid answer) still counts: it is compared as a whole.
        if schema.get("type") == "object" and "properties" in schema and all(isinstance(v, dict) for v in present):
            return self.object(schema, present, path)
        if schema.get("type") == "array" and all(isinstance(v, list) for v in present):
            return self.array(schema, present, path)
        return self.scalar(present, path)

    def object(self, schema: Schema, objects: list[dict[str, Any]], path: str) -> dict[str, Any]:
        properties: dict[str, Schema] = schema.get("properties", {})
        # Keys the schema does not name are kept, after its own, rather than lost.
        extra = [key for key in dict.fromkeys(key for o in objects for key in o) if key not in properties]
        return {key: self.merge(properties.get(key, {}), [o.get(key) for o in objects], _join(path, key))
                for key in [*properties, *extra]}

    def array(self, schema: Schema, arrays: list[list[Any]], path: str) -> list[Any]:
        first_conflict = len(self.conflicts)
        items_schema = self.resolve(schema.get("items", {}))
        items = [item for array in arrays for item in array]
        if items_schema.get("type") == "object" and "name" in items_schema.get("properties", {}):
            merged = self.named(items_schema, items, path)
        elif items_schema.get("type") == "string":
            merged = _dedupe(items, lambda item: ("text", _fold(item)) if isinstance(item, str) else _canonical(item))
        else:
            merged = _dedupe(items, _canonical)
        limit = schema.get("maxItems")
        if limit is not None and len(merged) > limit:
            self.conflicts.insert(first_conflict, Conflict(path, [merged]))
            merged = merged[:limit]
        return merged

    def named(self, schema: Schema, items: list[Any], path: str) -> list[Any]:
        """Items with the same name merged as one object, under the first spelling of the name; the others
        (a null name, an invalid item) deduplicated as they are."""
        groups: dict[tuple[str, str], list[Any]] = {}
        for item in items:
            name = item.get("name") if isinstance(item, dict) else None
            key = ("name", _fold(name)) if isinstance(name, str) else ("item", _canonical(item))
            groups.setdefault(key, []).append(item)
        merged: list[Any] = []
        for (kind, _), group in groups.items():
            if kind == "name":
                name = group[0]["name"]
                merged.append(self.object(schema, [{**item, "name": name} for item in group], f"{path}[{name}]"))
            else:
                merged.append(group[0])
        return merged

    def scalar(self, values: list[Any], path: str) -> Any:
        distinct: list[Any] = []
        for value in values:
            if not any(_same(value, seen) for seen in distinct):
                distinct.append(value)
        if len(distinct) > 1:
            self.conflicts.append(Conflict(path, distinct))
        return distinct[0]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _same(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=NUMBER_REL_TOLERANCE)
    return _canonical(a) == _canonical(b)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def _dedupe(items: list[Any], key: Callable[[Any], Hashable]) -> list[Any]:
    """The first of each set of items with the same key, in order."""
    first: dict[Hashable, Any] = {}
    for item in items:
        first.setdefault(key(item), item)
    return list(first.values())
