"""Prompt sets split across pytest-xdist workers: each worker runs the candidate on its
share of the prompts, and every process reads all shares back, in prompt order, so each
judges the same gates on all prompts and the controller writes one verdict.

The float32 reference and the noise floor come from a golden store that exists before the
workers start (`llm-parity reference build`); only candidate answers travel here, through
a private directory the controller makes (owner-only) and removes at the end. The files
are pickles written and read by this run's own processes, nothing else.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_parity.errors import EngineError
from llm_parity.runner.golden import shard_range

WAIT_S = 6 * 3600.0  # a worker that has not written its share by then is taken as lost
# A worker that has not even announced itself by then never started (a worker announces
# itself when pytest configures it, seconds after the run starts).
START_S = 60.0


class Exchange:
    """One process's view of the exchange: a worker (index, count) computes and writes its
    share; the controller (index None) only reads."""

    def __init__(self, path: Path, count: int, index: int | None = None,
                 wait_s: float = WAIT_S) -> None:
        self.path, self.count, self.index, self.wait_s = Path(path), count, index, wait_s

    def answers(self, name: str, settings: Any, token_ids: list, depth: Any, sequences: list,
                compute: Callable[..., tuple[dict, dict]]) -> tuple[dict, dict]:
        """This configuration's candidate answers on every prompt, in order: this worker's
        share computed by `compute(settings, token_ids, depth, sequences)`, the others'
        read back once they are written."""
        if self.index is not None:
            self._write(name, self.index, self._share(settings, token_ids, depth, sequences,
                                                       compute))
        parts = [self._read(name, i) for i in range(self.count)]
        answers: dict[str, list] = {}
        for part in parts:
            for view, values in part["answers"].items():
                answers.setdefault(view, []).extend(values)
        info = dict(parts[0]["info"])
        info["workers"] = self.count
        return answers, info

    def _share(self, settings, token_ids, depth, sequences, compute) -> dict[str, Any]:
        from dataclasses import replace

        from llm_parity.config.prompts import PromptSet

        # An hf candidate's shares fall on its batch grid: its answers are those of one
        # process, bit for bit. Other backends batch on their own: shares even.
        grain = settings.batch if settings.candidate == "hf" else 1
        first = shard_range(len(token_ids), self.index, self.count, grain)
        prompts = settings.prompts
        mine = replace(settings, prompts=PromptSet(prompts.name, prompts.source,
                                                   tuple(prompts.prompts[i] for i in first)))
        ids = [token_ids[i] for i in first]
        part_depth, part_sequences = None, []
        if depth:
            rows = shard_range(len(depth[1]), self.index, self.count, grain)
            part_depth = ([depth[0][i] for i in rows], [depth[1][i] for i in rows])
            part_sequences = [sequences[i] for i in rows]
        try:
            answers, info = compute(mine, ids, part_depth, part_sequences)
        except Exception as exc:  # the others must hear of it, not wait for it
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"answers": answers, "info": info}

    def _file(self, name: str, index: int) -> Path:
        return self.path / f"{name}-{index}.pickle"

    def _pid_file(self, index: int) -> Path:
        return self.path / f"worker-{index}.pid"

    def announce(self) -> None:
        """A worker writes its process id, so the others can see it die."""
        assert self.index is not None
        staging = self._pid_file(self.index).with_suffix(".tmp")
        staging.write_text(str(os.getpid()))
        os.replace(staging, self._pid_file(self.index))

    def lost(self, index: int, waited: float) -> str | None:
        """Why worker `index` will never write its share, if it will not."""
        pid_file = self._pid_file(index)
        if not pid_file.is_file():
            # The controller reads once the workers are done: one that never announced
            # itself never started.
            return (f"worker gw{index} of {self.count} did not start within {START_S:.0f} s"
                    if waited > START_S or self.index is None else None)
        pid = int(pid_file.read_text() or 0)
        if not process_alive(pid):
            return (f"worker gw{index} of {self.count} (pid {pid}) ended before it shared its "
                    "candidate answers")
        return None

    def _write(self, name: str, index: int, data: dict[str, Any]) -> None:
        target = self._file(name, index)
        staging = target.with_name(target.name + ".tmp")
        with open(staging, "wb") as f:
            pickle.dump(data, f)
        os.replace(staging, target)

    def _read(self, name: str, index: int) -> dict[str, Any]:
        path = self._file(name, index)
        started = time.monotonic()
        while not path.is_file():
            waited = time.monotonic() - started
            lost = self.lost(index, waited)
            if lost and not path.is_file():  # it may have written just before it ended
                raise EngineError(f"{lost} (configuration {name})")
            if waited > self.wait_s:
                raise EngineError(f"worker {index} of {self.count} never wrote its share of "
                                  f"configuration {name} ({path})")
            time.sleep(0.2)
        with open(path, "rb") as f:
            data = pickle.load(f)  # written by this run's own worker, in a private directory
        if "error" in data:
            raise EngineError(f"worker {index} of {self.count}: {data['error']}")
        return data


def process_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, ended but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter after the command name in /proc/PID/stat
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")

