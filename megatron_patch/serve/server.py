"""An OpenAI-compatible HTTP server over a legacy Megatron checkpoint (``toolkits/serve/openai_server.py``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
(``/v1/models/<name>``), ``GET /health``. Standard library HTTP (``ThreadingHTTPServer``): one
thread per connection parses and validates the request, tokenizes it and queues a ``Job``; the
``Scheduler`` (the main thread of rank 0) batches waiting jobs through ``generate``; the connection
thread writes the JSON answer, or the Server-Sent Events of a streamed one, as its job's events come.

Process layout: with ``--tp N`` (x ``--pp M``) > 1 outside torchrun, ``main`` re-launches itself as
``torchrun --standalone --nproc-per-node N*M -m megatron_patch.serve ...`` and forwards SIGTERM /
SIGINT to it. Rank 0 serves HTTP and broadcasts each batch; the other ranks follow in lockstep.
SIGTERM / SIGINT on rank 0 stops accepting work, finishes the running batch, answers waiting
requests with 503, releases the other ranks and exits 0 (the other ranks ignore the signal and
leave when rank 0 tells them).

Readiness: once the model is loaded and the port bound, rank 0 writes the port to ``--port-file``
(atomically) and prints ``serving <name> on http://HOST:PORT``.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from megatron_patch.serve import protocol
from megatron_patch.serve.protocol import APIError

MAX_BODY_BYTES = 4 * 1024 * 1024
CHAT_PATH, COMPLETIONS_PATH, MODELS_PATH, HEALTH_PATH = (
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/health")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openai_server.py",
                                description="serve a Megatron checkpoint behind an OpenAI-compatible "
                                            "API (chat/completions, completions, models, health)")
    p.add_argument("--checkpoint", required=True, help="legacy Megatron checkpoint folder")
    p.add_argument("--tokenizer", default="-",
                   help="tokenizer folder / .model / TOKENIZER_PATH key; - (default): the checkpoint's")
    p.add_argument("--model-family", default=None,
                   help="family, when the checkpoint does not name one")
    p.add_argument("--model-size", default="auto", help="auto (config.json) or a family size preset")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel ranks (local processes, started with torchrun)")
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: a free port")
    p.add_argument("--port-file", default=None,
                   help="write the bound port to this file once the server is ready")
    p.add_argument("--served-model-name", default=None,
                   help="the model id in responses and /v1/models (default: the checkpoint folder's "
                        "name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together")
    p.add_argument("--seq-length", type=int, default=0,
                   help="prompt + completion tokens per request (0: the model's "
                        "max_position_embeddings, else 2048)")
    p.add_argument("--default-max-tokens", type=int, default=protocol.DEFAULT_MAX_TOKENS,
                   help="completion tokens when a request gives no max_tokens (capped by the room "
                        "left)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: fp32 on CPU, the checkpoint's dtype on GPU")
    p.add_argument("--seed", type=int, default=1234,
                   help="seeds the sampling of requests that give no seed")
    p.add_argument("--add-bos", choices=("auto", "yes", "no"), default="auto",
                   help="prepend BOS to prompts (auto: when the tokenizer would add it)")
    p.add_argument("--flash", action=argparse.BooleanOptionalAction, default=True,
                   help="PyTorch SDPA core attention where the family allows it")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="larger request bodies get 413")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the scheduler waits for more requests after the first one of "
                        "an idle spell")
    p.add_argument("--quiet", action="store_true", help="no access log")
    return p


def log(*a, file=None, **_k) -> None:
    """One line on stderr, written at once (threads log concurrently)."""
    f = file or sys.stderr
    f.write(" ".join(str(x) for x in a) + "\n")
    f.flush()


# ------------------------------------------------------------------------------------ the app

class App:
    """What the request handlers share: tokenizer, scheduler, served name, limits (rank 0)."""

    def __init__(self, tokenizer, scheduler, *, name: str, seq_length: int, add_bos: bool,
                 default_max_tokens: int, max_body_bytes: int, quiet: bool = False, info=None):
        from megatron_patch.generation.cli import stop_token_ids

        self.tok, self.scheduler = tokenizer, scheduler
        self.name, self.seq_length, self.add_bos = name, seq_length, add_bos
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.quiet = quiet
        self.created = int(time.time())
        self.info = dict(info or {})
        self.chat_stop_ids = stop_token_ids(tokenizer, True)
        self.text_stop_ids = stop_token_ids(tokenizer, False)
        self._tok_lock = threading.Lock()

    def encode(self, text: str, ids: Optional[List[int]] = None) -> List[int]:
        """Prompt ids of ``text`` (or the given ``ids``, a chat template's), BOS in front."""
        if ids is None:
            with self._tok_lock:
                ids = list(self.tok.tokenize(text)) if text else []
        bos = getattr(self.tok, "bos", None)
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos)] + ids
        if not ids:  # generate needs one token: an empty prompt starts at BOS (or end-of-document)
            first = bos if bos is not None else getattr(self.tok, "eod", None)
            ids = [int(first if first is not None else 0)]
        return ids

    def make_job(self, kind: str, body: dict):
        from megatron_patch.serve.scheduler import Job

        if kind == "chat":
            messages, params = protocol.parse_chat(body)
            with self._tok_lock:
                # ids straight from the template: its special tokens (a SentencePiece
                # template's <s>, </s>) are those tokens, not their text
                chat_ids = list(self.tok.apply_chat_template(messages, add_generation_prompt=True,
                                                             tokenize=True))
            stop_ids, prefix = self.chat_stop_ids, "chatcmpl"
        else:
            text, params = protocol.parse_completion(body)
            stop_ids, prefix = self.text_stop_ids, "cmpl"
        ids = self.encode(text) if kind != "chat" else self.encode("", chat_ids)
        max_tokens = protocol.fit_max_tokens(len(ids), params.max_tokens, self.seq_length,
                                             self.default_max_tokens,
                                             "messages" if kind == "chat" else "prompt")
        return Job(protocol.new_id(prefix), kind, ids, max_tokens, params, stop_ids, self.name)

    def health(self) -> dict:
        s = self.scheduler
        return dict(self.info, status="ok", model=self.name, seq_length=self.seq_length,
                    waiting=s.waiting(), **s.stats)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "megatron_patch-serve/0.1"
    timeout = 300  # seconds a client may take to send its request
    app: App = None  # set on the subclass built by make_server

    # ---- plumbing
    def log_message(self, fmt, *args):  # noqa: D401  (the access log, on stderr)
        if not self.app.quiet:
            log(f"[serve] {self.address_string()} {fmt % args}")

    def _send_json(self, status: int, obj, headers=None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """Errors found by ``http.server`` itself (a request line that is not HTTP, headers too
        long, an unknown method) as OpenAI error objects too."""
        from http import HTTPStatus

        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # answer with a status line and headers
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._safe(self._error, APIError(code, message or phrase))

    def _error(self, e: APIError, headers=None) -> None:
        self._send_json(e.status, e.body(), headers)

    def _path(self) -> str:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        return path.rstrip("/") or "/"

    def _route(self, method: str) -> None:
        path = self._path()
        try:
            if path in (CHAT_PATH, COMPLETIONS_PATH):
                if method != "POST":
                    raise APIError(405, f"{method} is not allowed on {path}; use POST")
                body = protocol.parse_json(self._read_body())
                self._generate("chat" if path == CHAT_PATH else "completion", body)
            elif path in (MODELS_PATH, HEALTH_PATH) or path.startswith(MODELS_PATH + "/"):
                if method not in ("GET", "HEAD"):
                    raise APIError(405, f"{method} is not allowed on {path}; use GET")
                self._drop_body()
                if path == HEALTH_PATH:
                    self._send_json(200, self.app.health())
                elif path == MODELS_PATH:
                    self._send_json(200, protocol.models_list(self.app.name, self.app.created))
                elif path[len(MODELS_PATH) + 1:] == self.app.name:
                    self._send_json(200, protocol.model_card(self.app.name, self.app.created))
                else:
                    raise APIError(404, f"model {path[len(MODELS_PATH) + 1:]!r} does not exist; "
                                        f"this server serves {self.app.name!r}",
                                   param="model", code="model_not_found")
            else:
                self._drop_body()
                raise APIError(404, f"no route {method} {path}; the endpoints are POST "
                                    f"{CHAT_PATH}, POST {COMPLETIONS_PATH}, GET {MODELS_PATH}, "
                                    f"GET {HEALTH_PATH}")
        except APIError as e:
            if e.status == 405:
                self.close_connection = True  # the body (if any) was not read
            allow = {"Allow": "POST"} if path in (CHAT_PATH, COMPLETIONS_PATH) else {"Allow": "GET"}
            self._safe(self._error, e, allow if e.status == 405 else None)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001  (never let a request kill the server)
            log(f"[serve] internal error on {method} {path}: {e!r}")
            self.close_connection = True
            self._safe(self._error, APIError(500, f"internal error: {e}"))

    def _safe(self, fn, *args) -> None:
        try:
            fn(*args)
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise APIError(411, "a Content-Length header is required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise APIError(400, f"bad Content-Length {length!r}") from None
        if n > self.app.max_body_bytes:
            self.close_connection = True  # the body is not read
            raise APIError(413, f"the request body has {n} bytes, more than the limit of "
                                f"{self.app.max_body_bytes}")
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise APIError(400, "the request body ended early")
        return data

    def _drop_body(self) -> None:
        """Read and ignore a small body so a kept-alive connection stays in sync."""
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        if 0 < n <= self.app.max_body_bytes:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def _client_gone(self) -> bool:
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next_event(self, job):
        """The job's next event; None when the client went away while waiting."""
        import queue

        while True:
            try:
                return job.events.get(timeout=0.5)
            except queue.Empty:
                if self._client_gone():
                    return None

    # ---- generation
    def _generate(self, kind: str, body: dict) -> None:
        app = self.app
        job = app.make_job(kind, body)  # APIError 400 on bad input
        app.scheduler.submit(job)
        if job.params.stream:
            self._stream(job)
            return
        ev = self._next_event(job)
        if ev is None:
            job.cancel()
            self.close_connection = True
            log(f"[serve] {job.rid}: client disconnected before the answer; cancelling")
            return
        if ev[0] == "error":
            raise ev[1]
        r = ev[1]
        build = protocol.chat_response if kind == "chat" else protocol.completion_response
        try:
            self._send_json(200, build(job.rid, job.model, r["text"], r["finish_reason"],
                                       r["prompt_tokens"], r["completion_tokens"], job.created))
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
            log(f"[serve] {job.rid}: client disconnected before the answer was sent")

    def _stream(self, job) -> None:
        chat = job.kind == "chat"
        rid, model, created = job.rid, job.model, job.created

        def chunk(text=None, finish=None, role=False):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return protocol.chat_chunk(rid, model, created, delta, finish)
            return protocol.completion_chunk(rid, model, created, text or "", finish)

        self.close_connection = True  # the stream ends when the connection closes
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            if chat:
                self._write(protocol.sse(chunk("", role=True)))
            while True:
                ev = self._next_event(job)
                if ev is None:
                    raise ConnectionResetError("client went away")
                if ev[0] == "delta":
                    self._write(protocol.sse(chunk(ev[1])))
                elif ev[0] == "end":
                    r = ev[1]
                    fr = r["finish_reason"]
                    self._write(protocol.sse(
                        protocol.chat_chunk(rid, model, created, {}, fr) if chat else
                        protocol.completion_chunk(rid, model, created, "", fr)))
                    if job.params.include_usage:
                        self._write(protocol.sse(protocol.usage_chunk(
                            rid, model, created,
                            "chat.completion.chunk" if chat else "text_completion",
                            r["prompt_tokens"], r["completion_tokens"])))
                    self._write(protocol.sse("[DONE]"))
                    return
                else:  # ("error", APIError)
                    self._write(protocol.sse(ev[1].body()))
                    self._write(protocol.sse("[DONE]"))
                    return
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError) as e:
            job.cancel()
            log(f"[serve] {rid}: client disconnected mid-stream ({type(e).__name__}); "
                "cancelling its row")

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    # ---- methods
    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_DELETE(self):
        self._route("DELETE")

    def do_PATCH(self):
        self._route("PATCH")

    def do_OPTIONS(self):
        self._route("OPTIONS")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):  # no tracebacks for dropped connections
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            return
        super().handle_error(request, client_address)


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    return _Server((host, port), handler)


