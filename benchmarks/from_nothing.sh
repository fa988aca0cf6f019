#!/usr/bin/env bash
# The README's first command from nothing (no store, vLLM's and inductor's compile caches
# empty, as a new user's are), with this checkout's code and with an earlier commit's,
# one after the other, the same venv. Run it on an idle machine.
#   bash benchmarks/from_nothing.sh MODEL_DIR [BEFORE_COMMIT] [WORK_DIR]
# Prints, per run: exit status, wall seconds, peak RSS; each run's output, verdict and
# report stay in WORK_DIR/{now,before}.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
model=$(cd "$1" && pwd)
before=${2:-2a0a730~1}  # the commit before the reference and floor were batched
work=${3:-$(mktemp -d)}
python=$repo/.venv/bin/python
[ -d "$work/before-src" ] || git -C "$repo" worktree add -q --detach "$work/before-src" "$before"
one() {
  name=$1 src=$2
  rm -rf "$work/$name" && mkdir -p "$work/$name" && cd "$work/$name" || exit 1
  start=$(date +%s)
  PYTHONPATH=$src VLLM_CACHE_ROOT=$work/$name/vllm-cache \
    TORCHINDUCTOR_CACHE_DIR=$work/$name/inductor-cache \
    /usr/bin/time -v "$python" -m pytest -m precision --model="$model" \
    --parity-report=report.md --parity-json=verdict.json > out.txt 2> time.txt
  rc=$?
  echo "$name: rc=$rc, $(( $(date +%s) - start )) s, $(grep 'Maximum resident' time.txt | tr -s ' \t' ' ')"
}
one now "$repo/src"
one before "$work/before-src/src"
git -C "$repo" worktree remove --force "$work/before-src"
