"""What a checkpoint directory must hold, checked on the path alone (nothing is loaded)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llm_parity.errors import ModelError

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Files that make a tokenizer: hashed into a golden store's key, copied into made checkpoints.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def is_local_reference(name: str) -> bool:
    """A name that can only mean a path (rather than an org/name hub id)."""
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.replace("/", "", 1)
        or not HUB_ID_RE.match(name)
        or Path(name).expanduser().exists()
    )


def check_checkpoint_dir(path: Path, label: str) -> None:
    """A directory with a readable config.json and at least one weight file."""
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelError(f"{label}: {path} {what}")
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except OSError:
        raise ModelError(f"{label}: {path} has no readable config.json; not a checkpoint") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{label}: {config} is not valid JSON: {exc}") from None
    if not weight_files(path):
        raise ModelError(
            f"{label}: {path} holds no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})"
        )


def weight_files(path: Path) -> list[Path]:
    return sorted(
        p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.name != "training_args.bin"
    )
