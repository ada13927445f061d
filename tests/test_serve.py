"""The OpenAI-compatible server (``toolkits/serve/openai_server.py``) end to end, on a tiny LLaMA
checkpoint written here in the legacy layout with GPT-2 BPE tokenizer files.

One TP=1 server process serves the whole module; the test process computes the library's greedy
answers (``megatron_patch.generation.generate``) on the same token ids and compares:
- chat and completions (greedy) equal the library, with OpenAI-shaped bodies and usage;
- 8 concurrent requests (run as batches) each equal their answer alone;
- streamed chunks concatenate to the non-streamed text (also with a stop string), end with [DONE];
- a client that disconnects mid-stream is cancelled and the server keeps serving;
- malformed bodies, wrong types, over-long prompts, unknown paths, wrong methods, n=2, an
  over-large body and non-HTTP bytes each get their error, and the server keeps serving;
- a TP=2 server (two local processes under torchrun, the checkpoint resharded on load) answers the
  same greedy text as TP=1 and stops cleanly on SIGTERM.
Synchronisation is by the port file and /health, never by sleeping a fixed time.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from data_fixtures import tiny_llama_gpt2_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "toolkits", "serve", "openai_server.py")
SEQ = 96
PROMPTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog and then",
           "Megatron says", "A", "Once upon a time in a galaxy far, far away, there lived a",
           "Zebra", "In 1905 Albert Einstein published four papers that", "Why is the sky"]
MAX_TOKENS = [12, 7, 16, 9, 5, 14, 10, 8]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", MEGATRON_PATCH_DEVICE="cpu",
               PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny LLaMA written by hand in the legacy layout, with GPT-2 BPE tokenizer files."""
    return tiny_llama_gpt2_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-llama", 11)


