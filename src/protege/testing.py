"""A scripted OpenAI-compatible upstream for tests and benchmarks.

A real HTTP/1.1 server on 127.0.0.1 (raw asyncio, so it can also misbehave the way real
networks do: stall, reset the connection, cut a stream mid-way). It answers
`/v1/chat/completions` (plain and SSE), `/v1/completions`, `/v1/embeddings`, `/v1/models`,
after a fixed `delay_ms`. Behaviour per request comes from a script (a list of actions,
consumed in order, then "ok"):

    ("ok",)                         a normal answer
    ("status", 429, {"error": ...}) that status and JSON body
    ("stall", seconds)              wait before answering (for client/proxy time-outs)
    ("reset",)                      drop the TCP connection before any response byte
    ("cut", n)                      stream n SSE chunks, then drop the connection
    ("raw", 200, b"text/plain", b"hi")  that status, content type and body, as bytes

`usage(request)`, when given, returns the usage object an answer carries (to script odd
token counts). `TcpRelay` is a TCP forwarder that can be cut and restored: a database that
goes away and comes back.

Run standalone: `python -m protege.testing --port 9100 --delay-ms 20`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import orjson

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def default_reply(request: dict) -> str:
    """Deterministic answer: echo the last user message."""
    messages = request.get("messages") or []
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), request.get("prompt", ""))
    return f"echo: {last}"


class ScriptedUpstream:
    def __init__(self, delay_ms: float = 0.0, chunk_delay_ms: float = 0.0, reply: Callable[[dict], str] = default_reply,
                 model: str | None = "gpt-4o-mini-2024-07-18", record_requests: bool = True,
                 usage: Callable[[dict], dict] | None = None):
        """`model`: the model name the answers carry; None echoes the request's model."""
        self.delay_s = delay_ms / 1000
        self.chunk_delay_s = chunk_delay_ms / 1000
        self.reply = reply
        self.usage = usage
        self.model = model
        self.script: deque = deque()
        self.requests: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        """Response bodies sent, in order (streams: the SSE bytes without chunk framing)."""
        self.record_requests = record_requests
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.count = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *actions: tuple) -> None:
        self.script.extend(actions)

    # -- life cycle -------------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._conn, host, port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self, port: int = 0) -> "ScriptedUpstream":
        """Serve on a background thread with its own event loop."""
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.serve(port=port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="scripted-upstream")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP -------------------------------------------------------------------------

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                keep = await self._respond(method, target, headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            if not writer.transport.is_closing():
                writer.close()

    def _send(self, writer, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        if self.record_requests:
            self.bodies.append(body)
        writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
                     % (status, REASONS.get(status, "Status").encode(), content_type, len(body)) + body)

    async def _respond(self, method, target, headers, body, writer) -> bool:
        self.count += 1
        path = target.split("?", 1)[0]
        try:
            request = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            request = {}
        if self.record_requests:
            self.requests.append({"method": method, "path": path, "query": target.partition("?")[2],
                                  "headers": headers, "body": body})
        action = self.script.popleft() if self.script else ("ok",)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        kind = action[0]
        if kind == "stall":
            await asyncio.sleep(action[1])
        elif kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:  # RST rather than FIN: what a crashed peer looks like
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
            return False
        elif kind == "raw":
            self._send(writer, action[1], action[3], content_type=action[2])
            await writer.drain()
            return True
        elif kind == "status":
            self._send(writer, action[1], orjson.dumps(action[2] if len(action) > 2 else {"error": {"message": "x"}}))
            await writer.drain()
            return True
        model = self.model or request.get("model") or "scripted"
        if path == "/v1/models":
            self._send(writer, 200, orjson.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}))
        elif path == "/v1/embeddings":
            inputs = request.get("input", "")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
            n = sum(len(str(x).split()) for x in inputs)
            self._send(writer, 200, orjson.dumps({"object": "list", "data": data, "model": model,
                                                  "usage": {"prompt_tokens": n, "total_tokens": n}}))
        elif path in ("/v1/chat/completions", "/v1/completions"):
            chat = path == "/v1/chat/completions"
            text = self.reply(request)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", [])) or len(
                str(request.get("prompt", "")).split())
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                     "total_tokens": prompt_tokens + len(text.split())}
            if self.usage is not None:
                usage = self.usage(request)
            if request.get("stream"):
                cut = action[1] if kind == "cut" else None
                await self._stream(writer, chat, text, usage, request, cut, model)
                return cut is None
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop"}
            self._send(writer, 200, orjson.dumps({
                "id": f"chatcmpl-{self.count}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": [choice], "usage": usage}))
        else:
            self._send(writer, 404, orjson.dumps({"error": {"message": f"no route {path}"}}))
        await writer.drain()
        return True

    async def _stream(self, writer, chat, text, usage, request, cut, model) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        base = {"id": f"chatcmpl-{self.count}", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model}
        words = text.split(" ")
        events = []
        if chat:
            events.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
        for i, w in enumerate(words):
            piece = w if i == 0 else " " + w
            delta = {"content": piece} if chat else None
            events.append({**base, "choices": [{"index": 0, **({"delta": delta} if chat else {"text": piece}),
                                                "finish_reason": None}]})
        events.append({**base, "choices": [{"index": 0, **({"delta": {}} if chat else {"text": ""}),
                                            "finish_reason": "stop"}]})
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        sent = []
        if self.record_requests:
            self.bodies.append(b"")
        for n, event in enumerate(events):
            if cut is not None and n >= cut:
                writer.transport.abort()
                return
            payload = b"data: " + orjson.dumps(event) + b"\n\n"
            sent.append(payload)
            if self.record_requests:
                self.bodies[-1] = b"".join(sent)
            writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            await writer.drain()
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        done = b"data: [DONE]\n\n"
        if self.record_requests:
            self.bodies[-1] = b"".join(sent) + done
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()


class TcpRelay:
    """A TCP forwarder on 127.0.0.1 that can be cut and restored: a database that goes away."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.conns: set = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    async def _client(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.conns.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def up(self):
        async def start():
            self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def down(self):
        async def stop():
            self.server.close()
            for w in list(self.conns):
                w.transport.abort()
            self.conns.clear()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)

    def close(self):
        self.down()

        async def cancel_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run():
        up = ScriptedUpstream(delay_ms=args.delay_ms, record_requests=False)
        await up.serve(port=args.port)
        print(f"scripted upstream on {up.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
