"""Prompt sets: the loader's accepted shapes and its errors, and the packaged sets."""

from __future__ import annotations

import json
import os
import re

import pytest

from llm_parity.config.prompts import load_prompts, packaged_prompts_path
from llm_parity.errors import PromptsError

MAX_PROMPT_TOKENS = 1950  # 2048 positions minus room for a 64-token continuation


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ------------------------------------------------------------------ accepted shapes


def test_json_object_with_prompts_list_keeps_ids_and_name(tmp_path):
    path = write(
        tmp_path,
        "set.json",
        {"name": "mine", "prompts": [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}]},
    )
    prompts = load_prompts(path)
    assert prompts.name == "mine"
    assert prompts.source == str(path)
    assert prompts.ids == ["a", "b"]
    assert [p.text for p in prompts.prompts] == ["one", "two"]
    assert len(prompts) == 2


def test_json_list_of_strings_gets_numbered_ids_and_file_stem_name(tmp_path):
    prompts = load_prompts(write(tmp_path, "plain.json", ["one", "two"]))
    assert prompts.name == "plain"
    assert prompts.ids == ["p001", "p002"]


def test_json_object_entry_without_id_is_numbered_by_position(tmp_path):
    prompts = load_prompts(write(tmp_path, "s.json", ["one", {"prompt": "two"}]))
    assert prompts.ids == ["p001", "p002"]


def test_jsonl_of_objects_and_strings_skips_blank_lines(tmp_path):
    content = '{"id": "x", "prompt": "one"}\n\n"two"\n'
    prompts = load_prompts(write(tmp_path, "s.jsonl", content))
    assert prompts.ids == ["x", "p002"]
    assert prompts.prompts[1].text == "two"


def test_txt_one_prompt_per_line_skipping_blanks_and_comments(tmp_path):
    prompts = load_prompts(write(tmp_path, "s.txt", "# header\n  first  \n\nsecond\n"))
    assert [p.text for p in prompts.prompts] == ["first", "second"]
    assert prompts.ids == ["p001", "p002"]


# ------------------------------------------------------------------ errors name the file


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.json", [], "empty"),
        ("empty.json", {"prompts": []}, "empty"),
        ("empty.txt", "# only a comment\n\n", "empty"),
        ("empty.jsonl", "\n", "empty"),
        ("dup.json", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "more than once"),
        ("bad-id.json", [{"id": "a b", "prompt": "x"}], "may hold only"),
        ("bad-id.json", [{"id": "a/b", "prompt": "x"}], "may hold only"),
        ("blank.json", [{"id": "a", "prompt": "   "}], "text is empty"),
        ("notstr.json", [{"id": "a", "prompt": 3}], "text is empty"),
        ("extra.json", [{"id": "a", "prompt": "x", "answer": "y"}], "expected keys"),
        ("number.json", [3], "expected a string or an object"),
        ("nolist.json", {"name": "x"}, "'prompts' list"),
        ("scalar.json", 5, "expected a list"),
        ("broken.json", "{not json", "not valid JSON"),
        ("broken.jsonl", '"ok"\n{nope\n', "not valid JSON"),
        ("set.yaml", "- a\n", "unknown prompt file type"),
    ],
)
def test_bad_prompt_file_is_refused_naming_the_file(tmp_path, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(PromptsError, match=re.escape(expected)) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_jsonl_error_names_the_line(tmp_path):
    path = write(tmp_path, "s.jsonl", '"ok"\n{nope\n')
    with pytest.raises(PromptsError, match=re.escape(f"{path}:2:")):
        load_prompts(path)


def test_missing_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(PromptsError, match=re.escape(f"{path}: cannot read")):
        load_prompts(path)


def test_directory_is_refused_naming_it(tmp_path):
    path = tmp_path / "dir.json"
    path.mkdir()
    with pytest.raises(PromptsError, match=re.escape(f"{path}: cannot read")):
        load_prompts(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_refused_naming_it(tmp_path):
    path = write(tmp_path, "locked.json", ["x"])
    path.chmod(0)
    try:
        with pytest.raises(PromptsError, match=re.escape(f"{path}: cannot read")):
            load_prompts(path)
    finally:
        path.chmod(0o644)


def test_undecodable_file_is_a_prompts_error_naming_it(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(PromptsError, match=re.escape(f"{path}: not UTF-8 text (byte 3")):
        load_prompts(path)


# ------------------------------------------------------------------ packaged sets


def test_default_is_the_founding_set_of_25():
    prompts = load_prompts()
    assert prompts.name == "rag25"
    assert len(prompts) == 25


RAG_ORDER = ("<|query_start|>", "<|query_end|>", "<|source_start|>")


def test_rag_long_loads_with_long_ids():
    prompts = load_prompts(packaged_prompts_path("rag_long"))
    assert prompts.name == "rag_long"
    assert 6 <= len(prompts) <= 12
    assert all(re.fullmatch(r"long-\d\d", i) for i in prompts.ids)
    data = json.loads(packaged_prompts_path("rag_long").read_text())
    assert "pydoc_data/topics.py" in data["description"]
    assert packaged_prompts_path("rag_long").stat().st_size < 200_000


@pytest.mark.parametrize("index", range(8))
def test_rag_long_follows_the_training_layout(index):
    text = load_prompts(packaged_prompts_path("rag_long")).prompts[index].text
    # One query, then numbered sources back to back, then the marker the model writes after.
    assert text.startswith("<|query_start|>")
    assert text.count("<|query_start|>") == text.count("<|query_end|>") == 1
    assert text.endswith("\n<|source_analysis_start|>")
    body = text[
        text.index("<|query_end|>\n") + len("<|query_end|>\n") : -len("<|source_analysis_start|>")
    ]
    sources = re.findall(
        r"<\|source_start\|><\|source_id_start\|>(\d+)<\|source_id_end\|>"
        r"([^<]+?): (.+?)<\|source_end\|>\n",
        body,
        flags=re.S,
    )
    assert len(sources) >= 2
    assert (
        "".join(
            f"<|source_start|><|source_id_start|>{i}<|source_id_end|>{n}: {b}<|source_end|>\n"
            for i, n, b in sources
        )
        == body
    )
    assert [int(i) for i, _, _ in sources] == list(range(1, len(sources) + 1))
    # The answer marker and the analysis text are the model's to write.
    for marker in ("<|answer_start|>", "<|source_analysis_end|>", "<|end_of_text|>"):
        assert marker not in text


def test_rag_long_token_lengths_span_short_to_near_the_context_limit():
    transformers = pytest.importorskip("transformers")
    from llm_parity.runner.toymodel import toy_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(toy_model_dir())
    prompts = load_prompts(packaged_prompts_path("rag_long"))
    lengths = [len(tokenizer(p.text)["input_ids"]) for p in prompts.prompts]
    ids = [tokenizer(p.text)["input_ids"] for p in prompts.prompts]
    assert all(i[0] == tokenizer.bos_token_id for i in ids)
    # The markers are single special tokens, not spelt out as text.
    analysis = tokenizer.convert_tokens_to_ids("<|source_analysis_start|>")
    assert all(i[-1] == analysis for i in ids)
    assert min(lengths) >= 300
    assert max(lengths) <= MAX_PROMPT_TOKENS
    assert min(lengths) <= 400 and max(lengths) >= 1800
    assert lengths == sorted(lengths)