class Server:
    """A server subprocess; ready when its port file appears (or it dies: the log is shown)."""

    def __init__(self, ckpt, workdir, *extra, name=None):
        self.port_file = os.path.join(workdir, "port")
        self.log_path = os.path.join(workdir, "server.log")
        args = [sys.executable, SCRIPT, "--checkpoint", ckpt, "--port", "0", "--port-file",
                self.port_file, "--seq-length", str(SEQ), *extra]
        if name:
            args += ["--served-model-name", name]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=_env(),
                                     cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"server not ready (rc={self.proc.poll()}):\n{self.text()}")
            time.sleep(0.05)  # polling the port file, not a synchronisation by sleeping
        self.port = int(open(self.port_file).read())
        return self

    def text(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()
        return rc

    # ---- client
    def request(self, method, path, body=None, raw=None, headers=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=dict({"Content-Type": "application/json"},
                                                           **(headers or {})))
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        try:
            return r.status, json.loads(payload)
        except ValueError:
            return r.status, payload

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stream(self, path, body):
        """The ``data:`` payloads of a streamed answer, in order."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", path, body=json.dumps(dict(body, stream=True)),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
        raw = r.read().decode()
        conn.close()
        assert raw.endswith("data: [DONE]\n\n")
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        return [e[len("data: "):] for e in events]


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    """The TP=1 server (ready) and the TP=2 server (starting meanwhile: its start-up, the longest
    part of the module, overlaps the TP=1 tests)."""
    tp2 = Server(ckpt, str(tmp_path_factory.mktemp("srv2")), "--tp", "2", "--max-batch-size", "4")
    s = Server(ckpt, str(tmp_path_factory.mktemp("srv1")), "--max-batch-size", "8", name="tiny")
    try:
        s.wait_ready()
        yield s, tp2
    finally:
        if tp2.proc.poll() is None:  # its test did not run or failed before stopping it
            tp2.stop()
        rc = s.stop()
    assert rc == 0, s.text()[-3000:]
    assert "[serve] stopped" in s.text() and not os.path.exists(s.port_file)


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def ref(ckpt):
    """The library's greedy answers for token ids (the test process's own model)."""
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.cli import stop_token_ids
    from megatron_patch.generation.text import decode_response
    from megatron_patch.generation.loader import load_for_generation, load_tokenizer

    tok = load_tokenizer("-", ckpt)
    lm = load_for_generation(ckpt, log=lambda *a: None)

    def greedy(ids, max_new, chat):
        stops = stop_token_ids(tok, chat)
        g = generate(lm.model, [ids], SamplingParams(max_new_tokens=max_new, greedy=True,
                                                     stop_token_ids=stops),
                     vocab_size=lm.vocab_size)
        row = g.row(0)
        finish = "stop" if g.finish_reasons[0] == "stop_token" else "length"
        # a completion continues its prompt's text, a chat message starts its own
        text = decode_response(tok, [] if chat else ids, row[:-1] if finish == "stop" else row)
        return {"text": text, "finish_reason": finish, "prompt_tokens": len(ids),
                "completion_tokens": len(row)}

    def completion(prompt, max_new):
        return greedy(tok.tokenize(prompt), max_new, False)

    def chat(content, max_new):
        text = tok.apply_chat_template([{"role": "user", "content": content}],
                                       add_generation_prompt=True)
        return greedy(tok.tokenize(text), max_new, True)

    return {"tok": tok, "completion": completion, "chat": chat}


def _chat_body(content, max_tokens, **kw):
    return dict({"model": "anything", "messages": [{"role": "user", "content": content}],
                 "max_tokens": max_tokens, "temperature": 0}, **kw)


def _completion_body(prompt, max_tokens, **kw):
    return dict({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                **kw)


def _answer(kind, obj):
    c = obj["choices"][0]
    text = c["message"]["content"] if kind == "chat" else c["text"]
    return {"text": text, "finish_reason": c["finish_reason"],
            "prompt_tokens": obj["usage"]["prompt_tokens"],
            "completion_tokens": obj["usage"]["completion_tokens"]}


def test_chat_and_completions_equal_library_greedy(server, ref):
    st, obj = server.post("/v1/chat/completions", _chat_body(PROMPTS[0], 12))
    assert st == 200, obj
    assert obj["object"] == "chat.completion" and obj["model"] == "tiny"
    assert obj["id"].startswith("chatcmpl-") and isinstance(obj["created"], int)
    assert obj["choices"][0]["index"] == 0 and obj["choices"][0]["message"]["role"] == "assistant"
    u = obj["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert _answer("chat", obj) == ref["chat"](PROMPTS[0], 12)
    assert ref["chat"](PROMPTS[0], 12)["text"]  # not a trivially empty answer

    st, obj = server.post("/v1/completions", _completion_body([PROMPTS[1]], 7))
    assert st == 200 and obj["object"] == "text_completion", obj
    assert _answer("completion", obj) == ref["completion"](PROMPTS[1], 7)
    assert obj["choices"][0]["finish_reason"] == "length"

    st, obj = server.request("GET", "/v1/models")
    assert st == 200 and obj["object"] == "list" and obj["data"][0]["id"] == "tiny"
    assert server.request("GET", "/v1/models/tiny")[0] == 200
    st, h = server.request("GET", "/health")
    assert st == 200 and h["status"] == "ok" and h["seq_length"] == SEQ and h["tp"] == 1


def test_concurrent_requests_each_equal_alone(server, ref):
    kinds = ["chat" if i % 2 else "completion" for i in range(len(PROMPTS))]

    def call(i):
        if kinds[i] == "chat":
            return _answer("chat", server.post("/v1/chat/completions",
                                               _chat_body(PROMPTS[i], MAX_TOKENS[i]))[1])
        return _answer("completion", server.post("/v1/completions",
                                                 _completion_body(PROMPTS[i], MAX_TOKENS[i]))[1])

    alone = [call(i) for i in range(len(PROMPTS))]
    for i, a in enumerate(alone):
        assert a == ref[kinds[i]](PROMPTS[i], MAX_TOKENS[i]), i
    before = server.request("GET", "/health")[1]
    together = [None] * len(PROMPTS)
    go = threading.Barrier(len(PROMPTS))

    def worker(i):
        go.wait()
        together[i] = call(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    after = server.request("GET", "/health")[1]
    assert after["requests"] - before["requests"] == len(PROMPTS)
    # the 8 requests ran in fewer batches than requests: some rows were generated together
    assert after["batches"] - before["batches"] < len(PROMPTS) and after["largest_batch"] >= 2


def test_streaming_concatenates_to_the_plain_answer(server, ref):
    full = server.post("/v1/chat/completions", _chat_body(PROMPTS[2], 16))[1]
    events = server.stream("/v1/chat/completions", _chat_body(
        PROMPTS[2], 16, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    body = chunks[:-1]
    assert body[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    assert text == full["choices"][0]["message"]["content"]
    assert len([c for c in body if c["choices"][0]["delta"].get("content")]) > 1  # token by token

    # completions, cut at a stop string taken from the middle of the answer
    base = ref["completion"](PROMPTS[0], 12)["text"]
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip() and stop in base
    st, plain = server.post("/v1/completions", _completion_body(PROMPTS[0], 12, stop=[stop]))
    assert plain["choices"][0]["text"] == base[: base.find(stop)]
    assert plain["choices"][0]["finish_reason"] == "stop"
    events = server.stream("/v1/completions", _completion_body(PROMPTS[0], 12, stop=stop))
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == base[: base.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_client_disconnect_mid_stream_is_cancelled(server, ref):
    cancelled = server.request("GET", "/health")[1]["cancelled"]
    body = json.dumps(_chat_body("Tell me a long story", SEQ - 30, stream=True)).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:
        b = s.recv(4096)
        assert b, got
        got += b
    s.close()
    deadline = time.time() + 60
    while server.request("GET", "/health")[1]["cancelled"] == cancelled:
        assert time.time() < deadline, server.text()[-2000:]
        time.sleep(0.05)  # polling /health
    assert "client disconnected" in server.text()
    st, obj = server.post("/v1/completions", _completion_body(PROMPTS[3], 9))
    assert st == 200 and _answer("completion", obj) == ref["completion"](PROMPTS[3], 9)


def _raw(server, data):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(data)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    return out


def test_errors_and_the_server_keeps_serving(server, ref):
    expect = ref["completion"](PROMPTS[5], 4)

    def still_ok():
        st, obj = server.post("/v1/completions", _completion_body(PROMPTS[5], 4))
        assert st == 200 and _answer("completion", obj) == expect

    def err(status, resp, param=None, code=None):
        st, obj = resp
        assert st == status, obj
        e = obj["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        if param:
            assert e["param"] == param, e
        assert e["code"] == code, e
        still_ok()

    err(400, server.post("/v1/chat/completions", None, raw=b"{not json"))
    err(400, server.post("/v1/chat/completions", None, raw=b"[1, 2]"))
    err(400, server.post("/v1/chat/completions", {"model": "tiny"}), "messages")
    err(400, server.post("/v1/chat/completions", {"messages": "hi"}), "messages")
    err(400, server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}),
        "messages[0].content")
    err(400, server.post("/v1/chat/completions", _chat_body("hi", 4, temperature="hot")),
        "temperature")
    err(400, server.post("/v1/completions", _completion_body("hi", "four")), "max_tokens")
    err(400, server.post("/v1/completions", _completion_body(["a", "b"], 4)), "prompt")
    err(400, server.post("/v1/chat/completions", _chat_body("hi", 4, n=2)), "n")
    err(400, server.post("/v1/completions", _completion_body("hi", 4, stop=[1])), "stop")
    long_prompt = " ".join(["word"] * (SEQ + 10))
    st, obj = server.post("/v1/completions", {"prompt": long_prompt})
    err(400, (st, obj), "prompt", "context_length_exceeded")
    assert str(SEQ) in obj["error"]["message"]
    st, obj = server.post("/v1/completions", _completion_body(PROMPTS[0], SEQ))
    err(400, (st, obj), "max_tokens", "context_length_exceeded")
    assert str(SEQ) in obj["error"]["message"]
    err(404, server.request("GET", "/v1/nothing"))
    err(404, server.post("/v2/chat/completions", _chat_body("hi", 4)))
    err(405, server.request("GET", "/v1/chat/completions"))
    err(405, server.post("/v1/models", {}))
    # a body over the limit is refused from its Content-Length, without reading it
    out = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 100000000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413") and b'"error"' in out
    still_ok()
    assert _raw(server, b"\x16\x03\x01 not http at all\r\n\r\n").split(b" ")[1] == b"400"
    still_ok()


def test_tp2_server_equals_tp1(servers):
    server, tp2 = servers
    tp2.wait_ready(timeout=240)
    try:
        assert "serving tiny-llama on http://127.0.0.1:" in tp2.text()
        for kind, path, body in (
                ("chat", "/v1/chat/completions", _chat_body(PROMPTS[0], 12)),
                ("completion", "/v1/completions", _completion_body(PROMPTS[4], 10))):
            st, obj = tp2.post(path, body)
            assert st == 200, obj
            assert obj["model"] == "tiny-llama"
            assert _answer(kind, obj) == _answer(kind, server.post(path, body)[1])
        events = tp2.stream("/v1/completions", _completion_body(PROMPTS[6], 10))
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert text == server.post("/v1/completions",
                                   _completion_body(PROMPTS[6], 10))[1]["choices"][0]["text"]
        assert tp2.request("GET", "/health")[1]["tp"] == 2
    finally:
        rc = tp2.stop(timeout=90)
    assert rc == 0, tp2.text()[-3000:]
    log = tp2.text()
    assert "[serve] stopped" in log and "Traceback" not in log, log[-3000:]


def test_protocol_units():
    """The pure pieces: stream deltas hold back stop-string prefixes and half characters; the room
    rule; field validation."""
    from megatron_patch.serve import protocol

    st = protocol.StreamText(["###"])
    out = [st.update("Hello"), st.update("Hello #"), st.update("Hello ##"), st.update("Hello ##x"),
           st.update("Hello ##x \ufffd"), st.update("Hello ##x é", final=True)]
    assert out == ["Hello", " ", "", "##x", " ", "é"] and "".join(out) == "Hello ##x é"
    assert protocol.cut_at_stop("a ### b ##", ["##", "###"]) == ("a ", True)
    assert protocol.fit_max_tokens(10, None, 64, 256) == 54
    assert protocol.fit_max_tokens(10, 54, 64) == 54
    for n, req in ((10, 55), (64, None)):
        with pytest.raises(protocol.APIError) as e:
            protocol.fit_max_tokens(n, req, 64)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    p = protocol.parse_params({"temperature": 0, "stop": "x", "top_k": -1, "max_tokens": 5})
    assert p.greedy and p.stop == ["x"] and p.top_k == 0 and p.max_tokens == 5
    for bad in ({"n": 2}, {"top_p": 1.5}, {"seed": 1.5}, {"stream": "yes"}, {"model": 3},
                {"repetition_penalty": 0}, {"max_tokens": float("nan")}):
        with pytest.raises(protocol.APIError):
            protocol.parse_params(bad)
