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
filter (finish_reason content_filter).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from draftdata.collect.synthesize import HFGenerator, Prompt


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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
