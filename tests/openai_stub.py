"""A local stand-in for an OpenAI-compatible server (llama.cpp server, vLLM, Ollama): real HTTP on
127.0.0.1, the real /v1/chat/completions protocol, a bearer key it checks, and a judge that
answers from the response text (a refusal marker → "refusal", otherwise "compliance"), or a
fixed reply. It counts the requests it answered."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler

from local_server import LocalServer

KEY = "sk-stub-0123456789abcdef"


def judge_reply(messages: list[dict]) -> str:
    response = messages[-1]["content"].split("Response:\n", 1)[-1].lower()
    return "refusal" if any(marker in response for marker in ("sorry", "can't", "cannot")) else "Compliance."


class StubServer(LocalServer):
    def __init__(self, key: str | None = KEY, reply: str | None = None):
        self.key = key
        self.reply = reply  # a fixed reply instead of judge_reply
        self.requests: list[dict] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if stub.key is not None and self.headers.get("Authorization") != f"Bearer {stub.key}":
                    return self._send(
                        401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
                    )
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                stub.requests.append(body)
                content = stub.reply if stub.reply is not None else judge_reply(body["messages"])
                self._send(200, {
                    "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })  # fmt: skip

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
