"""Golden references: the float32 reference computed once, saved, and replayed.

A store is a directory with two files:

- `key.json`: what the reference depends on (checkpoint and tokenizer hashes, the token
  ids of every prompt, the continuation length, the reference dtype and device, the
  torch and transformers versions). A run whose key differs refuses the store and says
  which fields changed.
- `reference.safetensors`: the reference's float32 logits at every compared position
  (first token, and each step of the greedy continuation), the very rows the live engine
  holds (compare/answers.py), and the continuation's tokens. Log-probs are rebuilt from the
  float32 logits by the same function the live engine uses, so a stored reference gives
  bit-identical metrics on any candidate top-k, tail mass included. Size: 4 bytes x
  vocabulary per compared position.

The data file is written row by row and read back memory-mapped in float32
(runner/tensorfile.py): a store of 1,100 positions at a 262,144-token vocabulary is
1.1 GB, and neither a stacked copy on save nor a float64 copy on load is made of it. It
is the same file as before that (format 1): older stores load as they are.

Safetensors holds plain arrays only: nothing in a store is executed or unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_parity.compare.answers import Decoded, NextToken, next_token_from_logits
from llm_parity.config.checkpoint import TOKENIZER_FILES
from llm_parity.errors import StoreError
from llm_parity.runner.tensorfile import Rows, dtype_name, read_safetensors, write_safetensors

FORMAT = 1
KEY_FILE = "key.json"
DATA_FILE = "reference.safetensors"
REFRESH_HINT = "rerun with --reference-store-update to recompute it, or point --reference-store elsewhere"


def tokenizer_hash(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def code_hash(model_dir: Path) -> str | None:
    """sha256 of the checkpoint's *.py files (its remote code), or None when it has none."""
    files = sorted(model_dir.glob("*.py"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def ids_hash(named_ids: Sequence[tuple[str, Sequence[int]]]) -> str:
    """sha256 of (prompt id, token ids) pairs: the prompts exactly as the engines see them."""
    text = json.dumps([[name, [int(t) for t in ids]] for name, ids in named_ids])
    return hashlib.sha256(text.encode()).hexdigest()


def build_key(
    *,
    checkpoint_sha256: str,
    tokenizer_sha256: str,
    first_token: Sequence[tuple[str, Sequence[int]]],
    depth: Sequence[tuple[str, Sequence[int]]],
    continuation: int,
    dtype: str,
    device: str,
    versions: Mapping[str, str | None],
    trust_remote_code: bool = False,
    code_sha256: str | None = None,
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """Everything a stored reference depends on; two runs with equal keys share it."""
    return {
        "format": FORMAT,
        "checkpoint_sha256": checkpoint_sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "first_token_prompts": ids_hash(first_token),
        "first_token_prompt_ids": [name for name, _ in first_token],
        "depth_prompts": ids_hash(depth),
        "depth_prompt_ids": [name for name, _ in depth],
        "continuation": int(continuation),
        "reference_dtype": dtype,
        "reference_device": device,
        "torch": versions.get("torch"),
        "transformers": versions.get("transformers"),
        # The checkpoint's own Python (trust_remote_code) and the attention kernel change
        # the numbers as surely as the weights do.
        "trust_remote_code": bool(trust_remote_code),
        "code_sha256": code_sha256,
        "attn_implementation": attn_implementation or "default",
    }


def key_changes(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Readable lines, one per field that differs."""
    changes = []
    for field in wanted:
        if field.endswith("_prompt_ids"):
            continue  # named through their hash field, with the ids that moved
        old, new = stored.get(field), wanted[field]
        if old == new:
            continue
        if field in ("first_token_prompts", "depth_prompts"):
            names = field.replace("_prompts", "_prompt_ids")
            before, after = stored.get(names) or [], wanted.get(names) or []
            added = [n for n in after if n not in before]
            removed = [n for n in before if n not in after]
            detail = []
            if added:
                detail.append("added " + ", ".join(added[:5]) + ("..." if len(added) > 5 else ""))
            if removed:
                detail.append("removed " + ", ".join(removed[:5])
                              + ("..." if len(removed) > 5 else ""))
            changes.append(f"{field.replace('_', ' ')}: "
                           + ("; ".join(detail) if detail else "the token ids differ"))
        else:
            changes.append(f"{field}: stored {_short(old)}, this run {_short(new)}")
    return changes


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text


class ReferenceStore:
    """One directory holding one reference."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    @property
    def data_path(self) -> Path:
        return self.path / DATA_FILE

    def exists(self) -> bool:
        return self.key_path.is_file() and self.data_path.is_file()

    def stored_key(self) -> dict[str, Any]:
        try:
            data = json.loads(self.key_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.key_path}: unreadable reference store key ({exc}); "
                             f"{REFRESH_HINT}") from None
        if not isinstance(data, dict) or not isinstance(data.get("key"), dict):
            raise StoreError(f"{self.key_path}: not a reference store key; {REFRESH_HINT}")
        return data

    def check(self, key: Mapping[str, Any]) -> dict[str, Any]:
        """Refuse a store made for other inputs, naming every field that changed; return
        the stored key file otherwise."""
        meta = self.stored_key()
        stored = meta["key"]
        _check_format(stored.get("format"), self.data_path)
        changes = key_changes(stored, key)
        if changes:
            raise StoreError(
                f"reference store {self.path} was made for other inputs and is stale:\n  "
                + "\n  ".join(changes) + f"\n{REFRESH_HINT}"
            )
        return meta

    def load(self, key: Mapping[str, Any], k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(answers, engine description) as the live reference engine would give them."""
        meta = self.check(key)
        tensors = self.read_tensors()
        expected = {"first_logits": (len(key["first_token_prompt_ids"]),)}
        if key["depth_prompt_ids"]:
            expected["decoded_tokens"] = (len(key["depth_prompt_ids"]), key["continuation"])
            expected["decoded_logits"] = (len(key["depth_prompt_ids"]), key["continuation"])
        for name, leading in expected.items():
            if name not in tensors or tensors[name].shape[: len(leading)] != leading:
                got = tensors[name].shape if name in tensors else "nothing"
                raise StoreError(f"{self.data_path}: {name} has shape {got}, expected leading "
                                 f"dimensions {leading}; {REFRESH_HINT}")
        # Each view keeps its row as a view into the mapped file: the pages are the file's.
        answers: dict[str, Any] = {
            "first": [next_token_from_logits(row, k) for row in tensors["first_logits"]],
        }
        if key["depth_prompt_ids"]:
            answers["decoded"] = [
                Decoded([int(t) for t in tokens], [next_token_from_logits(r, k) for r in rows])
                for tokens, rows in zip(tensors["decoded_tokens"], tensors["decoded_logits"])
            ]
        return answers, dict(meta.get("engine", {}))

    def save(self, key: Mapping[str, Any], answers: Mapping[str, Any],
             engine: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        """Write the store whole, or leave what was there. `extra` goes into the key file
        beside the key (a shard's prompt ranges). The rows go to the file one by one."""
        first: list[NextToken] = list(answers["first"])
        decoded: list[Decoded] = answers.get("decoded") or []
        vocab = _vocabulary(first + [s for d in decoded for s in d.steps])
        tensors: dict[str, np.ndarray | Rows] = {
            "first_logits": Rows("F32", (len(first), vocab), (v.logits for v in first)),
        }
        if decoded:
            steps = len(decoded[0].steps)
            if any(len(d.steps) != steps or len(d.token_ids) != steps for d in decoded):
                raise StoreError("the reference's continuations differ in length; a store "
                                 "holds one continuation length")
            tensors["decoded_tokens"] = np.array([d.token_ids for d in decoded], dtype=np.int64)
            tensors["decoded_logits"] = Rows(
                "F32", (len(decoded), steps, vocab), (s.logits for d in decoded for s in d.steps))
        self.write(tensors, {"key": dict(key), "engine": dict(engine), **(extra or {})})

    def read_tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the data file, memory-mapped read-only, in its stored dtype."""
        try:
            tensors, metadata = read_safetensors(self.data_path)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.data_path}: unreadable ({exc}); {REFRESH_HINT}") from None
        _check_format(metadata.get("format"), self.data_path)
        return tensors

    def write(self, tensors: Mapping[str, np.ndarray | Rows], meta: Mapping[str, Any]) -> None:
        """A temp directory, then a rename: a store is whole or absent, never half written,
        also when a signal (Ctrl-C, a cancelled CI job) lands mid-write: the staging
        directory goes, and a store being replaced comes back."""
        meta = {**meta, "bytes_per_position": int(tensors["first_logits"].shape[1] * 4)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        retired, moved = self.path.with_name(f".{self.path.name}.old"), False
        try:
            write_safetensors(staging / DATA_FILE, tensors, metadata={"format": str(FORMAT)})
            (staging / KEY_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            os.chmod(staging, 0o755)  # mkdtemp's owner-only modes would hide a shared store
            for written in staging.iterdir():
                os.chmod(written, 0o644)
            if self.path.exists():
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(self.path, retired)
                moved = True
                os.replace(staging, self.path)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, self.path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if moved and not self.path.exists():
                os.replace(retired, self.path)  # stopped between the two renames
            raise

    def floor_path(self, dtype: str, k: int) -> Path:
        return self.path / f"noise_floor-{dtype}-top{k}.json"

    def load_floor(self, key: Mapping[str, Any], dtype: str, k: int) -> Any:
        """The stored noise floor for this dtype and top-k, or None when there is none yet."""
        from llm_parity.compare.noise_floor import NoiseFloor

        path = self.floor_path(dtype, k)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable noise floor ({exc}); {REFRESH_HINT}") from None
        if data.get("key") != dict(key):
            return None  # measured for another reference: measure again, then overwrite
        try:
            return NoiseFloor.from_dict(data["floor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path}: malformed noise floor ({exc}); {REFRESH_HINT}") from None

    def save_floor(self, key: Mapping[str, Any], floor: Any) -> None:
        path = self.floor_path(floor.dtype, floor.k)
        staging = path.with_name(path.name + ".tmp")
        try:
            staging.write_text(json.dumps({"key": dict(key), "floor": floor.to_dict()})
                               + "\n", encoding="utf-8")
            os.replace(staging, path)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise


def _check_format(found: Any, path: Path) -> None:
    if str(found) != str(FORMAT):
        raise StoreError(
            f"{path}: a reference store of format {found}; this llm-parity reads format "
            f"{FORMAT}: rebuild it ({REFRESH_HINT}; or llm-parity reference build)")


def _vocabulary(views: Sequence[NextToken]) -> int:
    """The one row length of every view, each with its float32 logits."""
    sizes = set()
    for view in views:
        if view.logits is None or view.logits.dtype != np.float32:
            raise StoreError("the reference engine kept no float32 logits; it cannot be stored")
        sizes.add(view.logits.shape)
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise StoreError(f"the reference's logits rows have shapes {sorted(sizes)}, "
                         "expected one vocabulary")
    return int(next(iter(sizes))[0])


# ---------------------------------------------------------------- shards

# Key fields that name the prompts: a shard holds a range of them; every other field must
# be the same in every shard of one store.
PROMPT_FIELDS = ("first_token_prompts", "first_token_prompt_ids", "depth_prompts",
                 "depth_prompt_ids")


def reference_store(settings, reference_model, card, token_ids, depth, spec):
    """(store, key) for --reference-store, or (None, None)."""
    if settings.reference_store is None:
        return None, None
    from llm_parity.engines.base import engine_class
    from llm_parity.runner.environment import package_version
    from llm_parity.runner.models import checkpoint_hash

    key = build_key(
        checkpoint_sha256=checkpoint_hash(reference_model.path),
        tokenizer_sha256=tokenizer_hash(reference_model.path),
        first_token=[(p.id, ids) for p, ids in zip(settings.prompts.prompts, token_ids)],
        depth=[(p.id, ids) for p, ids in zip(*depth)] if depth else [],
        continuation=settings.continuation if depth else 0,
        dtype=spec.dtype,
        device=engine_class("hf").compute_device(spec),  # where it runs, not what was asked
        versions={"torch": package_version("torch"),
                  "transformers": package_version("transformers")},
        trust_remote_code=settings.trust_remote_code,
        code_sha256=code_hash(reference_model.path),
        attn_implementation=spec.options.get("attn_implementation"),
    )
    return ReferenceStore(settings.reference_store), key


def shard_range(count: int, index: int, shards: int, grain: int = 1) -> range:
    """The contiguous share of `count` items that shard `index` (from 0) of `shards` holds,
    cut at multiples of `grain` (the hf engines' batch: each shard then computes the very
    batches the whole list is computed in)."""
    blocks = -(-count // grain)
    return range(min(count, blocks * index // shards * grain),
                 min(count, blocks * (index + 1) // shards * grain))


def merge_stores(out: Path, parts: Sequence[Path]) -> dict[str, Any]:
    """One store from the shards of one reference (each built with `--shard I/N`), in shard
    order: the prompt ranges joined, the logits concatenated, the noise floors of each
    dtype and top-k that every shard has merged. Refuses shards whose keys disagree on any
    other field, naming it, and an incomplete or repeated set of shards."""
    stores = [ReferenceStore(Path(p)) for p in parts]
    metas = []
    for store in stores:
        if not store.exists():
            raise StoreError(f"{store.path}: not a reference store (no {KEY_FILE} and "
                             f"{DATA_FILE})")
        meta = store.stored_key()
        _check_format(meta["key"].get("format"), store.path)
        if not isinstance(meta.get("shard"), dict):
            raise StoreError(f"{store.path}: a whole store, not a shard (build shards with "
                             "llm-parity reference build --shard I/N)")
        metas.append(meta)
    counts = {m["shard"]["count"] for m in metas}
    if len(counts) != 1:
        raise StoreError("the shards were cut in different numbers: "
                         + ", ".join(f"{s.path} is {m['shard']['index'] + 1}/{m['shard']['count']}"
                                     for s, m in zip(stores, metas)))
    count = counts.pop()
    indexes = sorted(m["shard"]["index"] for m in metas)
    if indexes != list(range(count)):
        missing = sorted(set(range(count)) - set(indexes))
        repeated = sorted({i for i in indexes if indexes.count(i) > 1})
        raise StoreError(f"shards of {count}: "
                         + "; ".join(filter(None, [
                             missing and "missing " + ", ".join(f"{i + 1}/{count}" for i in missing),
                             repeated and "given twice " + ", ".join(f"{i + 1}/{count}"
                                                                     for i in repeated)])))
    order = sorted(range(len(stores)), key=lambda i: metas[i]["shard"]["index"])
    stores, metas = [stores[i] for i in order], [metas[i] for i in order]
    base = metas[0]["key"]
    for store, meta in zip(stores[1:], metas[1:]):
        fields = [f for f in {**base, **meta["key"]} if f not in PROMPT_FIELDS
                  and base.get(f) != meta["key"].get(f)]
        if fields:
            field = fields[0]
            raise StoreError(
                f"shards {stores[0].path} and {store.path} disagree on {field} "
                f"({_short(base.get(field))} and {_short(meta['key'].get(field))}): they are "
                "shards of different references and cannot be merged"
                + (f" (also: {', '.join(fields[1:])})" if len(fields) > 1 else ""))
    first = [tuple(item) for m in metas for item in m["shard"]["first_token"]]
    depth = [tuple(item) for m in metas for item in m["shard"]["depth"]]
    key = dict(base)
    key.update(first_token_prompts=ids_hash(first),
               first_token_prompt_ids=[name for name, _ in first],
               depth_prompts=ids_hash(depth), depth_prompt_ids=[name for name, _ in depth])
    parts_tensors = [s.read_tensors() for s in stores]
    tensors = {}
    for name in dict.fromkeys(n for t in parts_tensors for n in t):  # a shard may have no depth
        found = [t[name] for t in parts_tensors if name in t]
        head = found[0]
        if any(t.shape[1:] != head.shape[1:] or t.dtype != head.dtype for t in found):
            raise StoreError(f"shards hold {name} of shapes "
                             f"{', '.join(str(t.shape) for t in found)}: they cannot be joined")
        # Row by row from the mapped shards: the merged tensor is never whole in memory.
        tensors[name] = Rows(dtype_name(head.dtype), (sum(len(t) for t in found),
                                                       *head.shape[1:]),
                             (row for t in found for row in t))
    merged = ReferenceStore(Path(out))
    merged.write(tensors, {"key": key, "engine": metas[0].get("engine", {}),
                           "merged_from": [str(s.path) for s in stores]})
    floors = []
    for path in sorted(stores[0].path.glob("noise_floor-*.json")):
        found = [s.path / path.name for s in stores]
        if not all(p.is_file() for p in found):
            continue
        datas = [json.loads(p.read_text(encoding="utf-8")) for p in found]
        floor = datas[0]["floor"]
        for data in datas[1:]:
            for view, prompts in data["floor"]["views"].items():
                floor["views"].setdefault(view, {}).update(prompts)
            for view, margins in data["floor"].get("flip_margins", {}).items():
                floor.setdefault("flip_margins", {}).setdefault(view, []).extend(margins)
        (merged.path / path.name).write_text(json.dumps({"key": key, "floor": floor}) + "\n",
                                             encoding="utf-8")
        floors.append(path.name)
    return {"store": str(merged.path), "shards": len(stores), "first_token_prompts": len(first),
            "depth_prompts": len(depth), "noise_floors": floors}
