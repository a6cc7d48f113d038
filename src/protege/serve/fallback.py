"""The frontier model behind `protege serve`'s cascade, and what counts as a usable answer from it."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson


class Fallback:
    """The frontier model the cascade hands low-confidence requests to: `openai:MODEL@URL`."""

    def __init__(self, spec: str, timeout_s: float = 120.0):
        from ..models.base import parse_spec
        from ..models.openai_api import openai_endpoint

        scheme, rest, options = parse_spec(spec)
        if scheme != "openai":
            rest = ""  # no '@': the one message that says how to write it
        self.spec = spec
        self.model, base, self.key = openai_endpoint(rest, options, f"--fallback {spec!r}")
        self.url = base + "/chat/completions"
        self.timeout_s = timeout_s
        self.session = None

    async def complete(self, body: dict) -> tuple[dict, int]:
        import aiohttp

        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        payload = {**body, "model": self.model, "stream": False}
        payload.pop("stream_options", None)
        try:
            async with self.session.post(self.url, data=orjson.dumps(payload), headers=headers) as resp:
                data = await resp.read()
                try:
                    parsed = orjson.loads(data)
                except orjson.JSONDecodeError:
                    parsed = {"error": {"message": data[:500].decode("utf-8", "replace"), "type": "upstream_error"}}
                return parsed, resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return {"error": {"message": f"fallback {self.model} unreachable: {type(exc).__name__}: {exc}",
                              "type": "upstream_error"}}, 502

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def fallback_answer(data: Any, status: int) -> tuple[str | None, str | None]:
    """(the fallback's reply text, None) or (None, what is wrong with its answer)."""
    if status >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        detail = orjson.dumps(error).decode() if error is not None else orjson.dumps(data).decode()
        return None, f"HTTP {status}: {detail[:500]}"
    if not isinstance(data, dict):
        return None, f"HTTP {status} with a JSON {type(data).__name__}, not a chat completion object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return None, f"HTTP {status} with no choices ({orjson.dumps(choices).decode()[:100]})"
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        return None, f"HTTP {status} whose choices[0] has no message ({orjson.dumps(choices[0]).decode()[:100]})"
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return None, f"HTTP {status} whose choices[0].message.content is a {type(content).__name__}, not text"
    return content or "", None
