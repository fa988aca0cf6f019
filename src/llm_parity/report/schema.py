"""The JSON Schema of the verdict that --parity-json writes, and a check against it.

The schema ships in the package (``data/verdict.schema.json``) so a dashboard can validate
what it ingests with the same file the project's tests use.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from typing import Any

from llm_parity.errors import VerdictSchemaError

SCHEMA_VERSION = 1  # a change that alters the meaning of a field raises it
SCHEMA_RESOURCE = "data/verdict.schema.json"



@lru_cache(maxsize=1)
def verdict_schema() -> dict[str, Any]:
    return json.loads(files("llm_parity").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8"))


def validate_verdict(data: Any) -> None:
    """Raise VerdictSchemaError naming each place where ``data`` breaks the schema."""
    try:
        import jsonschema
    except ImportError as exc:  # a test extra, not a runtime dependency
        raise ImportError("validating a verdict needs the jsonschema package "
                          "(pip install 'pytest-llm-parity[test]' or pip install jsonschema)"
                          ) from exc
    schema = verdict_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    version = data.get("schema_version") if isinstance(data, dict) else None
    lines = [f"the verdict does not match verdict.schema.json (schema_version "
             f"{SCHEMA_VERSION}; this verdict says {version!r}):"]
    for error in errors[:20]:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        lines.append(f"  {where}: {error.message}")
    if len(errors) > 20:
        lines.append(f"  ... and {len(errors) - 20} more")
    raise VerdictSchemaError("\n".join(lines))
