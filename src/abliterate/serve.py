"""`abliterate serve MODEL`: a small OpenAI-compatible server for any model abliterate can load.

For the tests (a real server over real HTTP), and for users who want the saved edited model behind
`--generate-endpoint` without installing a serving engine. Greedy requests that arrive together are
decoded as one left-padded batch by `model.generate_ids`, the same function that generates in
memory; for large models and real throughput serve with vLLM or llama.cpp's server instead
(docs/serving.md).

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (greedy at temperature 0,
sampled above it; no streaming).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from abliterate import model as M
from abliterate.prompts import format_prompt, has_chat_template


class RequestError(Exception):
    """A bad request: answered with HTTP `status` and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Server:
    """A loaded model behind the OpenAI routes; `handle` is the whole protocol, HTTP aside."""

    lm: M.LoadedModel
    model_id: str
    batch_size: int = 16
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time
    waiting: queue.Queue = field(default_factory=queue.Queue)  # greedy text prompts: (text, max_tokens, Future)

    def __post_init__(self) -> None:
        threading.Thread(target=self._batches, daemon=True).start()

    def _batches(self) -> None:
        """Forever: take the greedy prompts waiting (up to batch_size) and decode each max_tokens group as one batch."""
        while True:
            jobs = [self.waiting.get()]
            while len(jobs) < self.batch_size:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            for max_tokens in dict.fromkeys(n for _, n, _ in jobs):
                group = [(text, future) for text, n, future in jobs if n == max_tokens]
                try:
                    with self.lock:
                        pairs = M.generate_ids(self.lm.model, self.lm.tokenizer, [t for t, _ in group], max_tokens,
                                               len(group))  # fmt: skip
                except Exception as exc:  # the requests waiting for this batch answer with it
                    for _, future in group:
                        future.set_exception(exc)
                    continue
                for (_, future), (_, answer) in zip(group, pairs):
                    future.set_result(answer)

    def handle(self, method: str, path: str, body: dict | None) -> dict:
        """The JSON answer to one request."""
        route = path.split("?")[0].rstrip("/")
        if method == "GET" and route in ("/v1/models", "/models"):
            return {"object": "list", "data": [{"id": self.model_id, "object": "model", "owned_by": "abliterate"}]}
        if method == "POST" and not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        body = body or {}
        if method == "POST" and route in ("/v1/chat/completions", "/chat/completions"):
            return self._completion(self._chat_prompt(_field(body, "messages", list), body), body, chat=True)
        if method == "POST" and route in ("/v1/completions", "/completions"):
            prompt = _field(body, "prompt", (str, list))
            return self._completion(prompt if isinstance(prompt, str) else _token_ids(prompt), body, chat=False)
        raise RequestError(404, f"no route {method} {route}; this server has /v1/models, /v1/chat/completions "
                                "and /v1/completions")  # fmt: skip

    def _chat_prompt(self, messages: list, body: dict) -> str:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) or not messages:
            raise RequestError(400, "messages must be a non-empty list of {role, content} with text content")
        tok = self.lm.tokenizer
        if has_chat_template(tok):
            extra = body.get("chat_template_kwargs") or {}
            return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra))
        roles = [m["role"] for m in messages]
        if roles not in (["user"], ["system", "user"]):
            raise RequestError(400, "the model has no chat template: send one user message (and a system one)")
        system = messages[0]["content"] if roles[0] == "system" else None
        return format_prompt(tok, messages[-1]["content"], system)  # the plain format abliterate uses too

    def _completion(self, prompt: str | list[int], body: dict, chat: bool) -> dict:
        requested = body.get("model")
        if requested not in (None, self.model_id):
            raise RequestError(404, f"model {requested!r} is not served here; this server serves {self.model_id!r}")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
        temperature = body.get("temperature", 1.0)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(400, "max_tokens must be a positive integer")
        if not isinstance(temperature, int | float) or temperature < 0:
            raise RequestError(400, "temperature must be a number >= 0")
        tok, net = self.lm.tokenizer, self.lm.model
        ids = prompt if isinstance(prompt, list) else tok(prompt, add_special_tokens=False).input_ids
        context = M.context_length(net)
        if context is not None and len(ids) + max_tokens > context:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed the "
                                    f"model's context of {context} tokens")  # fmt: skip
        if isinstance(prompt, str) and temperature == 0:
            future: Future[list[int]] = Future()
            self.waiting.put((prompt, max_tokens, future))
            answer = future.result()
        else:
            with self.lock:
                answer = _generate(self.lm, ids, max_tokens, float(temperature), body.get("seed"))
        stopped = bool(answer) and answer[-1] in M.stop_ids(net, tok)
        text = M.answer_text(tok, answer)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if stopped else "length"}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(answer),
                "total_tokens": len(ids) + len(answer),
            },  # fmt: skip
        }


def _field(body: dict, name: str, kind) -> Any:
    if not isinstance(body.get(name), kind):
        raise RequestError(400, f"the request body must be a JSON object with '{name}'")
    return body[name]


def _token_ids(prompt: list) -> list[int]:
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise RequestError(400, "a list prompt must be one non-empty list of token ids")
    return prompt


@torch.no_grad()
def _generate(lm: M.LoadedModel, ids: list[int], max_tokens: int, temperature: float, seed: Any) -> list[int]:
    """One sequence (a token-id prompt, or sampled), no padding, up to and including the first stop token."""
    sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature}
        if isinstance(seed, int):
            torch.manual_seed(seed)
    inputs = torch.tensor([ids], device=lm.device)
    out = lm.model.generate(  # type: ignore[operator]  # a causal LM's generate
        input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
        pad_token_id=lm.tokenizer.pad_token_id, **sampling,
    )  # fmt: skip
    answer = out[0, len(ids) :].tolist()
    stop = M.stop_ids(lm.model, lm.tokenizer)
    return answer[: next((k + 1 for k, t in enumerate(answer) if t in stop), len(answer))]


def serve(lm: M.LoadedModel, model_id: str, host: str, port: int, batch_size: int = 16,
          ready: Callable[[str], None] = print) -> None:  # fmt: skip
    """Serve until interrupted; `ready` gets the API root URL once the port is bound (port 0: a free one)."""
    server = Server(lm, model_id, batch_size)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
            self._answer("GET", None)

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                self._send(400, _error(400, "the request body is not JSON"))
                return
            self._answer("POST", body)

        def _answer(self, method: str, body: dict | None) -> None:
            try:
                self._send(200, server.handle(method, self.path, body))
            except RequestError as exc:
                self._send(exc.status, _error(exc.status, str(exc)))
            except Exception as exc:  # the model failed (out of memory, ...): the client hears why
                self._send(500, _error(500, f"generation failed: {type(exc).__name__}: {exc}"))

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the ready line and any error

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    ready(f"http://{host}:{httpd.server_port}/v1")  # server_port: the one bound, also for --port 0
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a server is meant to stop
    finally:
        httpd.server_close()


def model_id(source: M.ModelSource) -> str:
    """The id the server lists: a local model's absolute path (what `--generate-endpoint` checks), else its name."""
    if source.kind in ("builtin", "hub") or source.path is None:
        return source.spec
    return str(source.path / source.gguf_file) if source.gguf_file else str(source.path)


def _error(status: int, message: str) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "code": status}}
