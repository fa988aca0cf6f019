"""Golden reference stores: saved and replayed bit for bit, keyed, refused when stale,
never half-written, written row by row and read back mapped in float32. No engine: rows of
made-up logits through the real row builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm_parity.compare.answers import Decoded, next_token_from_logits
from llm_parity.compare.metrics import compare_position
from llm_parity.errors import StoreError
from llm_parity.runner import golden
from llm_parity.runner.golden import ReferenceStore, build_key, key_changes

VOCAB, K, STEPS = 50, 5, 4


def answers(seed=0, prompts=3, depth=2):
    rng = np.random.default_rng(seed)
    row = lambda: rng.normal(0, 4, VOCAB).astype(np.float32)  # noqa: E731
    first = [next_token_from_logits(row(), K) for _ in range(prompts)]
    decoded = []
    for _ in range(depth):
        steps = [next_token_from_logits(row(), K) for _ in range(STEPS)]
        decoded.append(Decoded([int(s.token_ids[0]) for s in steps], steps))
    return {"first": first, "decoded": decoded}


def key(**changes):
    base = dict(
        checkpoint_sha256="a" * 64, tokenizer_sha256="b" * 64,
        first_token=[("p1", [1, 2]), ("p2", [1, 3]), ("p3", [1, 4])],
        depth=[("p1", [1, 2]), ("long-1", [1, 5, 6])], continuation=STEPS,
        dtype="float32", device="cpu", versions={"torch": "2.13.0", "transformers": "5.19.0"},
    )
    base.update(changes)
    return build_key(**base)


def test_a_stored_reference_replays_bit_for_bit(tmp_path):
    live = answers()
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), live, {"backend": "hf", "device": "cpu", "dtype": "float32"})
    loaded, engine = store.load(key(), K)
    assert engine == {"backend": "hf", "device": "cpu", "dtype": "float32"}
    pairs = list(zip(live["first"], loaded["first"]))
    for a, b in zip(live["decoded"], loaded["decoded"]):
        assert a.token_ids == b.token_ids
        pairs += list(zip(a.steps, b.steps))
    candidate = next_token_from_logits(np.random.default_rng(9).normal(0, 4, VOCAB), K)
    for a, b in pairs:
        assert np.array_equal(a.full_logprobs, b.full_logprobs)
        assert np.array_equal(a.token_ids, b.token_ids)
        # Any candidate top-k gives the same metrics, tail mass included.
        m1 = compare_position(a.full_logprobs, candidate.token_ids, candidate.logprobs)
        m2 = compare_position(b.full_logprobs, candidate.token_ids, candidate.logprobs)
        assert m1 == m2


def test_size_is_four_bytes_per_vocabulary_entry_per_position(tmp_path):
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(), {})
    positions = 3 + 2 * STEPS
    size = store.data_path.stat().st_size
    assert positions * VOCAB * 4 <= size <= positions * VOCAB * 4 + 2048
    assert json.loads(store.key_path.read_text())["bytes_per_position"] == VOCAB * 4


@pytest.mark.parametrize("change, expected", [
    ({"checkpoint_sha256": "c" * 64}, "checkpoint_sha256: stored aaaaaaaaaaaa..., this run cccccccccccc..."),
    ({"versions": {"torch": "2.9.0", "transformers": "5.19.0"}}, "torch: stored 2.13.0, this run 2.9.0"),
    ({"continuation": 8}, "continuation: stored 4, this run 8"),
    ({"first_token": [("p1", [1, 2]), ("p2", [1, 3]), ("p9", [1, 4])]},
     "first token prompts: added p9; removed p3"),
    ({"depth": [("p1", [1, 2]), ("long-1", [1, 5, 7])]}, "depth prompts: the token ids differ"),
    # What changes the numbers as surely as the weights: the checkpoint's own code, whether
    # it may run, and the attention kernel.
    ({"trust_remote_code": True}, "trust_remote_code: stored False, this run True"),
    ({"code_sha256": "d" * 64}, "code_sha256: stored None, this run dddddddddddd..."),
    ({"attn_implementation": "sdpa"}, "attn_implementation: stored default, this run sdpa"),
])
def test_a_stale_store_is_refused_naming_what_changed_and_how_to_refresh(tmp_path, change,
                                                                          expected):
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(), {})
    with pytest.raises(StoreError) as info:
        store.load(key(**change), K)
    message = str(info.value)
    assert "is stale" in message and expected in message
    assert "--reference-store-update" in message


def test_equal_keys_have_no_changes():
    assert key_changes(key(), key()) == []


def test_a_failed_save_leaves_the_old_store_whole(tmp_path, monkeypatch):
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(seed=1), {})
    before = store.data_path.read_bytes()

    def disk_full(path, tensors, metadata):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(golden, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.save(key(continuation=9), answers(seed=2), {})
    assert store.data_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no staging left behind


def test_a_store_interrupted_mid_write_is_absent_not_half_written(tmp_path, monkeypatch):
    def interrupted(path, tensors, metadata):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM under the plugin (a KeyboardInterrupt)

    monkeypatch.setattr(golden, "write_safetensors", interrupted)
    store = ReferenceStore(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        store.save(key(), answers(), {})
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_a_store_interrupted_between_its_renames_comes_back_whole(tmp_path, monkeypatch):
    # Replacing a store is two renames (old aside, new in): a signal between them must not
    # leave no store at all where a whole one was.
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(seed=1), {})
    before = store.data_path.read_bytes()
    import os

    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        store.save(key(continuation=9), answers(seed=2), {})
    monkeypatch.undo()
    assert store.exists() and store.data_path.read_bytes() == before
    assert store.stored_key()["key"] == key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_noise_floor_interrupted_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(), {})

    class Floor:
        dtype, k = "bfloat16", K

        def to_dict(self):
            return {"views": {}}

    import os

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save_floor(key(), Floor())
    assert sorted(p.name for p in store.path.iterdir()) == ["key.json", "reference.safetensors"]


def test_a_reference_without_logits_cannot_be_stored(tmp_path):
    live = answers()
    row = live["first"][1]
    live["first"][1] = row.__class__(row.token_ids, row.logprobs, row.full_logprobs)
    store = ReferenceStore(tmp_path / "store")
    with pytest.raises(StoreError, match="kept no float32 logits"):
        store.save(key(), live, {})
    assert not store.path.exists()


def test_a_corrupt_store_is_a_clear_error(tmp_path):
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(), {})
    store.data_path.write_bytes(b"not safetensors")
    with pytest.raises(StoreError, match="reference.safetensors: unreadable"):
        store.load(key(), K)
    store.key_path.write_text("{")
    with pytest.raises(StoreError, match="key.json: unreadable"):
        store.load(key(), K)


def test_a_store_with_the_wrong_shape_is_refused(tmp_path):
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(depth=2), {})
    data = json.loads(store.key_path.read_text())
    data["key"] = key(depth=[("p1", [1, 2]), ("long-1", [1, 5, 6]), ("x", [1])])
    store.key_path.write_text(json.dumps(data))
    wanted = data["key"]
    with pytest.raises(StoreError, match="decoded_tokens has shape"):
        store.load(wanted, K)


def mapped(array) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = getattr(array, "base", None)
    return False


def test_a_stored_row_is_read_back_mapped_in_float32_bit_for_bit(tmp_path):
    live = answers()
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), live, {})
    loaded, _ = store.load(key(), K)
    for a, b in zip(live["first"] + live["decoded"][0].steps,
                    loaded["first"] + loaded["decoded"][0].steps):
        assert b.logits.dtype == np.float32
        assert mapped(b.logits)  # a view into the mapped file, not a copy
        assert a.logits.tobytes() == b.logits.tobytes()
        assert a.full_logprobs.tobytes() == b.full_logprobs.tobytes()
        assert np.array_equal(a.logprobs, b.logprobs)
    # Still an ordinary safetensors file for the library itself.
    from safetensors.numpy import load_file

    tensors = load_file(str(store.data_path))
    assert tensors["first_logits"].dtype == np.float32
    assert np.array_equal(tensors["first_logits"][2], live["first"][2].logits)


def test_writing_a_store_holds_one_row_at_a_time(tmp_path):
    import tracemalloc

    vocab, positions = 20_000, 60
    rng = np.random.default_rng(3)
    live = {"first": [next_token_from_logits(rng.normal(0, 4, vocab).astype(np.float32), K)
                      for _ in range(positions)], "decoded": []}
    store = ReferenceStore(tmp_path / "store")
    row_bytes = vocab * 4
    tracemalloc.start()
    try:
        store.save(key(first_token=[(f"p{i}", [1, i]) for i in range(positions)],
                       depth=[]), live, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A stacked copy would be 60 rows (4.8 MB); the writer holds a few rows' worth at most.
    assert peak < 4 * row_bytes, peak
    assert store.data_path.stat().st_size >= positions * row_bytes


def test_a_store_written_whole_by_safetensors_still_loads(tmp_path):
    # Stores written before the rows went one by one: the same file, read the same way.
    from safetensors.numpy import save_file

    live = answers()
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), live, {})
    save_file({"first_logits": np.stack([v.logits for v in live["first"]]),
               "decoded_tokens": np.array([d.token_ids for d in live["decoded"]]),
               "decoded_logits": np.stack([np.stack([s.logits for s in d.steps])
                                           for d in live["decoded"]])},
              str(store.data_path), metadata={"format": "1"})
    loaded, _ = store.load(key(), K)
    for a, b in zip(live["first"], loaded["first"]):
        assert a.full_logprobs.tobytes() == b.full_logprobs.tobytes()


def test_a_store_of_another_format_is_refused_naming_the_file(tmp_path):
    store = ReferenceStore(tmp_path / "store")
    store.save(key(), answers(), {})
    data = json.loads(store.key_path.read_text())
    data["key"]["format"] = 9
    store.key_path.write_text(json.dumps(data))
    with pytest.raises(StoreError) as info:
        store.load(key(), K)
    message = str(info.value)
    assert str(store.data_path) in message and "format 9" in message
    assert "rebuild it" in message and "--reference-store-update" in message
