"""A minimal OpenAI-compatible server on 127.0.0.1 with a real HF model behind it (for the
`--endpoint` tests of synthesize and prompts; the model is real, only the HTTP front is ours).

POST /v1/chat/completions honours messages, max_tokens, temperature, top_p and seed;
POST /v1/completions takes a token-id `prompt` and returns its continuation as text (with the
special tokens unless `skip_special_tokens` is true, without the stop token, as vLLM does);
GET /v1/models lists one model. Test hooks: a chat message "FORBIDDEN" gets HTTP 400; the first
request whose text contains "FLAKY" (or any completions request while `flaky` is set) gets HTTP
503 once (the client must retry); `completion_suffix` is appended to completion texts (a
server that ignores stop_token_ids runs on after the end of turn); `reject_completions` answers
completions with HTTP 400; the next `filter_completions` completions come back cut by a content
filter (finish_reason content_filter). `OddServer` has no model and misbehaves on request.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from draftdata.collect.synthesize import HFGenerator, Prompt


class QuietServer(ThreadingHTTPServer):
    """A client that went away (a run stopped, a request cut off) is no error of the server's: the
    traceback a handler thread printed for it could land at any later moment of the test session
    (and Python 3.11's traceback carets parse source with `ast`, which is not thread-safe there:
    pytest's own parsing then failed with "AST constructor recursion depth mismatch")."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class ChatServer:
    def __init__(self, model_path: Path, name: str = "tiny-llama", max_new_tokens: int = 10):
        self.generator = HFGenerator(model_path, max_new_tokens=max_new_tokens, dtype="fp32")
        self.name, self.lock, self.requests, self.flaky_failed = name, threading.Lock(), [], False
        self.flaky, self.completion_suffix, self.reject_completions = False, "", False
        self.filter_completions = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
                else:
                    self.reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                routes = {"/v1/chat/completions": server.chat, "/v1/completions": server.complete}
                if self.path not in routes:
                    return self.reply(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = routes[self.path](body, self.headers.get("Authorization"))
                self.reply(status, payload)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _check(self, body: dict, auth: str | None, text: str) -> tuple[int, dict] | None:
        self.requests.append({**body, "auth": auth})
        if body.get("model") != self.name:
            return 404, {"error": {"message": f"model {body.get('model')!r} does not exist"}}
        if ("FLAKY" in text or self.flaky) and not self.flaky_failed:
            self.flaky_failed = True
            return 503, {"error": {"message": "overloaded (test)"}}
        return None

    def _sampling(self, body: dict) -> HFGenerator:
        g = self.generator
        g.max_new_tokens, g.temperature = body["max_tokens"], body.get("temperature", 1.0)
        g.top_p = body.get("top_p", 1.0)
        return g

    def chat(self, body: dict, auth: str | None) -> tuple[int, dict]:
        with self.lock:
            text = json.dumps(body["messages"])
            if (error := self._check(body, auth, text)) is not None:
                return error
            if "FORBIDDEN" in text:
                return 400, {"error": {"message": "prompt is too long (test)"}}
            answer = self._sampling(body).generate([Prompt(body["messages"], body.get("seed", 0))])[0]
        return 200, {"object": "chat.completion", "model": self.name, "choices": [{
            "index": 0, "message": {"role": "assistant", "content": answer.text},
            "finish_reason": "length" if answer.truncated else "stop"}],
            "usage": {"completion_tokens": answer.tokens}}

    def complete(self, body: dict, auth: str | None) -> tuple[int, dict]:
        with self.lock:
            if (error := self._check(body, auth, "")) is not None:
                return error
            if self.reject_completions:
                return 400, {"error": {"message": "unknown field stop_token_ids (test)"}}
            if self.filter_completions > 0:
                self.filter_completions -= 1
                return 200, {"object": "text_completion", "model": self.name, "choices": [{
                    "index": 0, "text": "", "finish_reason": "content_filter"}], "usage": {"completion_tokens": 0}}
            g = self._sampling(body)
            [(tokens, stopped)] = g.generate_ids([body["prompt"]], [body.get("seed", 0)])
            text = g.tokenizer.decode(tokens[:-1] if stopped else tokens,
                                      skip_special_tokens=body.get("skip_special_tokens", True))
        return 200, {"object": "text_completion", "model": self.name, "choices": [{
            "index": 0, "text": text + self.completion_suffix, "finish_reason": "stop" if stopped else "length"}],
            "usage": {"completion_tokens": len(tokens)}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class OddServer:
    """An OpenAI-compatible front without a model that misbehaves on request, keyed by words in
    the user's message (what proxies and overloaded servers do): USAGESTR (usage "n/a"), FILTER
    (finish_reason content_filter), CLOSE503 (a 503 whose body is cut off, once), CUT200 (a 200
    whose body stops short of its Content-Length), TRICKLE (a body sent a byte at a time), R307 (a
    redirect), FORBIDDEN (HTTP 400), BUSY (HTTP 503), HANG (no answer for `hang` s; every POST
    when `hang_all` is set); each answer after `delay` s. GET /v1/models redirects to /v1/models/
    (as some servers do), which lists the model. `posts` counts the POSTs received."""

    def __init__(self, delay: float = 0.0, hang: float = 120.0):
        state = {"close503": 0}
        self.hang_all, self.posts = False, 0
        self.closing = threading.Event()  # ends every wait: no handler outlives the test
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, status, body: bytes, length=None, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()

            def do_GET(self):
                if not self.path.endswith("/"):
                    return self.send(307, b"", headers=[("Location", self.path + "/")])
                body = json.dumps({"object": "list", "data": [{"id": "odd", "object": "model"}]}).encode()
                self.send(200, body)
                self.wfile.write(body)

            def do_POST(self):
                text = self.rfile.read(int(self.headers["Content-Length"])).decode()
                server.posts += 1
                if server.closing.wait(hang if "HANG" in text or server.hang_all else delay):
                    return
                word = next((w for w in ("USAGESTR", "FILTER", "CLOSE503", "CUT200", "TRICKLE", "R307", "FORBIDDEN",
                                         "BUSY") if w in text), "")
                if word in ("FORBIDDEN", "BUSY"):
                    body = b'{"error": {"message": "no (test)"}}'
                    self.send(400 if word == "FORBIDDEN" else 503, body)
                    return self.wfile.write(body)
                if word == "CUT200":
                    self.send(200, b"", length=1000)
                    self.wfile.write(b'{"object": "chat.completion", ')
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if word == "R307":
                    self.send(307, b"", headers=[("Location", "/elsewhere")])
                    return
                if word == "CLOSE503" and state["close503"] == 0:
                    state["close503"] += 1
                    self.send(503, b"", length=1000)
                    self.wfile.write(b'{"error": ')
                    self.wfile.flush()
                    self.close_connection = True
                    return
                body = json.dumps({"object": "chat.completion", "model": "odd", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": f"answer to {word or 'you'}"},
                    "finish_reason": "content_filter" if word == "FILTER" else "stop"}],
                    "usage": "n/a" if word == "USAGESTR" else {"completion_tokens": 3}}).encode()
                self.send(200, body)
                if word == "TRICKLE":
                    for b in body:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(0.2)
                else:
                    self.wfile.write(body)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
