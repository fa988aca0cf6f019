"""Prompt sets: the packaged founding set, or a user's file (.json, .jsonl or .txt)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from llm_parity import DATA_DIR
from llm_parity.errors import PromptsError

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")



@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


@dataclass(frozen=True)
class PromptSet:
    name: str
    source: str
    prompts: tuple[Prompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]


def packaged_prompts_path(name: str = "rag25") -> Path:
    return DATA_DIR / "prompts" / f"{name}.json"


def load_prompts(path: Path | str | None = None) -> PromptSet:
    """Load a prompt set; every entry needs non-empty text and a unique, id-safe id.

    Accepted shapes: a JSON list of strings or of {"id", "prompt"} objects, a JSON object
    with a "prompts" list of those, JSON Lines of either, or plain text with one prompt per
    line (blank lines and lines starting with # skipped).
    """
    path = Path(path) if path is not None else packaged_prompts_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptsError(f"{path}: cannot read the prompt file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise PromptsError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.end]!r})"
        ) from exc
    name = path.stem
    if path.suffix == ".txt":
        entries: list = [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
    elif path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PromptsError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptsError(f"{path}: not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            name = data.get("name", name)
            if "prompts" not in data:
                raise PromptsError(f"{path}: expected a 'prompts' list in the JSON object")
            data = data["prompts"]
        if not isinstance(data, list):
            raise PromptsError(f"{path}: expected a list of prompts, got {type(data).__name__}")
        entries = data
    else:
        raise PromptsError(
            f"{path}: unknown prompt file type {path.suffix!r}; expected .json, .jsonl or .txt"
        )
    prompts = [_entry(path, i, e) for i, e in enumerate(entries)]
    if not prompts:
        raise PromptsError(f"{path}: the prompt set is empty; give at least one prompt")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise PromptsError(f"{path}: prompt id {p.id!r} appears more than once")
        seen.add(p.id)
    return PromptSet(name=str(name), source=str(path), prompts=tuple(prompts))


def _entry(path: Path, index: int, entry: object) -> Prompt:
    if isinstance(entry, str):
        prompt_id, text = f"p{index + 1:03d}", entry
    elif isinstance(entry, dict):
        unknown = set(entry) - {"id", "prompt"}
        if "prompt" not in entry or unknown:
            raise PromptsError(
                f"{path}: entry {index}: expected keys 'prompt' and optional 'id', "
                f"got {sorted(entry)}"
            )
        prompt_id, text = str(entry.get("id", f"p{index + 1:03d}")), entry["prompt"]
    else:
        raise PromptsError(
            f"{path}: entry {index}: expected a string or an object, got {type(entry).__name__}"
        )
    if not isinstance(text, str) or not text.strip():
        raise PromptsError(f"{path}: entry {index} ({prompt_id}): the prompt text is empty")
    if not _ID_RE.match(prompt_id):
        raise PromptsError(
            f"{path}: entry {index}: id {prompt_id!r} may hold only letters, digits and _.:-"
        )
    return Prompt(prompt_id, text)
