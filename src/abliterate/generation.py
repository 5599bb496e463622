"""Where greedy answers come from: the model in memory, or an OpenAI-compatible server that serves it.

Judged answers are the slow part of an evaluation, and serving engines (vLLM with tensor
parallelism, llama.cpp's server, Ollama, `abliterate serve`) are built for it. Everything else an
evaluation measures (next-token log-probs, teacher-forced KL and perplexity) is forward passes on
the model loaded here, so the answers the server gives must be the ones that model would give:
the served model id is checked against the model, and every answer's prompt must come to the
same number of tokens as the model's own chat template gives it.

The client speaks chat completions (`/v1/chat/completions`, temperature 0): every such server
implements it, and it is the path on which each applies its own template correctly (a BOS the
template writes is not doubled). The completions API with our templated text would fix the
prompt's text but not its special tokens (llama.cpp adds a BOS to text prompts, Ollama templates
them again); the prompt-length check above is what keeps the chat path honest.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from abliterate import model as M
from abliterate.errors import AbliterateError
from abliterate.prompts import supports_thinking

OnAnswer = Callable[[int], None]


class Generator(Protocol):
    """Greedy answers to user prompts, in input order, as the judge reads them (no special tokens, stripped)."""

    def answers(self, prompts: list[str], texts: list[str], max_new_tokens: int,
                on_answers: OnAnswer | None = None) -> list[str]:  # fmt: skip
        """`prompts` as the user wrote them; `texts` the same, chat-formatted for the model in memory."""
        ...


@dataclass
class InProcess:
    """The model in memory: batched, left-padded greedy decoding (`model.generate`)."""

    model: Any
    tokenizer: Any
    batch_size: int

    def answers(self, prompts: list[str], texts: list[str], max_new_tokens: int,
                on_answers: OnAnswer | None = None) -> list[str]:  # fmt: skip
        """Greedy answers of the model in memory to the formatted texts."""
        return M.generate(self.model, self.tokenizer, texts, max_new_tokens, self.batch_size, on_answers)


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server as the user named it: base URL and, optionally, the served model's id."""

    url: str
    model: str | None = None  # None: the server must serve exactly one model, named like the model measured
    parallel: int = 16  # requests in flight at once: servers batch them
    timeout: float = 600.0  # seconds one answer may take

    @property
    def base(self) -> str:
        """The API root: the URL as given when it names a path, else URL/v1."""
        url = self.url.rstrip("/")
        return url if urllib.parse.urlsplit(url).path not in ("", "/") else url + "/v1"


def request(endpoint: Endpoint, path: str, body: dict | None = None) -> Any:
    """GET (no body) or POST JSON to the server; any failure is one line naming the server and the cause."""
    url = endpoint.base + path
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"  # vLLM --api-key, hosted servers; never logged
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=endpoint.timeout) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as exc:
        raise AbliterateError(
            f"the generation server at {url} answered HTTP {exc.code}: {_error_message(exc)}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise AbliterateError(
                f"the generation server at {url} did not answer within {endpoint.timeout:.0f} s; "
                "check that it is generating (its log) and has the capacity for 16 requests at once"
            ) from None
        raise AbliterateError(
            f"cannot reach the generation server at {url} ({reason}); start it or check the endpoint URL"
        ) from None
    except ValueError:
        raise AbliterateError(f"{url} did not answer JSON; is it an OpenAI-compatible server (…/v1)?") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The server's own error message where it sent one (OpenAI's {"error": {"message"}} shape), else the reason."""
    try:
        error = json.loads(exc.read()).get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError, OSError):
        text = None
    return " ".join(str(text or exc.reason).split())[:300]


def served_model(endpoint: Endpoint, spec: str) -> str:
    """The id to ask the server for, after checking that it serves the model `spec` (see `same_model`)."""
    reply = request(endpoint, "/models")
    try:
        ids = [str(m["id"]) for m in reply["data"]]
    except (KeyError, TypeError):
        raise AbliterateError(
            f"{endpoint.base}/models did not list models; is it an OpenAI-compatible server?"
        ) from None
    listed = ", ".join(repr(i) for i in ids) or "none"
    if endpoint.model is not None:
        if endpoint.model not in ids:
            raise AbliterateError(f"the server at {endpoint.base} serves {listed}, not {endpoint.model!r}; "
                                  "check --endpoint-model (or --baseline-endpoint-model)")  # fmt: skip
        return endpoint.model
    matching = [i for i in ids if same_model(i, spec)]
    if len(matching) != 1:
        raise AbliterateError(
            f"the server at {endpoint.base} serves {listed}, which is not recognisably {spec}; serve {spec} there, or "
            "name the served model that holds its weights with --endpoint-model (--baseline-endpoint-model)"
        )
    return matching[0]


def same_model(served: str, spec: str) -> bool:
    """Whether a served id names the model: the same string, the same path, or the same file or folder name."""
    if served == spec:
        return True
    a, b = Path(served).expanduser(), Path(spec).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    stem = lambda p: (p.name[: -len(".gguf")] if p.name.lower().endswith(".gguf") else p.name).lower()  # noqa: E731
    return bool(stem(a)) and stem(a) == stem(b)


@dataclass
class Served:
    """Answers from a server: chat completions at temperature 0, several requests at once."""

    endpoint: Endpoint
    model_id: str  # as the server lists it (served_model)
    tokenizer: Any  # the measured model's: counts the prompt tokens the server must see
    system_prompt: str | None = None
    thinking: bool = False

    def answers(self, prompts: list[str], texts: list[str], max_new_tokens: int,
                on_answers: OnAnswer | None = None) -> list[str]:  # fmt: skip
        """Each prompt's answer from the server; its prompt length is checked against the model's own template."""
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]
        messages = [[{"role": "system", "content": self.system_prompt}] if self.system_prompt else [] for _ in prompts]
        for chat, prompt in zip(messages, prompts):
            chat.append({"role": "user", "content": prompt})

        def ask(i: int) -> str:
            text = self._complete(messages[i], max_new_tokens, lengths[i], i)
            if on_answers:
                on_answers(1)
            return text

        pool = ThreadPoolExecutor(max(1, min(self.endpoint.parallel, len(prompts))))
        try:
            return list(pool.map(ask, range(len(prompts))))
        finally:  # after a failure, the requests not yet sent are dropped rather than waited for
            pool.shutdown(wait=False, cancel_futures=True)

    def _complete(self, messages: list[dict], max_new_tokens: int, length: int, index: int) -> str:
        body: dict[str, Any] = {"model": self.model_id, "messages": messages, "temperature": 0,
                                "max_tokens": max_new_tokens, "stream": False}  # fmt: skip
        if not self.thinking and supports_thinking(self.tokenizer):
            body["chat_template_kwargs"] = {"enable_thinking": False}  # vLLM, llama.cpp and `serve` read this
        reply = request(self.endpoint, "/chat/completions", body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise AbliterateError(f"{self.endpoint.base}/chat/completions answered without choices[0].message; "
                                  "is it an OpenAI-compatible server?") from None  # fmt: skip
        seen = (reply.get("usage") or {}).get("prompt_tokens")
        if isinstance(seen, int) and seen != length:
            raise AbliterateError(
                f"the server's template made prompt {index + 1} {seen} tokens where the model's own chat template makes "
                f"it {length}: it serves another model, tokenizer or template; serve the same model with its own chat "
                "template (llama.cpp: --jinja)"
            )
        return (content or "").strip()
