"""The dashboard's web layer: a small ASGI app (routes, forms, cookies, the optional token,
static files, security headers) with Jinja2 templates, autoescaped.

Pages are plain functions `(Request) -> Response` that read the store; they run in worker
threads so a slow read never holds the event loop, and each read is its own short
transaction (SQLite in WAL mode, PostgreSQL MVCC: a reader never blocks a writer).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import mimetypes
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote, urlencode

import jinja2

from ..decide.formatting import count, pct, usd
from ..errors import NotFoundError, ProtegeError

log = logging.getLogger("protege.ui")
HERE = Path(__file__).parent
STATIC = HERE / "static"
COOKIE = "protege_ui"
MAX_FORM_BYTES = 1 << 20
# nothing loads from elsewhere, and no script runs but protege's own files
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    form: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str, default: str | None = None) -> str | None:
        value = self.query.get(name, "").strip()
        return value or default

    def int_arg(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.number(name, int, lo, hi)
        return default if value is None else int(value)

    def float_arg(self, name: str, lo: float, hi: float | None = None) -> float | None:
        return self.number(name, float, lo, hi)

    def number(self, name: str, cast, lo: float, hi: float | None) -> float | None:
        """The query argument as a number in [lo, hi] (None when absent), or a BadRequest saying why not."""
        raw = self.arg(name)
        if raw is None:
            return None
        try:
            value = cast(raw)
        except ValueError:
            raise BadRequest(f"?{name}= takes a {'whole ' if cast is int else ''}number, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise BadRequest(f"?{name}= takes a number from {lo:g}" + (f" to {hi:g}" if hi is not None else " up")
                             + f", got {value:g}")
        return value


@dataclass
class Response:
    body: bytes | str
    status: int = 200
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(ProtegeError):
    """A request the dashboard cannot answer as asked (400, with the reason)."""


def redirect(url: str) -> Response:
    return Response(b"", 303, headers={"location": url})


def query_string(**values) -> str:
    """`?a=1&b=2` of the values that are set (for links that keep the list's filters)."""
    kept = {k: v for k, v in values.items() if v not in (None, "")}
    return ("?" + urlencode(kept)) if kept else ""


class Templates:
    def __init__(self):
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined,
                                      trim_blocks=True, lstrip_blocks=True)
        self.env.globals["nav"] = ""
        self.env.filters.update(q=lambda s: quote(str(s), safe=""), pct=pct, usd=usd, num=count, short=lambda s: str(s)[:8],
                                ms=lambda x: "unknown" if x is None else f"{x:,.0f} ms",
                                when=lambda t: "unknown" if t is None else f"{t:%Y-%m-%d %H:%M:%S}",
                                clip=lambda s, n=140: "" if s is None else (s if len(s) <= n else s[:n - 1] + "…"))

    def render(self, name: str, code: int = 200, **context) -> Response:
        return Response(self.env.get_template(name).render(**context), code)


Handler = Callable[[Request], Response]


class App:
    """Routes `(method, pattern) -> handler`; `{name}` in a pattern binds one path segment."""

    def __init__(self, templates: Templates, api_key: str | None = None):
        self.templates, self.api_key = templates, api_key
        self.routes: list[tuple[str, re.Pattern, Handler]] = []
        self.token = hmac.new(api_key.encode(), b"protege-ui-session", hashlib.sha256).hexdigest() if api_key else None

    def route(self, method: str, pattern: str):
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

        def add(fn: Handler) -> Handler:
            self.routes.append((method, regex, fn))
            return fn
        return add

    def authorized(self, req: Request) -> bool:
        if self.token is None:
            return True
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip(), self.api_key or ""):
            return True
        cookie = SimpleCookie(req.headers.get("cookie", ""))
        return COOKIE in cookie and hmac.compare_digest(cookie[COOKIE].value, self.token)

    def login(self, req: Request) -> Response:
        wanted = req.query.get("next") or req.form.get("next") or "/"
        if not wanted.startswith("/") or wanted.startswith("//"):
            wanted = "/"
        if req.method == "POST":
            if hmac.compare_digest(req.form.get("token", ""), self.api_key or ""):
                return Response(b"", 303, headers={
                    "location": wanted,
                    "set-cookie": f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"})
            return self.templates.render("login.html", 401, next=wanted, error="that token is not this dashboard's")
        return self.templates.render("login.html", 401, next=wanted, error=None)

    def handle(self, req: Request) -> Response:
        if req.path.startswith("/static/"):
            return static(req.path[len("/static/"):])
        if self.token is not None and req.path == "/login":
            return self.login(req)
        if not self.authorized(req):
            if req.method == "GET":
                return redirect("/login" + query_string(next=req.path + (("?" + urlencode(req.query)) if req.query else "")))
            return Response("a token is needed: sign in at /login", 401, "text/plain; charset=utf-8")
        if req.method == "POST" and not same_origin(req):
            return Response("cross-site form posts are refused", 403, "text/plain; charset=utf-8")
        allowed = False
        for method, regex, fn in self.routes:
            m = regex.match(req.path)
            if m is None:
                continue
            allowed = True
            if method == req.method:
                req.params = m.groupdict()
                try:
                    return fn(req)
                except NotFoundError as exc:
                    return self.error(404, str(exc))
                except ProtegeError as exc:
                    return self.error(400, str(exc))
        if allowed:
            return self.error(405, f"{req.method} is not how {req.path} is used")
        return self.error(404, f"no page at {req.path}")

    def error(self, status: int, message: str) -> Response:
        return self.templates.render("error.html", status, status=status, message=message)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > MAX_FORM_BYTES:
                await respond(send, Response("form too large", 413, "text/plain; charset=utf-8"))
                return
            if not msg.get("more_body"):
                break
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1"),
                                                keep_blank_values=True).items()}
        form = {}
        if body and headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        req = Request(scope["method"], scope["path"], query, headers, form)
        try:
            resp = await asyncio.to_thread(self.handle, req)
        except Exception:  # a bug, not a user's mistake: say so, and keep serving
            log.exception("protege ui: %s %s failed", req.method, req.path)
            resp = Response("this page failed; the server's log has the traceback", 500, "text/plain; charset=utf-8")
        await respond(send, resp)


def same_origin(req: Request) -> bool:
    """A form post from one of our own pages (browsers send Origin on POST)."""
    origin = req.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None  # no Origin: a non-browser client (curl, tests)
    return origin.split("://", 1)[-1] == req.headers.get("host", "")


def static(name: str) -> Response:
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        return Response("not found", 404, "text/plain; charset=utf-8")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return Response(path.read_bytes(), 200, kind + ("; charset=utf-8" if kind.startswith("text/") else ""),
                    {"cache-control": "max-age=3600"})


async def respond(send, resp: Response) -> None:
    body = resp.body.encode() if isinstance(resp.body, str) else resp.body
    headers = {"content-type": resp.content_type, "content-length": str(len(body)),
               "content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "same-origin",
               "x-frame-options": "DENY", **resp.headers}
    await send({"type": "http.response.start", "status": resp.status,
                "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})