# ------------------------------------------------------------------------------------ processes

def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _relaunch(n: int, argv: List[str]) -> int:
    """Start ``n`` local ranks with torchrun; forward SIGTERM/SIGINT; return its exit code."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", "-m", "megatron_patch.serve", *argv]
    proc = subprocess.Popen(cmd, env=env)
    signalled = []

    def forward(sig, _frame):
        # signal the ranks themselves (rank 0 shuts the world down and torchrun exits 0); torchrun
        # only when its workers cannot be found (it would signal them and report its own death)
        signalled.append(sig)
        targets = []
        try:
            import psutil

            targets = psutil.Process(proc.pid).children(recursive=False)
        except Exception:  # noqa: BLE001
            pass
        for t in targets or [proc]:
            try:
                t.send_signal(sig)
            except Exception:  # noqa: BLE001  (already gone)
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = proc.wait()
    return 0 if signalled else rc


def _write_port_file(path: str, port: int) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def serve(args) -> int:
    import torch.distributed as dist

    from megatron_patch.generation.cli import wants_bos
    from megatron_patch.generation.loader import GenerationSetupError, load_for_generation, \
        load_tokenizer, resolve_precision
    from megatron_patch.serve.scheduler import Scheduler

    if not os.path.isdir(args.checkpoint):
        raise GenerationSetupError(f"checkpoint folder {args.checkpoint} does not exist")
    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint, args.tp)
    precision = resolve_precision(args.checkpoint, args.precision)
    quiet_log = (lambda *a, **k: None)
    lm = load_for_generation(args.checkpoint, tp=args.tp, pp=args.pp, model_size=args.model_size,
                             family=args.model_family, precision=precision, flash=args.flash,
                             seed=args.seed, log=log)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != args.tp * args.pp:
        raise GenerationSetupError(f"the server runs one model replica: start TP x PP = "
                                   f"{args.tp * args.pp} processes, not {world}")
    seq_length = args.seq_length or lm.max_position_embeddings or 2048
    if lm.max_position_embeddings and seq_length > lm.max_position_embeddings and rank == 0:
        log(f"warning: --seq-length {seq_length} is above the model's max_position_embeddings "
            f"{lm.max_position_embeddings}")
    pad = getattr(tokenizer, "pad", None)
    scheduler = Scheduler(lm.model, tokenizer, vocab_size=lm.vocab_size, seq_length=seq_length,
                          max_batch_size=args.max_batch_size, seed=args.seed,
                          pad_id=int(pad if pad is not None else 0),
                          batch_wait_s=max(args.batch_wait_ms, 0) / 1000.0,
                          log=log if rank == 0 else quiet_log)
    if rank != 0:
        # leave when rank 0 says so (torchrun signals every rank; rank 0 decides)
        signal.signal(signal.SIGTERM, lambda *a: None)
        signal.signal(signal.SIGINT, lambda *a: None)
        scheduler.log = log
        scheduler.follow()
        return 0

    stop = threading.Event()

    def on_signal(sig, _frame):
        if not stop.is_set():
            log(f"[serve] {signal.Signals(sig).name}: finishing the running batch and shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    name = args.served_model_name or os.path.basename(os.path.normpath(
        os.path.abspath(args.checkpoint)))
    app = App(tokenizer, scheduler, name=name, seq_length=seq_length,
              add_bos=wants_bos(tokenizer, args.add_bos),
              default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_bytes,
              quiet=args.quiet, info={"family": lm.family, "tp": args.tp, "pp": args.pp,
                                      "max_batch_size": scheduler.max_batch_size})
    try:
        httpd = make_server(app, args.host, args.port)
    except OSError as e:
        stop.set()
        scheduler.serve(stop)  # releases the other ranks
        raise GenerationSetupError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    host, port = httpd.server_address[:2]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name="http", daemon=True)
    thread.start()
    if args.port_file:
        _write_port_file(args.port_file, port)
    print(f"serving {name} on http://{host}:{port}", flush=True)
    try:
        scheduler.serve(stop)
    finally:
        httpd.shutdown()
        httpd.server_close()
        if args.port_file:
            try:
                os.remove(args.port_file)
            except OSError:
                pass
        log("[serve] stopped")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        print("error: --tp and --pp must be >= 1", file=sys.stderr)
        return 2
    if args.max_batch_size < 1:
        print("error: --max-batch-size must be >= 1", file=sys.stderr)
        return 2
    n = args.tp * args.pp
    if not _under_launcher():
        if n > 1:
            return _relaunch(n, argv)
        # a world of one with its own rendezvous port (a parent's MASTER_PORT may be in use)
        from megatron_patch import platform

        for k in _LAUNCH_VARS:
            os.environ.pop(k, None)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(platform.free_port()))
    import megatron_patch  # noqa: F401  (patches before megatron is used)
    from megatron_patch.generation.loader import GenerationSetupError

    try:
        return serve(args)
    except (GenerationSetupError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


if __name__ == "__main__":
    sys.exit(main())
