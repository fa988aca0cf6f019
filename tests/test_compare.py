"""`llm-parity compare OLD.json NEW.json`: what moved, and the exit status a CI job reads."""

from __future__ import annotations

import copy
import json
import re

import pytest
from synthetic import failed_session, make_session, performance_block

from llm_parity.cli import main
from llm_parity.report.compare import compare_verdicts
from llm_parity.report.verdict import clean, verdict_dict


def verdict(**kwargs):
    return clean(verdict_dict(make_session(**kwargs)))


@pytest.fixture(scope="module")
def good():
    data = verdict(steps=4)
    data["performance"] = performance_block()
    return data


@pytest.fixture(scope="module")
def bad():
    """The same prompts with a defect on p-01: top-1 rate, KL and p-01's own gates fail."""
    data = verdict(steps=4, defect_prompts=(1,))
    data["performance"] = performance_block()
    return data


def write(tmp_path, name, data, read_json):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    read_json(path)  # what compare reads is a valid verdict
    return str(path)


def run_cli(capsys, *args):
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_same_verdict_twice_moves_nothing(tmp_path, capsys, good, read_json):
    path = write(tmp_path, "a.json", good, read_json)
    code, out, _ = run_cli(capsys, path, path)
    assert code == 0
    assert out.splitlines()[0].startswith("verdict: pass -> pass")
    assert out.rstrip().endswith("no gate went from pass to fail")
    assert "REGRESSION" not in out and "Setup that changed" not in out


def test_a_gate_that_fails_now_is_a_regression(tmp_path, capsys, good, bad, read_json):
    code, out, _ = run_cli(capsys, write(tmp_path, "old.json", good, read_json),
                           write(tmp_path, "new.json", bad, read_json))
    assert code == 1
    assert out.splitlines()[0].startswith("verdict: pass -> fail")
    gate_line = next(line for line in out.splitlines()
                     if line.startswith("  top1_match_rate") and "->" in line)
    assert gate_line.split()[1:5] == [">=", "0.99", "1", "0.8333"]
    assert gate_line.endswith("pass -> FAIL  REGRESSION")
    assert "Per-prompt gates that now fail (REGRESSION):" in out
    assert "  p-01: top1_defect <= 0, 0 -> 1" in out
    assert "p-01: candidate top-1" in out and "match True -> False" in out
    assert "largest KL moves: p-01 " in out
    last = out.rstrip().splitlines()[-1]
    assert re.match(r"\d+ regression\(s\): ", last)
    assert "gate top1_match_rate" in last and "prompt gate top1_defect on p-01" in last


def test_a_fixed_gate_is_not_a_regression(good, bad):
    comparison = compare_verdicts(bad, good)
    assert comparison.exit_code == 0
    assert any("FAIL -> pass  fixed" in line for line in comparison.lines)
    assert "Per-prompt gates that now pass:" in comparison.lines


def test_a_gate_no_longer_judged_is_a_regression(good):
    new = copy.deepcopy(good)
    gate = next(g for g in new["gates"] if g["name"] == "sequence_kl_mean")
    new["gates"].remove(gate)
    new["not_judged"] = [{**{k: gate[k] for k in ("name", "metric", "aggregate", "bound",
                                                   "threshold", "over", "scope")},
                          "reason": "the depth views did not run (--continuation 0)",
                          "strict": False}]
    comparison = compare_verdicts(good, new)
    assert comparison.exit_code == 1
    assert comparison.regressions == ["gate sequence_kl_mean (not judged)"]
    assert any("pass -> not judged  REGRESSION (not judged: the depth views did not run"
               in line for line in comparison.lines)


def test_aggregate_moves_say_which_way_is_better(good, bad):
    lines = compare_verdicts(good, bad).lines
    rows = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()}
    assert rows["kl_mean"].endswith("worse")
    assert rows["top1_match_rate"].endswith("worse")
    back = compare_verdicts(bad, good).lines
    assert any(line.startswith("  kl_mean") and line.endswith("better") for line in back)


def test_performance_moves_and_gate_flips(good):
    slower = copy.deepcopy(good)
    slower["performance"] = performance_block(compiled_tpot=20.0)
    comparison = compare_verdicts(good, slower)
    assert comparison.exit_code == 1
    assert comparison.regressions == ["performance gate compiled_speedup"]
    text = "\n".join(comparison.lines)
    assert "Performance (medians):" in text
    row = next(line for line in comparison.lines
               if line.startswith("  compiled-in16-out50") and "TPOT ms" in line)
    assert row.split()[3:5] == ["14", "20"] and row.endswith("(+42.9%) worse")
    tok = next(line for line in comparison.lines
               if line.startswith("  compiled-in16-out50") and "tok/s" in line)
    assert tok.endswith("worse")


def test_setup_changes_are_listed(good):
    newer = copy.deepcopy(good)
    newer["environment"]["transformers"] = "4.52.0"
    newer["candidate"]["dtype"] = "float16"
    text = "\n".join(compare_verdicts(good, newer).lines)
    assert "Setup that changed:" in text
    assert "transformers  4.51.0" in text and "4.52.0" in text
    assert "hf cpu bfloat16" in text and "hf cpu float16" in text


def test_prompt_set_changes_are_flagged(good):
    fewer = copy.deepcopy(good)
    fewer["prompts"] = fewer["prompts"][:-1]
    text = "\n".join(compare_verdicts(good, fewer).lines)
    assert "prompt set changed: 0 added, 1 removed" in text


def test_a_new_run_that_did_not_finish_fails(tmp_path, capsys, good, read_json):
    error = clean(verdict_dict(failed_session("the candidate engine died")))
    code, out, _ = run_cli(capsys, write(tmp_path, "old.json", good, read_json),
                           write(tmp_path, "new.json", error, read_json))
    assert code == 1
    assert "the new run did not finish: the candidate engine died" in out
    assert "pass -> -" in out  # every gate is gone


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"verdict": "pass"}', "not an llm-parity verdict (no schema_version, gates, prompts)"),
    ('{"schema_version": 99, "verdict": "pass", "gates": [], "prompts": []}',
     "schema_version 99, but this llm-parity reads version 1"),
])
def test_unusable_files_exit_2_naming_the_file(tmp_path, capsys, good, read_json, content,
                                               message):
    old = write(tmp_path, "old.json", good, read_json)
    new = tmp_path / "new.json"
    if content is not None:
        new.write_text(content)
    code, out, err = run_cli(capsys, old, new)
    assert code == 2
    assert err.startswith(f"llm-parity compare: {new}: ")
    assert message in err


def test_top_must_be_positive(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["compare", "a.json", "b.json", "--top", "0"])
    assert caught.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
