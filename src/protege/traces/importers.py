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
- `traces`: one `TraceRecord.to_json()` object a line, what the trace spool and the
  quarantine file (`HOME/spool/quarantine.jsonl`) hold. Each line keeps its `id` (and its
  `content_hash`, if it has one), so a trace already in the store is not added again.

Every import is one transaction: any malformed line, or one holding what a store cannot
(traces/clean.py: NUL characters, an over-long `task` or `model`, token counts past 32
bits, ...), fails the whole import with `file:line: what is wrong` and leaves the store
unchanged. Each record carries a content hash (its source bytes, its task, and which
occurrence of identical content it is), so importing the same file again adds nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import sqlalchemy as sa

from ..config import redact_url
from ..errors import InputError, ProtegeError, StoreError
from ..prices import PriceTable
from . import clean, normalize
from .record import SOURCES, STATUSES, TraceRecord, parse_time
from .store import Store, error_summary, is_connection_error

FORMATS = ("openai-jsonl", "openai-batch", "csv", "traces")
CHUNK = 2000
TRACE_FIELDS = tuple(f.name for f in dataclasses.fields(TraceRecord))
TRACE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""A trace id as protege makes them (ids.uuid7): a lowercase canonical UUID."""


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


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _load_object(path, line, raw: bytes) -> dict:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _fail(path, line, f"not valid JSON ({exc})")
    if not isinstance(obj, dict):
        _fail(path, line, f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _time(path, line, value, key: str):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        _fail(path, line, f"'{key}' must be an ISO-8601 time or unix seconds, found {type(value).__name__}")
    try:
        return parse_time(str(value))
    except (ValueError, OverflowError, OSError):  # OverflowError/OSError: past what a datetime holds
        _fail(path, line, f"'{key}' is not an ISO-8601 time or unix seconds in the years 1 to 9999: {_brief(value)}")


def _check_text(path, line, value, key: str) -> None:
    if value is not None and not isinstance(value, str):
        _fail(path, line, f"'{key}' must be a string, found {type(value).__name__} {_brief(value)}")


def _check_parts(path, line, content, where: str) -> None:
    """Content parts must be objects whose `text`, if any, is a string (an image part has none)."""
    if not isinstance(content, list):
        return
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            _fail(path, line, f"'{where}[{i}]' must be a content part object, found {type(part).__name__}")
        if not isinstance(part.get("text", ""), str):
            _fail(path, line, f"'{where}[{i}].text' must be a string, found {type(part['text']).__name__}")


def _reply_text(path, line, message: dict, where: str) -> str | None:
    content = message.get("content")
    if content is not None and not isinstance(content, (str, list)):
        _fail(path, line, f"'{where}' must be a string or a list of content parts, found "
                          f"{type(content).__name__} {_brief(content)}")
    _check_parts(path, line, content, where)
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content)
    return content


def _response_text(path, line, endpoint: str, response, where: str) -> str | None:
    choices = response.get("choices") if isinstance(response, dict) else None
    if endpoint == "chat/completions" and isinstance(choices, list) and choices and isinstance(choices[0], dict) \
            and isinstance(choices[0].get("message"), dict):
        _check_parts(path, line, choices[0]["message"].get("content"), f"{where}.choices[0].message.content")
    return normalize.output_text(endpoint, response)


def _check_messages(path, line, messages, where="messages") -> None:
    if not isinstance(messages, list) or not messages:
        _fail(path, line, f"'{where}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            _fail(path, line, f"'{where}[{i}]' must be an object, found {type(m).__name__}")
        if m.get("role") not in ("system", "developer", "user", "assistant", "tool", "function"):
            _fail(path, line, f"'{where}[{i}].role' must be system, developer, user, assistant or tool; "
                              f"found {_brief(m.get('role'))}")
        if "content" not in m and not m.get("tool_calls"):
            _fail(path, line, f"'{where}[{i}]' has no 'content'")


def _common(path, line, obj: dict, record: TraceRecord, prices: PriceTable | None) -> TraceRecord:
    if obj.get("created_at") is not None:
        record.created_at = _time(path, line, obj["created_at"], "created_at")
    if obj.get("latency_ms") is not None:
        value = obj["latency_ms"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            _fail(path, line, f"'latency_ms' must be a non-negative number, found {_brief(value)}")
        record.latency_ms = float(value)
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
    _check_text(path, line, record.task, "task")
    _check_text(path, line, record.model, "model")
    if record.prompt_tokens is not None and prices is not None:
        record.cost_usd = prices.cost(record.model, record.prompt_tokens, record.completion_tokens, record.cached_tokens)
    if record.model and prices is not None:
        record.provider = normalize.provider_for(record.model, prices)
    return record


def _parse_openai_line(path, line, raw: bytes, task, prices) -> TraceRecord | None:
    if not raw.strip():
        return None
    obj = _load_object(path, line, raw)
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
        _check_text(path, line, request.get("model"), "request.model")
        _check_text(path, line, response.get("model"), "response.model")
        text = _response_text(path, line, endpoint, response, "response")
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
        text = _reply_text(path, line, last, f"messages[{len(messages) - 1}].content")
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
    return _common(path, line, obj, record, prices)


def _iter_openai_jsonl(path: Path, opts: ImportOptions, prices, on_bytes) -> Iterator[tuple[int, bytes, TraceRecord]]:
    for line, raw in _read_lines(path, on_bytes):
        record = _parse_openai_line(path, line, raw, opts.task, prices)
        if record is not None:
            yield line, raw.strip(), record


def _batch_inputs(in_path: Path) -> dict[str, tuple[dict, str]]:
    inputs: dict[str, tuple[dict, str]] = {}
    for line, raw in _read_lines(in_path, None):
        if not raw.strip():
            continue
        obj = _load_object(in_path, line, raw)
        if not isinstance(obj.get("custom_id"), str) or not isinstance(obj.get("body"), dict):
            _fail(in_path, line, "expected a batch request {custom_id, method, url, body}")
        if obj["custom_id"] in inputs:
            _fail(in_path, line, f"custom_id {_brief(obj['custom_id'])} appears twice")
        url = obj.get("url", "/v1/chat/completions")
        endpoint = normalize.ENDPOINTS.get(url) if isinstance(url, str) else None
        if endpoint not in ("chat/completions", "completions", "embeddings"):
            _fail(in_path, line, f"url {_brief(url)} is not a chat, completions or embeddings endpoint")
        _check_text(in_path, line, obj["body"].get("model"), "body.model")
        inputs[obj["custom_id"]] = (obj["body"], endpoint)
    return inputs


def _iter_batch(path: Path, opts: ImportOptions, prices, on_bytes) -> Iterator[tuple[int, bytes, TraceRecord]]:
    if not opts.batch_input:
        raise ProtegeError(
            f"{path}: --format openai-batch needs --batch-input FILE, the batch's input JSONL (its requests), "
            "because a Batch API output file holds only the responses")
    in_path = Path(opts.batch_input)
    inputs = _batch_inputs(in_path)
    for line, raw in _read_lines(path, on_bytes):
        if not raw.strip():
            continue
        obj = _load_object(path, line, raw)
        if "custom_id" not in obj:
            _fail(path, line, "expected a batch output line {id, custom_id, response, error}")
        custom_id = obj["custom_id"]
        if not isinstance(custom_id, str):
            _fail(path, line, f"'custom_id' must be a string, found {type(custom_id).__name__} {_brief(custom_id)}")
        if custom_id not in inputs:
            _fail(path, line, f"custom_id {_brief(custom_id)} is not in the batch input file {in_path}")
        request, endpoint = inputs[custom_id]
        resp = obj.get("response") or {}
        body = resp.get("body") if isinstance(resp, dict) else None
        status_code = resp.get("status_code") if isinstance(resp, dict) else None
        if isinstance(body, dict):
            _check_text(path, line, body.get("model"), "response.body.model")
        if obj.get("error") or status_code != 200:
            err = obj.get("error") or (body.get("error") if isinstance(body, dict) else None) or f"status {status_code}"
            record = TraceRecord(request=request, response=body, source="import", task=opts.task, endpoint=endpoint,
                                 model=request.get("model"), status="error", http_status=status_code,
                                 error=orjson.dumps(err).decode())
        else:
            if not isinstance(body, dict):
                _fail(path, line, "'response.body' must be the API's response object")
            prompt, completion, cached = normalize.usage(body)
            record = TraceRecord(request=request, response=body,
                                 output_text=_response_text(path, line, endpoint, body, "response.body"),
                                 source="import", task=opts.task, endpoint=endpoint,
                                 model=body.get("model") or request.get("model"), http_status=200,
                                 prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
            created = body.get("created")
            if isinstance(created, (int, float)) and not isinstance(created, bool):
                record.created_at = _time(path, line, created, "response.body.created")
        record.metadata = {"batch_custom_id": custom_id}
        yield line, raw.strip(), _common(path, line, {}, record, prices)


def _iter_csv(path: Path, opts: ImportOptions, prices, on_bytes) -> Iterator[tuple[int, bytes, TraceRecord]]:
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
                yield line, orjson.dumps(row), _common(path, line, {}, record, prices)
        except UnicodeDecodeError as exc:
            _fail(path, reader.line_num + 1, f"not UTF-8 text ({exc.reason})")
        except csv.Error as exc:
            _fail(path, reader.line_num, f"malformed CSV ({exc})")


def _trace_line(path, line, obj: dict, task: str | None) -> TraceRecord:
    """A `TraceRecord.to_json()` object back as a record, with its id; every field checked
    here or by `clean.problems`."""
    unknown = sorted(set(obj) - set(TRACE_FIELDS))
    if unknown:
        _fail(path, line, f"unknown field(s) {', '.join(map(repr, unknown))}; a trace line holds the fields "
                          f"of TraceRecord.to_json(): {', '.join(TRACE_FIELDS)}")
    if not isinstance(obj.get("request"), dict):
        _fail(path, line, "'request' must be an object (the request body sent to the API)")
    data = dict(obj)
    if "id" in data and not (isinstance(data["id"], str) and TRACE_ID.fullmatch(data["id"])):
        _fail(path, line, f"'id' must be a trace id (a lowercase UUID such as 01a2080c-9b1e-7c3d-8e4f-a1b2c3d4e5f6), "
                          f"found {_brief(data['id'])}")
    if "created_at" in data:
        data["created_at"] = _time(path, line, data["created_at"], "created_at")
    for key, allowed in (("source", SOURCES), ("status", STATUSES)):
        if key in data and data[key] not in allowed:
            _fail(path, line, f"'{key}' must be one of {', '.join(allowed)}; found {_brief(data[key])}")
    for key, kind, name in (("endpoint", str, "a string"), ("stream", bool, "true or false"),
                            ("metadata", dict, "an object")):
        if key in data and not isinstance(data[key], kind):
            _fail(path, line, f"'{key}' must be {name}, found {_brief(data[key])}")
    if data.get("feedback") is not None and not isinstance(data["feedback"], dict):
        _fail(path, line, "'feedback' must be an object or null")
    record = TraceRecord(**data)
    if task is not None:
        record.task = task
    return record


def _iter_traces(path: Path, opts: ImportOptions, prices, on_bytes) -> Iterator[tuple[int, bytes, TraceRecord]]:
    for line, raw in _read_lines(path, on_bytes):
        if raw.strip():
            yield line, raw.strip(), _trace_line(path, line, _load_object(path, line, raw), opts.task)


_READERS = {"openai-jsonl": _iter_openai_jsonl, "openai-batch": _iter_batch, "csv": _iter_csv,
            "traces": _iter_traces}


def _refused(store: Store, path: Path, exc: Exception, first: int | None = None, last: int | None = None):
    """The backstop for what `clean.problems` misses: a store error as one line naming the chunk."""
    reason = error_summary(exc)
    if is_connection_error(exc) or first is None:
        return StoreError(f"{path}: cannot write to the trace store at {redact_url(store.url)} ({reason}); "
                          "nothing was stored: import the file again once the store answers")
    lines = f"{first}" if first == last else f"{first}-{last}"
    where = "this line" if first == last else "these lines"
    return ProtegeError(f"{path}:{lines}: the store refused a trace on {where} ({reason}); nothing was stored")


def import_file(store: Store, path: str | Path, opts: ImportOptions, prices: PriceTable | None = None,
                on_bytes: Callable[[int], None] | None = None) -> ImportResult:
    """Import one file in a single transaction; see the module docstring for formats."""
    if opts.format not in _READERS:
        raise ProtegeError(f"unknown import format {opts.format!r}; choose one of: {', '.join(FORMATS)}")
    for flag, value, column in (("--task", opts.task, "task"), ("--model", opts.model, "model")):
        if value is not None and len(value) > clean.TEXT_LIMITS[column]:
            raise ProtegeError(f"{flag} is {len(value):,} characters; the store holds at most "
                               f"{clean.TEXT_LIMITS[column]}")
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), None, "no such file")
    salt = "|".join([opts.format, opts.task or "", opts.input_col if opts.format == "csv" else "",
                     opts.output_col if opts.format == "csv" else "", opts.model or "",
                     hashlib.sha256(Path(opts.system_prompt_file).read_bytes()).hexdigest()
                     if opts.system_prompt_file and Path(opts.system_prompt_file).is_file() else ""])
    hasher = _Hasher(salt)
    read = added = 0
    pending: list[tuple[int, TraceRecord]] = []

    def flush(conn) -> int:
        first, last = pending[0][0], pending[-1][0]
        records = [r for _, r in pending]
        pending.clear()
        try:
            present = store.existing_hashes(conn, [r.content_hash for r in records])
            # the count the store gives, not len(): a `traces` line whose id is stored already is skipped
            return store.insert_traces([r for r in records if r.content_hash not in present], conn=conn)
        except (sa.exc.SQLAlchemyError, TypeError, ValueError, OverflowError) as exc:
            # TypeError/OverflowError: the JSON encoder or the driver refusing a value before the database sees it
            raise _refused(store, path, exc, first, last) from None

    try:
        with store.engine.begin() as conn:  # one transaction: an error anywhere rolls all of it back
            for line, content, record in _READERS[opts.format](path, opts, prices, on_bytes):
                found = clean.problems(record)
                if found:
                    _fail(path, line, "; ".join(found))
                if record.content_hash is None:
                    record.content_hash = hasher(content)
                read += 1
                pending.append((line, record))
                if len(pending) >= CHUNK:
                    added += flush(conn)
            if pending:
                added += flush(conn)
    except sa.exc.SQLAlchemyError as exc:  # connecting or committing; a refused row is reported by flush
        raise _refused(store, path, exc) from None
    return ImportResult(path=str(path), read=read, added=added, already_present=read - added)


def read_records(path: str | Path, opts: ImportOptions | None = None) -> Iterator[TraceRecord]:
    """Parse a file into TraceRecords without storing them (e.g. a labelled test file)."""
    opts = opts or ImportOptions()
    if opts.format not in _READERS:
        raise ProtegeError(f"unknown format {opts.format!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), None, "no such file")
    for _line, _content, record in _READERS[opts.format](path, opts, None, None):
        yield record
