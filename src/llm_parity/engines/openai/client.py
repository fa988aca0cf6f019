"""The HTTP side of a served candidate: base-URL checks, an API key that is never shown,
requests with timeouts and bounded retries, streamed responses with arrival times, and
error messages that name the server, the request and what came back.

Standard library only (http.client, urllib): the plugin's core install stays light.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llm_parity.errors import EngineError

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
_EXCERPT = 300


def check_server_url(url: str, flag: str = "--candidate-url") -> str:
    """The server's base URL, without a trailing slash or `/v1`; refuses anything else."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{flag}: expected http://HOST[:PORT][/PATH], got {url!r}")
    if parsed.username or parsed.password:
        raise ValueError(f"{flag}: put no credentials in the URL; the API key is read from "
                         "the variable named by --candidate-api-key-env")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{flag}: expected a base URL without ?query or #fragment, "
                         f"got {url!r}")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError:
        raise ValueError(f"{flag}: the port in {url!r} is not a valid port number") from None
    path = parsed.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


class Secret:
    """The API key, kept out of reprs, tracebacks with locals, and describe()."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value or None

    def __bool__(self) -> bool:
        return self._value is not None

    def __repr__(self) -> str:
        return "<hidden>" if self._value else "<none>"

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._value}"} if self._value else {}


@dataclass(frozen=True)
class StreamTiming:
    """One streamed completion, timed as vLLM's serving benchmark times it.

    The clock starts just before the request is sent. A chunk that carries choices is a
    token arrival (its text may be empty, e.g. half of a multi-byte character); the
    closing usage chunk and `[DONE]` are not. vLLM merges the tokens of a request that its
    HTTP process has not sent yet into one chunk (a starved CPU does it): then `chunks` is
    below `output_tokens`, and TPOT from the stream says more about the host than the engine.
    """

    prompt_tokens: int
    output_tokens: int  # the server's own count (usage), else the tokens seen in chunks
    ttft_s: float  # request sent -> first token chunk
    token_times_s: tuple[float, ...]  # arrival of each token since the request was sent
    latency_s: float  # request sent -> last token chunk
    chunks: int  # chunks that carried tokens

    @property
    def tpot_s(self) -> float | None:
        """(latency - TTFT) / (output tokens - 1), vLLM's TPOT; None for one token."""
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


class Client:
    """JSON over HTTP with a deadline per request and bounded retries on connection errors."""

    def __init__(self, root: str, key: Secret, key_env: str, role: str, timeout: float,
                 retries: int) -> None:
        self.root = root
        self.key = key
        self.key_env = key_env
        self.role = role
        self.timeout = timeout
        self.retries = retries

    def _request(self, method: str, path: str, body: Any) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **self.key.header()}
        if data is not None:
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.root + path, data=data, method=method,
                                      headers=headers)

    def _open(self, method: str, path: str, body: Any, what: str):
        """An open response, after up to `retries` more attempts on connection errors."""
        where = f"{method} {self.root}{path}"
        for attempt in range(self.retries + 1):
            try:
                return urllib.request.urlopen(self._request(method, path, body),
                                              timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                raise self._http_error(exc.code, _read_quietly(exc), where, what) from None
            except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError):
                    raise self._timeout(where, what) from None
                if attempt == self.retries:
                    raise self._unreachable(where, what, reason) from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _connect(self, where: str, what: str) -> http.client.HTTPConnection:
        """A connection made before any clock starts, with the same retries as _open."""
        parsed = urllib.parse.urlsplit(self.root)
        kind = http.client.HTTPSConnection if parsed.scheme == "https" else \
            http.client.HTTPConnection
        for attempt in range(self.retries + 1):
            connection = kind(parsed.hostname, parsed.port, timeout=self.timeout)
            try:
                connection.connect()
                return connection
            except TimeoutError:
                raise self._timeout(where, what) from None
            except OSError as exc:
                connection.close()
                if attempt == self.retries:
                    raise self._unreachable(where, what, exc) from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None, what: str = "") -> Any:
        """The decoded JSON answer; `what` names the prompt in messages, e.g. ' for prompt x'."""
        response = self._open(method, path, body, what)
        try:
            with response:
                raw = response.read()
        except TimeoutError:
            raise self._timeout(f"{method} {self.root}{path}", what) from None
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"{self.role}: the server at {self.root} dropped the connection "
                              f"during {method} {path}{what}: {_reason(exc)}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineError(f"{self.role}: {method} {self.root}{path}{what} answered "
                              f"something other than JSON: {excerpt(raw)}") from None

    def stream(self, path: str, body: Any, what: str = "") -> Iterator[tuple[float, Any]]:
        """Server-sent events of a streamed answer: (seconds since the request was sent,
        decoded data). The connection is made first, so the clock holds no TCP or TLS
        handshake, as on the kept-alive connections of vLLM's benchmark client."""
        where = f"POST {self.root}{path}"
        connection = self._connect(where, what)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   **self.key.header()}
        payload = json.dumps(body).encode()
        try:
            sent = time.perf_counter()
            connection.request("POST", urllib.parse.urlsplit(self.root).path + path,
                               body=payload, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                raise self._http_error(response.status, _read_quietly(response), where, what)
            for line in response:
                arrived = time.perf_counter() - sent
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and ": ping" comments
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise EngineError(f"{self.role}: a streamed event of {where}{what} is not "
                                      f"JSON: {excerpt(data)}") from None
                yield arrived, event
        except TimeoutError:
            raise self._timeout(where, what) from None
        except (OSError, http.client.HTTPException) as exc:
            raise EngineError(f"{self.role}: the server at {self.root} dropped the connection "
                              f"during {where}{what}: {_reason(exc)}") from None
        finally:
            connection.close()

    def _timeout(self, where: str, what: str) -> EngineError:
        return EngineError(
            f"{self.role}: no answer from {where}{what} within {self.timeout:g} s; the server "
            "is stuck or overloaded (raise the limit with --candidate-option timeout=SECONDS)"
        )

    def _unreachable(self, where: str, what: str, reason: Any) -> EngineError:
        return EngineError(
            f"{self.role}: cannot reach the server at {self.root} ({where}{what}) after "
            f"{self.retries + 1} attempts: {_reason(reason)}; is it running, and is "
            "--candidate-url right?"
        )

    def _http_error(self, status: int, raw: bytes, where: str, what: str) -> EngineError:
        detail = error_detail(raw)
        hint = ""
        if status in (401, 403):
            hint = (f"; the server wants an API key: put it in ${self.key_env}" if not self.key
                    else f"; the server refused the key in ${self.key_env}")
        elif "max allowed" in detail or "max_logprobs" in detail:
            hint = "; start the server with a larger --max-logprobs, or lower --logprobs"
        return EngineError(f"{self.role}: the server answered HTTP {status} to {where}{what}: "
                           f"{detail}{hint}")


def _read_quietly(response: Any) -> bytes:
    """An error answer's body, which is only a hint: the status is the news."""
    try:
        return response.read()
    except Exception:
        return b""


def _reason(exc: Any) -> str:
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc)


def excerpt(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return repr(text[:_EXCERPT] + ("..." if len(text) > _EXCERPT else ""))


def error_detail(raw: bytes) -> str:
    """The server's own message where it sent the usual {"error": {"message": ...}} shape."""
    try:
        data = json.loads(raw)
    except ValueError:
        return excerpt(raw) if raw else "(empty body)"
    error = data.get("error", data.get("detail")) if isinstance(data, dict) else None
    if isinstance(error, dict) and "message" in error:
        error = error["message"]
    return excerpt(error if isinstance(error, str) else json.dumps(data))
