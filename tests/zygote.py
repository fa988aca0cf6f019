"""A Python process that imports torch, Transformers and vLLM once, then forks one child per
suite run it is sent (conftest.Lane): each child changes to its run's directory, takes its
run's environment, runs `pytest.main` with its arguments and exits with pytest's status,
its output in a file. The run is the same real `pytest -m precision` a subprocess would
be; only the imports (about 20 s of a toy-model run on one core) are paid once per lane.

Nothing of the suite is imported here before the fork: every run loads the plugin, the
engines' plugins and its faults (LLM_PARITY_VLLM_FAULT) fresh, in its own child.

Protocol, one JSON object a line: {"args", "cwd", "env", "out"} in, {"ret"} out.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _child(request: dict) -> int:
    fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["pytest", *request["args"]]
    import pytest

    return int(pytest.main(request["args"]))


def main() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams  # noqa: F401
    except ImportError:
        pass
    import pytest  # noqa: F401

    requests = sys.stdin
    reply = sys.stdout
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                code = _child(request)
            except BaseException:  # noqa: BLE001  (a child never returns into the loop)
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"ret": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
