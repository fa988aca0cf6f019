"""The verdict's JSON Schema: it ships, it is valid, and every verdict the suite writes
matches it (the read_json fixture checks the verdicts of the end-to-end tests too)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
from synthetic import failed_session, make_session, performance_block, write_session_outputs

from llm_parity.errors import VerdictSchemaError
from llm_parity.report.schema import SCHEMA_VERSION, validate_verdict, verdict_schema
from llm_parity.report.verdict import clean, verdict_dict

jsonschema = pytest.importorskip("jsonschema")

SPEC_FIELDS = ("verdict", "model", "candidate", "aggregate", "gates", "prompts", "environment")


def verdict(**kwargs):
    return clean(verdict_dict(make_session(**kwargs)))


@pytest.fixture(scope="module")
def full():
    """A failing run with every kind of entry: defects, near-ties, depth, a divergence."""
    return verdict(defect_prompts=(1,), near_tie_prompts=(2,), steps=6, diverge={0: 2})


def test_the_schema_ships_with_the_package_and_is_valid_draft_2020_12():
    schema = verdict_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
    assert set(SPEC_FIELDS) | {"schema_version"} <= set(schema["required"])


@pytest.mark.parametrize("kind", ["pass", "fail with depth", "error"])
def test_every_kind_of_verdict_matches(kind, full):
    data = {"pass": lambda: verdict(), "fail with depth": lambda: full,
            "error": lambda: clean(verdict_dict(failed_session()))}[kind]()
    validate_verdict(data)
    assert data["verdict"] == kind.split()[0]


def test_the_written_file_matches(tmp_path, read_json):
    session = make_session(steps=4)
    session.settings = replace(session.settings, parity_json=tmp_path / "v.json")
    write_session_outputs(session)
    data = read_json(tmp_path / "v.json")  # the fixture validates it
    assert data["schema_version"] == SCHEMA_VERSION


def _declared(schema, node):
    """Property names a subschema declares (following one $ref)."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_every_field_the_verdict_has_is_typed_in_the_schema(full):
    """'Type what exists': a field added to verdict_dict must be added to the schema too."""
    schema = verdict_schema()
    defs = schema["$defs"]
    checks = [("", full, schema)]
    checks += [("prompts[]", p, defs["prompt"]) for p in full["prompts"]]
    checks += [("gates[]", g, defs["gate"]) for g in full["gates"]]
    checks += [(f"{key}[]", e, defs["depth"]) for key in ("sequences", "decodes")
               for e in full[key]]
    for key in ("model_card", "environment", "protocol"):
        checks.append((key, full[key], schema["properties"][key]))
    checks += [("candidate", full["candidate"], defs["engine"])]
    for where, value, node in checks:
        undeclared = set(value) - set(_declared(schema, node)["properties"])
        assert not undeclared, (f"verdict field(s) {sorted(undeclared)} under {where or 'top'} "
                                "are not typed in src/llm_parity/data/verdict.schema.json")


@pytest.mark.parametrize("field", SPEC_FIELDS + ("schema_version",))
def test_each_spec_field_is_required(field, full):
    data = copy.deepcopy(full)
    del data[field]
    with pytest.raises(VerdictSchemaError, match=f"'{field}' is a required property"):
        validate_verdict(data)


@pytest.mark.parametrize("breakage, where", [
    (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
    (lambda d: d.__setitem__("verdict", "passed"), "verdict"),
    (lambda d: d["prompts"][0].__setitem__("kl", "0.1"), "prompts/0/kl"),
    (lambda d: d["prompts"][0].__setitem__("top1_match", 1), "prompts/0/top1_match"),
    (lambda d: d["gates"][0].__setitem__("bound", "between"), "gates/0/bound"),
    (lambda d: d["gates"][0].pop("threshold"), "gates/0"),
    (lambda d: d["aggregate"].__setitem__("top1_match_rate", 1.5), "aggregate/top1_match_rate"),
    (lambda d: d["aggregate"].pop("kl_mean"), "aggregate"),
    (lambda d: d["candidate"].pop("dtype"), "candidate"),
    (lambda d: d["sequences"][0]["kl"].append("x"), "sequences/0/kl/6"),
    (lambda d: d["environment"].__setitem__("checkpoint_sha256", "abc"),
     "environment/checkpoint_sha256"),
    (lambda d: d.__setitem__("prompts", []), "prompts"),
])
def test_a_broken_verdict_is_refused_with_the_place_named(breakage, where, full):
    data = copy.deepcopy(full)
    breakage(data)
    with pytest.raises(VerdictSchemaError) as caught:
        validate_verdict(data)
    assert f"  {where}: " in str(caught.value)


def test_unmeasurable_values_are_null_and_allowed(full):
    data = copy.deepcopy(full)
    data["prompts"][0]["top1_margin"] = None  # inf margin, cleaned to null
    data["gates"][0]["value"] = None  # a gate that could not be measured
    validate_verdict(data)


def test_later_additions_do_not_break_it(full):
    data = copy.deepcopy(full)
    data["performance"] = performance_block()
    data["golden"] = {"path": "golden/ref.npz"}
    data["prompts"][0]["positions"] = [{"kl": 0.1}]
    validate_verdict(data)
    data["performance"]["cases"][0]["tpot_ms"] = "fast"
    with pytest.raises(VerdictSchemaError, match="performance/cases/0/tpot_ms"):
        validate_verdict(data)


def test_the_verdicts_read_by_the_tests_are_checked(tmp_path, read_json, full):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(full))
    assert read_json(good)["verdict"] == "fail"
    bad = copy.deepcopy(full)
    bad["gates"][0]["passed"] = "yes"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(VerdictSchemaError, match="gates/0/passed"):
        read_json(path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"anything": 1}))  # not a verdict: read as it is
    assert read_json(other) == {"anything": 1}
