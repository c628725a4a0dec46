"""Validate response bodies against the official OpenAI schemas (openai-openapi.yaml).

    assert_schema(body, "CreateChatCompletionResponse")

$refs are resolved with `referencing`. The spec mixes OpenAPI 3.0's `nullable: true`
into 3.1 schemas; it is rewritten to JSON Schema (`type: [X, "null"]`) on load so a
JSON Schema validator reads it as the spec means it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[3] / "shared" / "data" / "openai-openapi.yaml"
URI = "urn:openai-openapi"


@functools.cache
def _registry() -> Registry:
    spec = _fix_nullable(yaml.safe_load(SPEC.read_text()))
    return Registry().with_resource(URI, Resource.from_contents(spec, DRAFT202012))


def _fix_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_fix_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _fix_nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "$ref" in node:
            return {"anyOf": [{"$ref": node.pop("$ref")}, {"type": "null"}], **node}
        if "type" in node:
            node["type"] = [node["type"], "null"]
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
    return node


def assert_schema(instance: Any, schema_name: str) -> None:
    """Fail unless `instance` matches the named schema (skip if the spec is absent)."""
    if not SPEC.exists():
        pytest.skip(f"the OpenAI spec {SPEC} is missing: cannot check response schemas")
    schema = {"$ref": f"{URI}#/components/schemas/{schema_name}"}
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path)
        raise AssertionError(f"{schema_name} at /{path}: {e.message}")
