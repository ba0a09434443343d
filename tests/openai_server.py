"""A fake OpenAI-compatible HTTP server for tests and benchmarks (stdlib only).

It answers ``POST /v1/completions`` and ``POST /v1/chat/completions`` the way the
OpenAI API does: legacy ``logprobs`` (tokens, token_logprobs, top_logprobs,
text_offset; ``echo`` puts the prompt first with a null first logprob), chat
``logprobs.content``, ``system_fingerprint``, ``usage`` and rate-limit headers.
Its "model" is a deterministic function of the request: the same prompt, seed
and temperature give the same tokens and logprobs.

On demand it answers with faults (:meth:`FakeOpenAI.inject`: 429 with
``retry-after``, 500, ...), takes time like a model that generates
(``latency_s`` per request plus ``latency_per_token_s`` per requested token),
holds every request it receives until told to answer (:meth:`FakeOpenAI.hold` /
:meth:`FakeOpenAI.release`: a test then knows which requests are in flight),
leaves out legacy ``text_offset`` (``text_offsets = False``: it is optional in
openai's ``Logprobs`` type), and refuses ``echo`` + ``logprobs`` for the models in
``echo_refusing_models`` with the API's 400 ``invalid_parameter_combination``.
Like the API, it answers 400 to alternatives it does not give (``logprobs`` above
5 on completions, ``top_logprobs`` above 20 on chat, chat ``top_logprobs`` without
``logprobs=true``), so a payload the real API refuses fails the tests too.
Every request is recorded with its arrival time, body, ``Authorization`` header,
status and response body, so tests compare stored rows with what was sent.

``python -m tests.openai_server --port 8089`` serves one from the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ECHO_REFUSAL = ("Setting 'echo' and 'logprobs' at the same time is not supported for "
                "this model.")
#: The API's limits on alternatives per token: legacy ``logprobs``, chat ``top_logprobs``.
MAX_LEGACY_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


@dataclass
class Fault:
    """One scripted error response."""

    status: int
    retry_after: float | None = None
    code: str | None = None
    message: str = "injected fault"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    time: float  # time.time() at arrival
    path: str
    body: dict[str, Any]
    authorization: str | None
    status: int = 0
    response: dict[str, Any] | None = None
    done: float = 0.0  # time.time() when the response was sent


def _hash(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


def split_prompt(prompt: str | list[int]) -> list[str]:
    """The fake tokenizer: words with their leading whitespace ("".join == prompt)."""
    if isinstance(prompt, list):
        return [f"<{i}>" for i in prompt]
    return re.findall(r"\s*\S+|\s+", prompt)


class FakeModel:
    """Deterministic tokens and logprobs; sampling depends on seed (random without)."""

    def __init__(self, fingerprint: str | None) -> None:
        self.fingerprint = fingerprint

    @staticmethod
    def logprob(*key: object) -> float:
        return -round(0.01 + (_hash("lp", *key) % 5000) / 1000, 6)

    def alternatives(self, token: str, lp: float, k: int) -> list[tuple[str, float]]:
        """The chosen token first, then k-1 others; one of them may be more likely."""
        out = [(token, lp)]
        for j in range(k - 1):
            out.append((f" alt{j}{token.strip()}", round(lp + 0.3 - 0.4 * j, 6)))
        return out[:k]

    def generate(self, body: dict[str, Any], prompt_key: object, choice: int) -> list[tuple]:
        n = int(body.get("max_tokens") if body.get("max_tokens") is not None else 16)
        temperature = body.get("temperature", 1.0)
        greedy = temperature == 0
        seed = body.get("seed")
        salt = "greedy" if greedy else (seed if seed is not None else random.random())
        tokens = []
        for i in range(n):
            h = _hash(body["model"], prompt_key, salt, choice if not greedy else 0, i)
            token = f" w{h % 1000}"
            tokens.append((token, self.logprob(body["model"], prompt_key, salt, choice, i)))
        return tokens


class FakeOpenAI:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, *, fingerprint: str | None = "fp_fake_1", latency_s: float = 0.0,
                 latency_per_token_s: float = 0.0,
                 echo_refusing_models: tuple[str, ...] = ("gpt-3.5-turbo-instruct",),
                 port: int = 0) -> None:
        self.model = FakeModel(fingerprint)
        self.latency_s = latency_s
        #: Extra time per requested token (``max_tokens``): a long generation sends
        #: nothing until it is done, as the non-streamed API does.
        self.latency_per_token_s = latency_per_token_s
        #: Legacy logprobs carry ``text_offset`` (False: null, as some servers send).
        self.text_offsets = True
        self.echo_refusing_models = set(echo_refusing_models)
        self.requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._answering = threading.Event()  # cleared by hold(): requests wait for it
        self._answering.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- control ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``base_url`` to give the openai client."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def set_fingerprint(self, fingerprint: str | None) -> None:
        self.model.fingerprint = fingerprint

    def inject(self, *faults: Fault) -> None:
        """The next requests get these responses, in order."""
        with self._lock:
            self._faults.extend(faults)

    def hold(self) -> None:
        """Requests received from now on are recorded, then wait to be answered until
        :meth:`release` (a held request still counts against the client's timeout)."""
        self._answering.clear()

    def release(self) -> None:
        """Answer the held requests, and every request after them at once."""
        self._answering.set()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()

    def recorded(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- responses --------------------------------------------------------------

    def _rate_headers(self) -> dict[str, str]:
        now = time.time()
        with self._lock:
            recent = sum(1 for r in self.requests if r.time > now - 60)
        return {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": str(max(0, 10000 - recent)),
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-tokens": "1999000",
            "x-ratelimit-reset-tokens": "30ms",
        }

    @staticmethod
    def error_body(message: str, code: str | None, kind: str = "invalid_request_error",
                   param: str | None = None) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    @classmethod
    def out_of_range(cls, param: str, value: object, maximum: int) -> dict[str, Any] | None:
        """The API's 400 body for an integer ``param`` outside 0..``maximum``, else None."""
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            return cls.error_body(f"Invalid type for '{param}': expected an integer, but got "
                                  f"{type(value).__name__} instead.", "invalid_type",
                                  param=param)
        if value > maximum:
            return cls.error_body(f"Invalid '{param}': integer above maximum value. Expected "
                                  f"a value <= {maximum}, but got {value} instead.",
                                  "integer_above_max_value", param=param)
        if value < 0:
            return cls.error_body(f"Invalid '{param}': integer below minimum value. Expected "
                                  f"a value >= 0, but got {value} instead.",
                                  "integer_below_min_value", param=param)
        return None

    @classmethod
    def invalid(cls, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The API's 400 body for logprobs parameters it refuses, else None: a test
        server that took them would hide a payload the real API fails."""
        if path.endswith("/chat/completions"):
            top = body.get("top_logprobs")
            if top is not None and body.get("logprobs") is not True:
                return cls.error_body("Invalid value for 'top_logprobs': 'logprobs' must be "
                                      "set to true when 'top_logprobs' is used.",
                                      "invalid_value", param="top_logprobs")
            return cls.out_of_range("top_logprobs", top, MAX_CHAT_TOP_LOGPROBS)
        if path.endswith("/completions"):
            return cls.out_of_range("logprobs", body.get("logprobs"), MAX_LEGACY_LOGPROBS)
        return None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["prompt"]
        prompt_key = json.dumps(prompt)
        k = body.get("logprobs")
        echo = bool(body.get("echo"))
        prompt_tokens = split_prompt(prompt)
        prompt_text = "".join(prompt_tokens) if isinstance(prompt, list) else prompt
        choices = []
        for index in range(int(body.get("n") or 1)):
            generated = self.model.generate(body, prompt_key, index)
            tokens: list[str] = []
            values: list[float | None] = []
            tops: list[dict[str, float] | None] = []
            if echo:
                for i, tok in enumerate(prompt_tokens):
                    lp = None if i == 0 else self.model.logprob(body["model"], prompt_key, "p", i)
                    tokens.append(tok)
                    values.append(lp)
                    if lp is None:
                        tops.append(None)
                    else:
                        tops.append(dict(self.model.alternatives(tok, lp, k)) if k else {})
            for tok, lp in generated:
                tokens.append(tok)
                values.append(lp)
                tops.append(dict(self.model.alternatives(tok, lp, k)) if k else {})
            offsets, pos = [], 0
            for tok in tokens:
                offsets.append(pos)
                pos += len(tok)
            text = (prompt_text if echo else "") + "".join(t for t, _ in generated)
            logprobs = None if k is None else {
                "tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets if self.text_offsets else None,
            }
            choices.append({"text": text, "index": index, "logprobs": logprobs,
                            "finish_reason": "length"})
        completion_tokens = len(choices) * int(body.get("max_tokens") or 0)
        return {
            "id": f"cmpl-{_hash(prompt_key, time.time()) % 10**12}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": self.model.fingerprint,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt_tokens),
                      "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt_tokens) + completion_tokens},
        }

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = "\n".join(m["content"] for m in body["messages"])
        prompt_key = json.dumps(prompt)
        k = int(body.get("top_logprobs") or 0)
        choices = []
        for index in range(int(body.get("n") or 1)):
            generated = self.model.generate(body, prompt_key, index)
            content = [
                {"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                  for t, v in sorted(self.model.alternatives(tok, lp, k),
                                                     key=lambda x: -x[1])]}
                for tok, lp in generated
            ]
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": "".join(t for t, _ in generated),
                            "refusal": None},
                "logprobs": {"content": content, "refusal": None} if body.get("logprobs")
                else None,
                "finish_reason": "length",
            })
        n_prompt = len(split_prompt(prompt)) + 7  # chat framing tokens
        n_completion = len(choices) * int(body.get("max_tokens") or 16)
        return {
            "id": f"chatcmpl-{_hash(prompt_key, time.time()) % 10**12}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": self.model.fingerprint,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion},
        }

    def respond(self, path: str, body: dict[str, Any]
                ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            headers = dict(fault.headers)
            if fault.retry_after is not None:
                headers["retry-after"] = f"{fault.retry_after:g}"
            kind = "requests" if fault.status == 429 else "server_error"
            return fault.status, self.error_body(fault.message, fault.code, kind), headers
        refusal = self.invalid(path, body)
        if refusal is not None:
            return 400, refusal, {}
        if path.endswith("/chat/completions"):
            return 200, self.chat(body), self._rate_headers()
        if path.endswith("/completions"):
            if (body.get("echo") and body.get("logprobs") is not None
                    and body["model"] in self.echo_refusing_models):
                return 400, self.error_body(ECHO_REFUSAL, "invalid_parameter_combination"), {}
            return 200, self.completion(body), self._rate_headers()
        return 404, self.error_body(f"no route {path}", "not_found"), {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                arrived = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                record = RecordedRequest(arrived, self.path, body,
                                         self.headers.get("Authorization"))
                with server._lock:
                    server.requests.append(record)
                server._answering.wait()
                delay = server.latency_s + server.latency_per_token_s * int(
                    body.get("max_tokens") or 0)
                if delay:
                    time.sleep(delay)
                status, payload, headers = server.respond(self.path, body)
                data = json.dumps(payload).encode()
                record.status, record.response = status, payload
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and hung up: nothing to send to
                    self.close_connection = True
                record.done = time.time()

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeOpenAI(port=args.port, latency_s=args.latency).start()
    print(f"fake OpenAI API at {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
