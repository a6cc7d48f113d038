"""`openai:MODEL@BASE_URL`: any OpenAI-compatible chat endpoint as a candidate.

    openai:gpt-4.1-mini@https://api.openai.com/v1          the frontier baseline
    openai:my-specialist@http://127.0.0.1:8000/v1?prompt=specialist   a vLLM/protege server

Options: `concurrency` (default 8 requests in flight), `retries` (default 5; on 429, 5xx
and connection errors, exponential backoff from 0.5 s honouring Retry-After),
`key_env` (default OPENAI_API_KEY), `prompt` (`original`: the messages the app sent,
the default; `specialist`: the task's own prompt), `max_tokens`, `temperature` (default 0),
`cache` (default on). Responses are cached in `HOME/cache/responses.db` keyed by the hash
of URL + request, so re-running a benchmark costs nothing; a cached answer keeps the
latency measured when it was fetched.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import orjson

from ..errors import ProtegeError
from ..tasks.metrics import normalize_text
from ..tasks.prompting import specialist_messages
from ..traces import normalize
from .base import Context, Prediction, option

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ResponseCache:
    """A small SQLite table of request hash -> (response JSON, measured latency)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response BLOB NOT NULL, "
                        "latency_ms REAL, created_at REAL NOT NULL)")
        self.lock = threading.Lock()

    def get(self, key: str):
        with self.lock:
            row = self.db.execute("SELECT response, latency_ms FROM responses WHERE key = ?", (key,)).fetchone()
        return (orjson.loads(row[0]), row[1]) if row else None

    def put(self, key: str, response: dict, latency_ms: float) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                            (key, orjson.dumps(response), latency_ms, time.time()))
            self.db.commit()

    def close(self):
        self.db.close()


def openai_endpoint(rest: str, options: dict[str, str], where: str) -> tuple[str, str, str | None]:
    """(model, base URL, API key) of `openai:MODEL@BASE_URL[?key_env=NAME]`, the key read
    from the environment; `where` names the candidate or flag in errors."""
    if "@" not in rest:
        raise ProtegeError(f"{where}: write openai:MODEL@BASE_URL, e.g. openai:gpt-4.1-mini@https://api.openai.com/v1")
    model, base_url = rest.split("@", 1)
    base_url = base_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ProtegeError(f"{where}: the base URL must start with http:// or https://")
    key_env = options.get("key_env", "OPENAI_API_KEY")
    api_key = os.environ.get(key_env)
    if not api_key and "api.openai.com" in base_url:
        raise ProtegeError(f"{where}: no API key; set {key_env} (or name another variable with ?key_env=NAME)")
    return model, base_url, api_key


class OpenAICandidate:
    kind = "api"

    def __init__(self, rest: str, options: dict[str, str], ctx: Context):
        self.spec = f"openai:{rest}"
        self.model, self.base_url, self.api_key = openai_endpoint(rest, options, f"candidate {self.spec}")
        self.ctx = ctx
        self.concurrency = option(options, "concurrency", 8, int, self.spec)
        self.retries = option(options, "retries", 5, int, self.spec)
        self.prompt = option(options, "prompt", "original", str, self.spec)
        if self.prompt not in ("original", "specialist"):
            raise ProtegeError(f"candidate {self.spec}: prompt must be original or specialist")
        self.max_tokens = option(options, "max_tokens", None, int, self.spec)
        self.temperature = option(options, "temperature", 0.0, float, self.spec)
        use_cache = option(options, "cache", "on", str, self.spec) not in ("off", "0", "false")
        self.cache = ResponseCache(ctx.home / "cache" / "responses.db") if use_cache else None
        self.calls = 0
        """Requests actually sent (retries included): what this run cost in API calls."""

    def _request(self, row: dict) -> dict:
        if self.prompt == "original" and row.get("messages"):
            messages = row["messages"]
        else:
            messages = specialist_messages(self.ctx.task, row["input"], instructed=True)
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return body

    def _key(self, body: dict) -> str:
        return hashlib.sha256(self.base_url.encode() + b"\0" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()

    async def _call(self, session, body: dict) -> tuple[dict, float]:
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = 0.5
        for attempt in range(self.retries + 1):
            self.calls += 1
            t0 = time.perf_counter()
            try:
                async with session.post(f"{self.base_url}/chat/completions", data=orjson.dumps(body),
                                        headers=headers) as resp:
                    payload = await resp.read()
                    latency = (time.perf_counter() - t0) * 1000
                    if resp.status == 200:
                        return orjson.loads(payload), latency
                    if resp.status not in RETRY_STATUS or attempt == self.retries:
                        raise ProtegeError(f"{self.spec}: HTTP {resp.status}: {payload[:300].decode('utf-8', 'replace')}")
                    retry_after = resp.headers.get("Retry-After")
                    wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else delay
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if attempt == self.retries:
                    raise ProtegeError(f"{self.spec}: {type(exc).__name__}: {exc}") from None
                wait = delay
            await asyncio.sleep(min(wait, 60.0))
            delay *= 2
        raise AssertionError("unreachable")

    def _prediction(self, response: dict, latency: float, cached: bool) -> Prediction:
        text = normalize.output_text("chat/completions", response) or ""
        text = normalize_text(text, self.ctx.task.normalize)
        prompt, completion, cached_tokens = normalize.usage(response)
        model = response.get("model") or self.model
        cost = self.ctx.prices.cost(model, prompt, completion, cached_tokens) if self.ctx.prices else None
        return Prediction(output=text, prompt_tokens=prompt, completion_tokens=completion, latency_ms=latency,
                          cost_usd=cost, cached=cached)

    async def _run(self, rows, progress):
        import aiohttp

        sem = asyncio.Semaphore(self.concurrency)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async def one(row):
                body = self._request(row)
                key = self._key(body)
                hit = self.cache.get(key) if self.cache else None
                if hit is not None:
                    pred = self._prediction(hit[0], hit[1], True)
                else:
                    async with sem:
                        response, latency = await self._call(session, body)
                    if self.cache:
                        self.cache.put(key, response, latency)
                    pred = self._prediction(response, latency, False)
                if progress:
                    progress(1)
                return pred

            return await asyncio.gather(*(one(r) for r in rows))

    def predict(self, rows, progress=None):
        return list(asyncio.run(self._run(rows, progress)))

    def close(self):
        if self.cache:
            self.cache.close()

