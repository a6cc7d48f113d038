"""Turn raw OpenAI-style payloads into the normalised trace fields.

Shared by the proxy, the SDK wrapper, the importers and the API candidates, so a trace
means the same thing whichever way it arrived. It lives with the store, below every
stage that captures or reads payloads.
"""

from __future__ import annotations

from typing import Any

import orjson

CLIENT_CLOSED = "client closed the stream before its end"
"""The error of a streamed call whose client stopped reading early (proxy and SDK alike):
the trace keeps the output received until then, with `metadata.client_disconnected`."""

ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
}


def output_text(endpoint: str, response: Any) -> str | None:
    """The text a caller would read from a response body: the first choice's content."""
    if not isinstance(response, dict):
        return None
    choices = response.get("choices")
    if endpoint == "chat/completions" and isinstance(choices, list) and choices:
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # content parts
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if message.get("tool_calls"):
                return orjson.dumps(message["tool_calls"]).decode()
        return None
    if endpoint == "completions" and isinstance(choices, list) and choices and isinstance(choices[0], dict):
        text = choices[0].get("text")
        return text if isinstance(text, str) else None
    return None


def usage(response: Any) -> tuple[int | None, int | None, int | None]:
    """(prompt_tokens, completion_tokens, cached_tokens) as the API reported them."""
    if not isinstance(response, dict) or not isinstance(response.get("usage"), dict):
        return None, None, None
    u = response["usage"]
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    if completion is None and prompt is not None and "total_tokens" in u:  # embeddings
        completion = 0
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    as_int = lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None  # noqa: E731
    return as_int(prompt), as_int(completion), as_int(cached)


def assemble_sse(body: bytes, endpoint: str) -> tuple[dict | None, str | None]:
    """Rebuild the completion object from a streamed (SSE) body; see `assemble_events`."""
    events: list[Any] = []
    done = False
    problem = None
    for raw_line in body.split(b"\n"):
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            events.append(orjson.loads(data))
        except orjson.JSONDecodeError:
            problem = "stream carried a line that is not JSON"
    response, event_problem = assemble_events(events, endpoint)
    problem = problem or event_problem
    if not done and problem is None:
        problem = "stream ended before data: [DONE]"
    return response, problem


def assemble_events(events: list[Any], endpoint: str) -> tuple[dict | None, str | None]:
    """Rebuild the completion object from stream chunks (parsed JSON objects).

    Returns (assembled response, problem): the response has the concatenated content of
    each choice, the finish reasons, and `usage` when the stream carried it
    (`stream_options.include_usage`). `problem` describes an error event in the stream.
    """
    texts: dict[int, list[str]] = {}
    finish: dict[int, Any] = {}
    roles: dict[int, str] = {}
    tool_calls: dict[int, list] = {}
    meta: dict[str, Any] = {}
    usage_obj = None
    problem = None
    for event in events:
        if not isinstance(event, dict):
            continue
        if "error" in event:
            problem = f"stream error event: {orjson.dumps(event['error']).decode()[:500]}"
            continue
        for key in ("id", "model", "created", "system_fingerprint"):
            if event.get(key) is not None and key not in meta:
                meta[key] = event[key]
        if event.get("usage"):
            usage_obj = event["usage"]
        for choice in event.get("choices") or []:
            idx = choice.get("index", 0)
            if endpoint == "completions":
                piece = choice.get("text")
            else:
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if delta.get("role"):
                    roles[idx] = delta["role"]
                if delta.get("tool_calls"):
                    tool_calls.setdefault(idx, []).extend(delta["tool_calls"])
            if piece:
                texts.setdefault(idx, []).append(piece)
            if choice.get("finish_reason") is not None:
                finish[idx] = choice["finish_reason"]
    indices = sorted(set(texts) | set(finish) | set(roles))
    if not indices and not meta:
        return None, problem
    choices = []
    for idx in indices:
        text = "".join(texts.get(idx, []))
        if endpoint == "completions":
            choices.append({"index": idx, "text": text, "finish_reason": finish.get(idx)})
        else:
            message: dict[str, Any] = {"role": roles.get(idx, "assistant"), "content": text}
            if idx in tool_calls:
                message["tool_calls"] = tool_calls[idx]
            choices.append({"index": idx, "message": message, "finish_reason": finish.get(idx)})
    obj = "chat.completion" if endpoint == "chat/completions" else "text_completion"
    response = {**meta, "object": obj, "choices": choices}
    if usage_obj is not None:
        response["usage"] = usage_obj
    return response, problem


def model_name(payload: Any) -> str | None:
    """A request's or response's `model` as text; None when it has none (or an object)."""
    model = payload.get("model") if isinstance(payload, dict) else None
    if isinstance(model, str):
        return model or None
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        return str(model)
    return None


def task_from(request: Any, header: str | None) -> str | None:
    """The task tag: the `X-Protege-Task` header wins over `metadata.protege_task`."""
    if header:
        return header
    if isinstance(request, dict):
        meta = request.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("protege_task"), str):
            return meta["protege_task"]
    return None


def error_text(body: bytes | str | None, limit: int = 2000) -> str | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return body[:limit]


def provider_for(model: str | None, prices, upstream: str | None = None) -> str | None:
    """The provider named in the price table for this model, else guessed from the upstream host."""
    price = prices.lookup(model) if prices is not None else None
    if price is not None and price.provider:
        return price.provider
    if upstream:
        host = upstream.split("//", 1)[-1].split("/", 1)[0].lower()
        for needle, name in (("openai.com", "openai"), ("anthropic.com", "anthropic"), ("googleapis.com", "google"),
                             ("mistral.ai", "mistral"), ("together", "together"), ("groq.com", "groq")):
            if needle in host:
                return name
    return None
