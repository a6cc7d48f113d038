"""Importers: bring traces a team already has into the store.

Formats:
- `openai-jsonl`: one JSON object a line, either a chat transcript
  `{"messages": [..., {"role": "assistant", "content": "..."}]}` (OpenAI fine-tuning
  format; the last assistant message is the output) or a logged call
  `{"request": {...}, "response": {...}}`. Optional keys on either: `model`, `task`,
  `metadata`, `created_at` (ISO-8601 or unix seconds), `latency_ms`, `usage`, `feedback`,
  `reference` (the correct output, stored as `feedback.correction`).
- `openai-batch`: an OpenAI Batch API output file joined by `custom_id` with the batch
  input file (`--batch-input`), which holds the requests.
- `csv`: one call a row: `--input-col` becomes the user message, `--output-col` the reply,
  `--system-prompt-file` an optional system message; other columns go to metadata.

Every import is one transaction: any malformed line fails the whole import with
`file:line: what is wrong` and leaves the store unchanged. Each record carries a content
hash (its source bytes, its task, and which occurrence of identical content it is), so
importing the same file again adds nothing.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import orjson

from ..capture import normalize
from ..errors import InputError, ProtegeError
from ..prices import PriceTable
from .record import TraceRecord, parse_time
from .store import Store

FORMATS = ("openai-jsonl", "openai-batch", "csv")
CHUNK = 2000


@dataclass
class ImportResult:
    path: str
    read: int
    added: int
    already_present: int


@dataclass
class ImportOptions:
    format: str = "openai-jsonl"
    task: str | None = None
    input_col: str = "input"
    output_col: str = "output"
    system_prompt_file: str | None = None
    model: str | None = None
    batch_input: str | None = None


def _open_binary(path: Path):
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as exc:
        raise InputError(str(path), None, f"cannot open: {exc.strerror or exc}") from None


def _read_lines(path: Path, on_bytes: Callable[[int], None] | None) -> Iterator[tuple[int, bytes]]:
    with _open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, start=1):
                if on_bytes:
                    on_bytes(len(raw))
                yield lineno, raw
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(str(path), None, f"cannot read: {exc}") from None


class _Hasher:
    """Content hash = sha256(source bytes, task, options) + which occurrence this is."""

    def __init__(self, salt: str):
        self.salt = salt.encode()
        self.seen: dict[bytes, int] = {}

    def __call__(self, content: bytes) -> str:
        digest = hashlib.sha256(self.salt + b"\0" + content).digest()
        n = self.seen.get(digest, 0)
        self.seen[digest] = n + 1
        if n == 0:
            return digest.hex()
        return hashlib.sha256(digest + n.to_bytes(4, "big")).hexdigest()


def _fail(path, line, message):
    raise InputError(str(path), line, message)


def _check_messages(path, line, messages, where="messages") -> None:
    if not isinstance(messages, list) or not messages:
        _fail(path, line, f"'{where}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            _fail(path, line, f"'{where}[{i}]' must be an object, found {type(m).__name__}")
        if m.get("role") not in ("system", "developer", "user", "assistant", "tool", "function"):
            _fail(path, line, f"'{where}[{i}].role' must be system, developer, user, assistant or tool; found {m.get('role')!r}")
        if "content" not in m and not m.get("tool_calls"):
            _fail(path, line, f"'{where}[{i}]' has no 'content'")


def _common(path, line, obj: dict, record: TraceRecord, prices: PriceTable | None) -> TraceRecord:
    if "created_at" in obj and obj["created_at"] is not None:
        try:
            record.created_at = parse_time(str(obj["created_at"]))
        except ValueError:
            _fail(path, line, f"'created_at' is not an ISO-8601 time or unix seconds: {obj['created_at']!r}")
    if obj.get("latency_ms") is not None:
        if not isinstance(obj["latency_ms"], (int, float)) or obj["latency_ms"] < 0:
            _fail(path, line, f"'latency_ms' must be a non-negative number, found {obj['latency_ms']!r}")
        record.latency_ms = float(obj["latency_ms"])
    if obj.get("metadata") is not None:
        if not isinstance(obj["metadata"], dict):
            _fail(path, line, "'metadata' must be an object")
        record.metadata = obj["metadata"]
    if obj.get("feedback") is not None:
        if not isinstance(obj["feedback"], dict):
            _fail(path, line, "'feedback' must be an object")
        record.feedback = obj["feedback"]
    if obj.get("reference") is not None:  # a gold output: stored as a human correction
        if not isinstance(obj["reference"], str):
            _fail(path, line, "'reference' must be a string (the correct output)")
        record.feedback = {**(record.feedback or {}), "correction": obj["reference"]}
    if record.prompt_tokens is not None and prices is not None:
        record.cost_usd = prices.cost(record.model, record.prompt_tokens, record.completion_tokens, record.cached_tokens)
    if record.model and prices is not None:
        record.provider = normalize.provider_for(record.model, prices)
    return record


def _parse_openai_line(path, line, raw: bytes, task, prices) -> TraceRecord | None:
    if not raw.strip():
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _fail(path, line, f"not valid JSON ({exc})")
    if not isinstance(obj, dict):
        _fail(path, line, f"expected a JSON object, found {type(obj).__name__}")
    line_task = obj.get("task", task) if task is None else task
    if "request" in obj:
        request, response = obj["request"], obj.get("response")
        if not isinstance(request, dict):
            _fail(path, line, "'request' must be an object (the request body sent to the API)")
        endpoint = "completions" if "prompt" in request and "messages" not in request else "chat/completions"
        if endpoint == "chat/completions":
            _check_messages(path, line, request.get("messages"), "request.messages")
        if not isinstance(response, dict):
            _fail(path, line, "'response' must be an object (the response body the API returned)")
        text = normalize.output_text(endpoint, response)
        if text is None and "error" not in response:
            _fail(path, line, "'response' has no choices[0].message.content (or .text)")
        prompt, completion, cached = normalize.usage(response)
        status = "error" if "error" in response else "ok"
        record = TraceRecord(request=request, response=response, output_text=text, source="import", task=line_task,
                             model=response.get("model") or request.get("model"), endpoint=endpoint,
                             prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, status=status,
                             error=orjson.dumps(response["error"]).decode() if status == "error" else None)
    elif "messages" in obj:
        messages = obj["messages"]
        _check_messages(path, line, messages)
        last = messages[-1]
        if last.get("role") != "assistant" or len(messages) < 2:
            _fail(path, line, "the last message must be the assistant's reply (the output), after at least one input message")
        request = {k: v for k, v in obj.items() if k not in ("messages", "task", "metadata", "created_at", "latency_ms",
                                                              "usage", "feedback", "reference")}
        request["messages"] = messages[:-1]
        text = last.get("content")
        if isinstance(text, list):
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        response = {"object": "chat.completion", "model": obj.get("model"),
                    "choices": [{"index": 0, "message": last, "finish_reason": "stop"}]}
        if isinstance(obj.get("usage"), dict):
            response["usage"] = obj["usage"]
        prompt, completion, cached = normalize.usage(response)
        record = TraceRecord(request=request, response=response, output_text=text, source="import", task=line_task,
                             model=obj.get("model"), prompt_tokens=prompt, completion_tokens=completion,
                             cached_tokens=cached)
    else:
        _fail(path, line, "expected a 'messages' list (chat/fine-tuning format) or a 'request'/'response' pair")
    if record.task is not None and not isinstance(record.task, str):
        _fail(path, line, "'task' must be a string")
    return _common(path, line, obj, record, prices)


def _iter_openai_jsonl(path: Path, opts: ImportOptions, prices, on_bytes) -> Iterator[tuple[bytes, TraceRecord]]:
    for line, raw in _read_lines(path, on_bytes):
        record = _parse_openai_line(path, line, raw, opts.task, prices)
        if record is not None:
            yield raw.strip(), record


def _iter_batch(path: Path, opts: ImportOptions, prices, on_bytes) -> Iterator[tuple[bytes, TraceRecord]]:
    if not opts.batch_input:
        raise ProtegeError(
            f"{path}: --format openai-batch needs --batch-input FILE, the batch's input JSONL (its requests), "
            "because a Batch API output file holds only the responses")
    inputs: dict[str, tuple[dict, str]] = {}
    in_path = Path(opts.batch_input)
    for line, raw in _read_lines(in_path, None):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            _fail(in_path, line, f"not valid JSON ({exc})")
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str) or not isinstance(obj.get("body"), dict):
            _fail(in_path, line, "expected a batch request {custom_id, method, url, body}")
        if obj["custom_id"] in inputs:
            _fail(in_path, line, f"custom_id {obj['custom_id']!r} appears twice")
        endpoint = normalize.ENDPOINTS.get(obj.get("url", "/v1/chat/completions"))
        if endpoint not in ("chat/completions", "completions", "embeddings"):
            _fail(in_path, line, f"url {obj.get('url')!r} is not a chat, completions or embeddings endpoint")
        inputs[obj["custom_id"]] = (obj["body"], endpoint)
    for line, raw in _read_lines(path, on_bytes):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            _fail(path, line, f"not valid JSON ({exc})")
        if not isinstance(obj, dict) or "custom_id" not in obj:
            _fail(path, line, "expected a batch output line {id, custom_id, response, error}")
        custom_id = obj["custom_id"]
        if custom_id not in inputs:
            _fail(path, line, f"custom_id {custom_id!r} is not in the batch input file {in_path}")
        request, endpoint = inputs[custom_id]
        resp = obj.get("response") or {}
        body = resp.get("body") if isinstance(resp, dict) else None
        status_code = resp.get("status_code") if isinstance(resp, dict) else None
        if obj.get("error") or status_code != 200:
            err = obj.get("error") or (body or {}).get("error") or f"status {status_code}"
            record = TraceRecord(request=request, response=body, source="import", task=opts.task, endpoint=endpoint,
                                 model=request.get("model"), status="error", http_status=status_code,
                                 error=orjson.dumps(err).decode())
        else:
            if not isinstance(body, dict):
                _fail(path, line, "'response.body' must be the API's response object")
            prompt, completion, cached = normalize.usage(body)
            record = TraceRecord(request=request, response=body, output_text=normalize.output_text(endpoint, body),
                                 source="import", task=opts.task, endpoint=endpoint,
                                 model=body.get("model") or request.get("model"), http_status=200,
                                 prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
            if isinstance(body.get("created"), (int, float)):
                record.created_at = parse_time(str(body["created"]))
        record.metadata = {"batch_custom_id": custom_id}
        yield raw.strip(), _common(path, line, {}, record, prices)


def _iter_csv(path: Path, opts: ImportOptions, prices, on_bytes) -> Iterator[tuple[bytes, TraceRecord]]:
    system = None
    if opts.system_prompt_file:
        try:
            system = Path(opts.system_prompt_file).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(opts.system_prompt_file, None, f"cannot read system prompt: {exc}") from None
    with _open_binary(path) as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            _fail(path, 1, "empty file; expected a header row")
        except UnicodeDecodeError as exc:
            _fail(path, 1, f"not UTF-8 text ({exc.reason})")
        for col, flag in ((opts.input_col, "--input-col"), (opts.output_col, "--output-col")):
            if col not in header:
                _fail(path, 1, f"no column {col!r} (named by {flag}); the header has: {', '.join(header)}")
        i_in, i_out = header.index(opts.input_col), header.index(opts.output_col)
        others = [(i, h) for i, h in enumerate(header) if i not in (i_in, i_out)]
        try:
            for row in reader:
                line = reader.line_num
                if on_bytes:
                    on_bytes(sum(len(c) for c in row) + len(row))
                if not row:
                    continue
                if len(row) != len(header):
                    _fail(path, line, f"expected {len(header)} fields as in the header, found {len(row)}")
                user, reply = row[i_in], row[i_out]
                if not user.strip():
                    _fail(path, line, f"column {opts.input_col!r} is empty")
                messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
                request = {"messages": messages}
                if opts.model:
                    request["model"] = opts.model
                response = {"object": "chat.completion", "model": opts.model,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                         "finish_reason": "stop"}]}
                record = TraceRecord(request=request, response=response, output_text=reply, source="import",
                                     task=opts.task, model=opts.model,
                                     metadata={h: row[i] for i, h in others})
                yield orjson.dumps(row), _common(path, line, {}, record, prices)
        except UnicodeDecodeError as exc:
            _fail(path, reader.line_num + 1, f"not UTF-8 text ({exc.reason})")
        except csv.Error as exc:
            _fail(path, reader.line_num, f"malformed CSV ({exc})")


_READERS = {"openai-jsonl": _iter_openai_jsonl, "openai-batch": _iter_batch, "csv": _iter_csv}


def import_file(store: Store, path: str | Path, opts: ImportOptions, prices: PriceTable | None = None,
                on_bytes: Callable[[int], None] | None = None) -> ImportResult:
    """Import one file in a single transaction; see the module docstring for formats."""
    if opts.format not in _READERS:
        raise ProtegeError(f"unknown import format {opts.format!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), None, "no such file")
    salt = "|".join([opts.format, opts.task or "", opts.input_col if opts.format == "csv" else "",
                     opts.output_col if opts.format == "csv" else "", opts.model or "",
                     hashlib.sha256(Path(opts.system_prompt_file).read_bytes()).hexdigest()
                     if opts.system_prompt_file and Path(opts.system_prompt_file).is_file() else ""])
    hasher = _Hasher(salt)
    read = added = 0
    pending: list[TraceRecord] = []

    def flush(conn) -> int:
        present = store.existing_hashes(conn, [r.content_hash for r in pending])
        fresh = [r for r in pending if r.content_hash not in present]
        store.insert_traces(fresh, conn=conn)
        pending.clear()
        return len(fresh)

    with store.engine.begin() as conn:  # one transaction: an error anywhere rolls all of it back
        for content, record in _READERS[opts.format](path, opts, prices, on_bytes):
            record.content_hash = hasher(content)
            pending.append(record)
            read += 1
            if len(pending) >= CHUNK:
                added += flush(conn)
        if pending:
            added += flush(conn)
    return ImportResult(path=str(path), read=read, added=added, already_present=read - added)


def read_records(path: str | Path, opts: ImportOptions | None = None) -> Iterator[TraceRecord]:
    """Parse a file into TraceRecords without storing them (e.g. a labelled test file)."""
    opts = opts or ImportOptions()
    if opts.format not in _READERS:
        raise ProtegeError(f"unknown format {opts.format!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), None, "no such file")
    for _content, record in _READERS[opts.format](path, opts, None, None):
        yield record
