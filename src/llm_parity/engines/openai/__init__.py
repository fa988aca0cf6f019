"""A deployed OpenAI-compatible server as the candidate (`vllm serve`, vLLM-Ascend, ...).

The server path is part of what is tested: its HTTP layer, tokenizer and sampling defaults.
Token ids go out as prompts, so the server scores exactly the reference's ids, and
log-probs come back keyed by token id (vLLM's `return_tokens_as_token_ids`, and the native
`prompt_logprobs`), never by decoded text, where distinct tokens can collide.

Standard library only (urllib, threads): the plugin's core install stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from llm_parity.compare.answers import Decoded, NextToken
from llm_parity.engines.base import Engine, EngineSpec, Timing
from llm_parity.engines.openai.client import (
    DEFAULT_API_KEY_ENV,
    Client,
    Secret,
    StreamTiming,
    check_server_url,
    error_detail,
    excerpt,
)
from llm_parity.errors import EngineError

# --candidate-option keys this backend reads, with their defaults.
OPTION_DEFAULTS: dict[str, Any] = {
    "timeout": 120.0,  # seconds for one request, connection to last byte
    "retries": 2,  # extra attempts after a connection error (never after a timeout)
    "concurrency": 8,  # requests in flight at once
    "served_model": None,  # use this served model id, skipping the name check
}
# Greedy and nothing else: a server's own defaults (generation_config.json, --override-
# generation-config) must not change which token is chosen. The extras are vLLM's.
GREEDY = {
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "seed": 0,
    "ignore_eos": True,
    "return_tokens_as_token_ids": True,
}
TOKEN_ID_PREFIX = "token_id:"
_T = TypeVar("_T")


def _checkpoint_vocab_size(path: str | None) -> int | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (TypeError, OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    from llm_parity.families import text_config

    size = text_config(config).get("vocab_size")  # nested in a multimodal config
    return size if isinstance(size, int) and size > 0 else None


def _device(spec: EngineSpec) -> str:
    return spec.device if spec.device != "auto" else "remote"


def _names_of_model(*names: str | None) -> set[str]:
    """Full names and last path components, lower-cased: what a served id may match."""
    found = set()
    for name in names:
        if name:
            name = name.rstrip("/")
            found.update({name.lower(), name.rsplit("/", 1)[-1].lower()})
    return found


class OpenAIEngine(Engine):
    backend = "openai"
    known_options = tuple(OPTION_DEFAULTS)

    @classmethod
    def preflight(cls, spec: EngineSpec) -> str:
        """Reachable, and serving the checkpoint under test, before the reference loads.
        Returns the device: "remote", unless --candidate-device says where the server runs."""
        cls._served_card(cls._client(spec), spec)
        return _device(spec)

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        unknown = set(spec.options) - set(OPTION_DEFAULTS)
        if unknown:
            raise EngineError(f"{spec.role}: unknown --candidate-option {', '.join(sorted(unknown))}"
                              f" (this backend reads: {', '.join(OPTION_DEFAULTS)})")
        options = {**OPTION_DEFAULTS, **spec.options}
        self.concurrency = max(1, int(options["concurrency"]))
        self.client = self._client(spec)
        card = self._served_card(self.client, spec)
        self.served_model = str(card["id"])
        self.max_model_len = card.get("max_model_len")
        self.vocab_size = _checkpoint_vocab_size(spec.tokenizer or spec.model)
        self.server_version = self._server_version()
        self.prompt_logprobs_via: str | None = None  # "prompt_logprobs" or "echo", once known
        self.tokenizer_check = "not run"
        self._prompt_names: dict[tuple[int, ...], str] = {}

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _client(spec: EngineSpec) -> Client:
        if not spec.url:
            raise EngineError(f"{spec.role}: the openai backend needs --candidate-url")
        try:
            root = check_server_url(spec.url)
        except ValueError as exc:
            raise EngineError(f"{spec.role}: {exc}") from None
        options = {**OPTION_DEFAULTS, **spec.options}
        key_env = spec.api_key_env or DEFAULT_API_KEY_ENV
        return Client(root, Secret(os.environ.get(key_env)), key_env, spec.role,
                       timeout=float(options["timeout"]), retries=max(0, int(options["retries"])))

    @staticmethod
    def _served_card(client: Client, spec: EngineSpec) -> dict[str, Any]:
        """The /v1/models entry of the checkpoint under test, or a clear refusal."""
        answer = client.call("GET", "/v1/models")
        cards = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(cards, list) or not all(isinstance(c, dict) and "id" in c
                                                  for c in cards):
            raise EngineError(f"{spec.role}: GET {client.root}/v1/models did not list models "
                              f"in the OpenAI shape: {excerpt(json.dumps(answer))}")
        served = [str(c["id"]) for c in cards]
        asked = spec.options.get("served_model")
        if asked:
            for card in cards:
                if card["id"] == asked:
                    return card
            raise EngineError(f"{spec.role}: the server at {client.root} does not serve "
                              f"{asked!r} (served_model); it serves: {', '.join(served)}")
        wanted = _names_of_model(spec.name, spec.model)
        for card in cards:
            if _names_of_model(str(card["id"]), card.get("root")) & wanted:
                return card
        under_test = spec.name or spec.model
        return_hint = served[0] if served else "NAME"
        raise EngineError(
            f"{spec.role}: the server at {client.root} serves {', '.join(map(repr, served)) or 'no model'}"
            f", not the checkpoint under test {under_test!r} ({spec.model}); start it on that "
            f"checkpoint, or, if it is the same one under another name, pass "
            f"--candidate-option served_model={return_hint}"
        )

    def _server_version(self) -> str | None:
        try:
            answer = self.client.call("GET", "/version")
        except EngineError:
            return None  # not every OpenAI-compatible server has it
        return str(answer.get("version")) if isinstance(answer, dict) else None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": _device(self.spec),
            "dtype": self.spec.dtype,
            "device_name": f"server at {self.client.root}",
            "url": self.client.root,
            "served_model": self.served_model,
            "server_version": self.server_version,
            "max_model_len": self.max_model_len,
            "prompt_logprobs_via": self.prompt_logprobs_via,
            "tokenizer_check": self.tokenizer_check,
            "concurrency": self.concurrency,
            "timeout_s": self.client.timeout,
        }

    def check_tokenization(self, prompts: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """The server's tokenizer must give the reference's ids for every prompt text.

        Uses vLLM's /tokenize; where a server has none, the check is recorded as not run and
        only the vocabulary range of the answers guards against another tokenizer.
        """
        self._prompt_names.update((tuple(map(int, ids)), name) for name, _, ids in prompts)

        def tokenize(item: tuple[str, str, Sequence[int]]) -> list[int] | None:
            name, text, _ = item
            body = {"model": self.served_model, "prompt": text, "add_special_tokens": True}
            try:
                answer = self.client.call("POST", "/tokenize", body, f" for prompt {name}")
            except EngineError as exc:
                if "HTTP 404" in str(exc) or "HTTP 405" in str(exc):
                    return None
                raise
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            if not isinstance(tokens, list):
                raise EngineError(f"{self.spec.role}: POST {self.client.root}/tokenize for "
                                  f"prompt {name} answered no token list: "
                                  f"{excerpt(json.dumps(answer))}")
            return [int(t) for t in tokens]

        answers = self._map(tokenize, list(prompts))
        if any(a is None for a in answers):
            self.tokenizer_check = "not available (the server has no /tokenize)"
            return
        for (name, _, ids), served in zip(prompts, answers):
            ids = [int(i) for i in ids]
            if served != ids:
                at = next((i for i, (a, b) in enumerate(zip(ids, served)) if a != b),
                          min(len(ids), len(served)))
                raise EngineError(
                    f"{self.spec.role}: prompt {name}: the server's tokenizer gives other token "
                    f"ids than the reference's, first at index {at} (reference "
                    f"{ids[at:at + 3]}, server {served[at:at + 3]}): the server serves "
                    "another tokenizer, or another model"
                )
        self.tokenizer_check = f"passed ({len(prompts)} prompts)"

    # ------------------------------------------------------------------ requests

    def _name(self, ids: Sequence[int], index: int) -> str:
        """A prompt's id where check_tokenization named it (a continued prompt by its
        prefix), else its place in the call."""
        key = tuple(map(int, ids))
        if key in self._prompt_names:
            return self._prompt_names[key]
        for prefix, name in self._prompt_names.items():
            if len(prefix) < len(key) and key[: len(prefix)] == prefix:
                return name
        return f"#{index + 1}"

    def _map(self, fn: Callable[[Any], _T], items: list[Any]) -> list[_T]:
        """fn over items, at most `concurrency` at once, in order; the first error wins."""
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _complete(self, ids: Sequence[int], index: int, max_tokens: int,
                  extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        name = self._name(ids, index)
        if self.max_model_len and len(ids) + max_tokens > int(self.max_model_len):
            raise EngineError(
                f"{self.spec.role}: prompt {name} has {len(ids)} tokens; with {max_tokens} "
                f"more it exceeds the server's max_model_len of {self.max_model_len} (start "
                "the server with a larger --max-model-len)"
            )
        body = {"model": self.served_model, "prompt": [int(t) for t in ids],
                "max_tokens": max_tokens, **GREEDY, **extra}
        answer = self.client.call("POST", "/v1/completions", body, f" for prompt {name}")
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EngineError(f"{self.spec.role}: POST {self.client.root}/v1/completions for "
                              f"prompt {name} answered no choices: "
                              f"{excerpt(json.dumps(answer))}")
        return name, choices[0]

    def _legacy_logprobs(self, choice: dict[str, Any], name: str) -> dict[str, Any]:
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("top_logprobs"), list):
            raise EngineError(f"{self.spec.role}: the server answered prompt {name} without "
                              "top log-probs (logprobs.top_logprobs)")
        return logprobs

    def _from_top_logprobs(self, entry: Any, k: int, where: str) -> NextToken:
        """One legacy `top_logprobs` entry, {"token_id:N": logprob}, as a rank-ordered view."""
        if not isinstance(entry, dict):
            raise EngineError(f"{self.spec.role}, {where}: no top log-probs at this position")
        pairs = []
        for key, value in entry.items():
            if not key.startswith(TOKEN_ID_PREFIX):
                raise EngineError(
                    f"{self.spec.role}, {where}: log-probs keyed by token text ({key!r}), not "
                    "by id; the server must honour return_tokens_as_token_ids (vLLM does)"
                )
            pairs.append((int(key[len(TOKEN_ID_PREFIX):]),
                          self._logprob(value, key[len(TOKEN_ID_PREFIX):], where)))
        # A stable sort: exact ties keep the server's order, where vLLM puts the generated
        # token first (the offline engine orders them by vLLM's top-k rank instead).
        pairs.sort(key=lambda pair: -pair[1])
        return self._view(pairs[:k], k, where)

    def _from_prompt_logprobs(self, entry: Any, k: int, where: str) -> NextToken:
        """One native vLLM `prompt_logprobs` entry, {"id": {"logprob", "rank"}}: the actual
        token (any rank) plus the top k."""
        if not isinstance(entry, dict):
            raise EngineError(f"{self.spec.role}, {where}: no prompt log-probs at this position")
        rows = []
        for key, value in entry.items():
            rank = value.get("rank") if isinstance(value, dict) else None
            logprob = value.get("logprob") if isinstance(value, dict) else value
            rows.append((rank if isinstance(rank, int) else 1 << 30,
                         -self._logprob(logprob, key, where), int(key)))
        rows.sort()
        pairs = [(token, -negative) for rank, negative, token in rows if rank <= k][:k]
        return self._view(pairs, k, where)

    def _logprob(self, value: Any, token: str, where: str) -> float:
        """One log-prob as the server sent it: a number, or an error that says what came."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            shown = "null" if value is None else repr(value)[:40]
            raise EngineError(f"{self.spec.role}, {where}: the server gave no log-prob "
                              f"({shown}) for token {token}; it is not answering in "
                              "vLLM's OpenAI-compatible shape")
        return float(value)

    def _view(self, pairs: list[tuple[int, float]], k: int, where: str) -> NextToken:
        wanted = min(k, self.vocab_size) if self.vocab_size else k
        if len(pairs) < wanted:
            raise EngineError(
                f"{self.spec.role}, {where}: the server returned {len(pairs)} log-probs, asked "
                f"for {k} (start it with --max-logprobs >= {k}, or lower --logprobs)"
            )
        ids = np.array([token for token, _ in pairs], dtype=np.int64)
        if self.vocab_size and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise EngineError(
                f"{self.spec.role}, {where}: token id {bad} is outside the reference's "
                f"vocabulary of {self.vocab_size}: the server serves another model or tokenizer"
            )
        return NextToken(token_ids=ids, logprobs=np.array([v for _, v in pairs], dtype=np.float64))

    # ------------------------------------------------------------------ the interface

    def next_token(self, prompts: Sequence[Sequence[int]], k: int) -> list[NextToken]:
        def one(item: tuple[int, Sequence[int]]) -> NextToken:
            index, ids = item
            name, choice = self._complete(ids, index, 1, {"logprobs": k})
            top = self._legacy_logprobs(choice, name)["top_logprobs"]
            return self._from_top_logprobs(top[0] if top else None, k, f"prompt {name}")

        return self._map(one, list(enumerate(prompts)))

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], k: int) -> list[list[NextToken]]:
        """Teacher-forced over each whole prompt: per prompt, one view per position i from 0
        to len - 2, the distribution of token i + 1 given tokens 0..i (the prefill path).

        vLLM's `prompt_logprobs` extension where the server has it (ranks, ids as keys),
        else the OpenAI `echo` with `logprobs`.
        """

        def one(item: tuple[int, Sequence[int]]) -> list[NextToken]:
            index, ids = item
            if self.prompt_logprobs_via != "echo":
                name, choice = self._complete(ids, index, 1, {"prompt_logprobs": k})
                entries = choice.get("prompt_logprobs")
                if isinstance(entries, list):
                    self.prompt_logprobs_via = "prompt_logprobs"
                    return self._positions(entries, ids, name, k, self._from_prompt_logprobs)
                self.prompt_logprobs_via = "echo"  # the server ignored vLLM's extension
            name, choice = self._complete(ids, index, 1, {"echo": True, "logprobs": k})
            entries = self._legacy_logprobs(choice, name)["top_logprobs"]
            return self._positions(entries, ids, name, k, self._from_top_logprobs)

        return self._map(one, list(enumerate(prompts)))

    def _positions(self, entries: list[Any], ids: Sequence[int], name: str, k: int,
                   parse: Callable[[Any, int, str], NextToken]) -> list[NextToken]:
        # Entry j is the view of prompt token j (entry 0 has none), so position i is j = i + 1.
        if len(entries) < len(ids):
            raise EngineError(f"{self.spec.role}, prompt {name}: the server returned prompt "
                              f"log-probs for {len(entries)} of {len(ids)} tokens")
        return [parse(entries[i + 1], k, f"prompt {name} (position {i})")
                for i in range(len(ids) - 1)]

    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int
    ) -> list[list[NextToken]]:
        views = self.prompt_logprobs(sequences, k)
        return [per_prompt[start:] for per_prompt, start in zip(views, starts, strict=True)]

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int, k: int) -> list[Decoded]:
        def one(item: tuple[int, Sequence[int]]) -> Decoded:
            index, ids = item
            name, choice = self._complete(ids, index, steps, {"logprobs": k})
            logprobs = self._legacy_logprobs(choice, name)
            tokens = logprobs.get("tokens") or []
            if len(tokens) != steps or len(logprobs["top_logprobs"]) != steps:
                raise EngineError(
                    f"{self.spec.role}, prompt {name}: the server generated {len(tokens)} tokens"
                    f" of {steps} asked (finish_reason {choice.get('finish_reason')!r}); it must"
                    " honour ignore_eos (vLLM does)"
                )
            token_ids = []
            for token in tokens:
                if not str(token).startswith(TOKEN_ID_PREFIX):
                    raise EngineError(f"{self.spec.role}, prompt {name}: generated tokens come "
                                      f"as text ({token!r}), not ids; the server must honour "
                                      "return_tokens_as_token_ids (vLLM does)")
                token_ids.append(int(str(token)[len(TOKEN_ID_PREFIX):]))
            views = [self._from_top_logprobs(entry, k, f"prompt {name} (decode step {j})")
                     for j, entry in enumerate(logprobs["top_logprobs"])]
            return Decoded(token_ids, views)

        return self._map(one, list(enumerate(prompts)))

    # ------------------------------------------------------------------ performance

    def stream_timed(self, prompt_ids: Sequence[int], output_len: int) -> StreamTiming:
        """Stream one greedy completion of exactly `output_len` tokens and time each token.

        TTFT and TPOT as vLLM's serving benchmark defines them (vllm/benchmarks): the clock
        starts before the request is sent, TTFT ends at the first chunk with choices, the
        latency at the last one, and TPOT = (latency - TTFT) / (output tokens - 1).
        """
        name = self._name(prompt_ids, 0)
        body = {"model": self.served_model, "prompt": [int(t) for t in prompt_ids],
                "max_tokens": output_len, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True, **GREEDY}
        token_times: list[float] = []
        chunks = 0
        usage: dict[str, Any] = {}
        for arrived, event in self.client.stream("/v1/completions", body, f" for prompt {name}"):
            if not isinstance(event, dict):
                continue
            if event.get("error"):
                raise EngineError(f"{self.spec.role}: the server broke off the stream for "
                                  f"prompt {name}: {error_detail(json.dumps(event).encode())}")
            choices = event.get("choices")
            if choices:
                # vLLM's return_token_ids says how many tokens a chunk carries; else one.
                carried = choices[0].get("token_ids") if isinstance(choices[0], dict) else None
                count = len(carried) if isinstance(carried, list) else 1
                token_times.extend([arrived] * count)
                chunks += 1
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
        if not token_times:
            raise EngineError(f"{self.spec.role}: the stream for prompt {name} carried no token")
        output_tokens = int(usage.get("completion_tokens") or len(token_times))
        return StreamTiming(
            prompt_tokens=int(usage.get("prompt_tokens") or len(prompt_ids)),
            output_tokens=output_tokens,
            ttft_s=token_times[0],
            token_times_s=tuple(token_times),
            latency_s=token_times[-1],
            chunks=chunks,
        )

    def generate_timed(self, prompts: Sequence[Sequence[int]], output_len: int) -> list[Timing]:
        """One streamed request after another (concurrent ones would time the queue)."""
        timings = []
        for ids in prompts:
            timed = self.stream_timed(ids, output_len)
            timings.append(Timing(
                prompt_tokens=timed.prompt_tokens,
                output_tokens=timed.output_tokens,
                latency_s=timed.latency_s,
                ttft_s=timed.ttft_s,
                decode_s=timed.latency_s - timed.ttft_s,
            ))
        return timings
