"""The store: SQLAlchemy Core over SQLite (WAL, default) or PostgreSQL (by URL).

Migrations (Alembic, in `traces/migrations/`) are applied automatically the first time a
store is opened, so a user's store survives upgrades of protege.
"""

from __future__ import annotations

import statistics
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..config import normalize_db_url, redact_url
from ..errors import NotFoundError, ProtegeError, StoreError
from . import schema
from .record import TraceRecord

HEAD_REVISION = "0003"
ID_CHARS = frozenset("0123456789abcdef-")
"""What trace and run ids are made of (lowercase UUIDs, ids.uuid7)."""
_migrate_lock = threading.Lock()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA cache_size=-65536")  # 64 MiB (default 2): large imports keep their index pages
    cur.close()


class Store:
    """A handle on one trace store. Cheap to keep, safe to share between threads."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = normalize_db_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
        if self.is_sqlite:
            path = self.url.split("///", 1)[-1].split("?", 1)[0]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=5,
                          connect_args={"connect_timeout": 5})
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._insert_sql, self._insert_columns = self._compile_trace_insert()
        if migrate:
            self.migrate()

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

    # -- schema -----------------------------------------------------------------------

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (a no-op when it is there already)."""
        try:
            if self.current_revision() == HEAD_REVISION:
                return
            from alembic import command
            from alembic.config import Config

            with _migrate_lock, self.engine.begin() as conn:
                cfg = Config()
                cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except sa.exc.OperationalError as exc:
            raise StoreError(f"cannot open the trace store at {redact_url(self.url)}: {error_summary(exc)}") from None

    def close(self) -> None:
        self.engine.dispose()

    # -- writes -----------------------------------------------------------------------

    def _insert_ignoring_conflicts(self, table: sa.Table):
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table).on_conflict_do_nothing()

    def _compile_trace_insert(self) -> tuple[str, list[tuple[str, Any]]]:
        """The traces INSERT compiled once, with each bound column's SQLAlchemy type processor."""
        dialect = self.engine.dialect
        compiled = self._insert_ignoring_conflicts(schema.traces).compile(dialect=dialect)
        names = compiled.positiontup if compiled.positional else list(compiled.binds)
        return str(compiled), [(name, schema.traces.c[name].type.dialect_impl(dialect).bind_processor(dialect))
                               for name in names]

    def insert_traces(self, records: Iterable[TraceRecord | dict], conn: Connection | None = None) -> int:
        """Insert traces; a row whose id or content hash is already stored is skipped,
        which makes replays (spool, journal, re-import) idempotent. Returns the rows added.

        The rows go straight to the driver's executemany, bound by the same type processors
        `conn.execute(insert, rows)` applies: that call's per-row bookkeeping (and
        `TraceRecord.to_row`'s deep copy) were most of a bulk import's time."""
        positional, columns = self.engine.dialect.positional, self._insert_columns
        params = []
        for record in records:
            values = record if isinstance(record, dict) else record.__dict__
            row = [values.get(name) if process is None else process(values.get(name)) for name, process in columns]
            params.append(tuple(row) if positional else dict(zip((name for name, _ in columns), row)))
        if not params:
            return 0
        if conn is not None:
            return conn.exec_driver_sql(self._insert_sql, params).rowcount
        with self.engine.begin() as c:
            return c.exec_driver_sql(self._insert_sql, params).rowcount

    def existing_hashes(self, conn: Connection, hashes: list[str]) -> set[str]:
        found: set[str] = set()
        col = schema.traces.c.content_hash
        for i in range(0, len(hashes), 900):
            chunk = hashes[i:i + 900]
            found.update(conn.execute(sa.select(col).where(col.in_(chunk))).scalars())
        return found

    def set_feedback(self, trace_id: str, feedback: dict) -> dict:
        """Merge `feedback` (e.g. {"correction": LABEL}, a human's review) into a stored trace's
        feedback; returns the trace as updated. `trace_id` may be a unique prefix."""
        row = self.get_trace(trace_id)
        merged = {**(row.get("feedback") or {}), **feedback}
        with self.engine.begin() as conn:
            conn.execute(schema.traces.update().where(schema.traces.c.id == row["id"]).values(feedback=merged))
        return {**row, "feedback": merged}

    # -- reads ------------------------------------------------------------------------

    def _filtered(self, stmt, task=None, status=None, source=None, model=None, endpoint=None):
        t = schema.traces.c
        for column, value in ((t.task, task), (t.status, status), (t.source, source),
                              (t.model, model), (t.endpoint, endpoint)):
            if value is not None:
                stmt = stmt.where(column == value)
        return stmt

    def count(self, **filters) -> int:
        stmt = self._filtered(sa.select(sa.func.count()).select_from(schema.traces), **filters)
        with self.engine.connect() as conn:
            return conn.execute(stmt).scalar_one()

    def list_traces(self, limit: int = 20, offset: int = 0, newest_first: bool = True, **filters) -> list[dict]:
        t = schema.traces
        order = t.c.id.desc() if newest_first else t.c.id.asc()
        stmt = self._filtered(sa.select(t), **filters).order_by(order).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def iter_traces(self, batch: int = 1000, after: str = "", **filters) -> Iterator[dict]:
        """All matching traces, oldest first, read in pages so memory stays flat; `after`: only
        ids past it (ids are time-ordered uuid7, so a uuid7 made at a moment means "since then")."""
        t = schema.traces
        last = after
        while True:
            stmt = self._filtered(sa.select(t), **filters).where(t.c.id > last).order_by(t.c.id).limit(batch)
            with self.engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(stmt)]
            yield from rows
            if len(rows) < batch:
                return
            last = rows[-1]["id"]

    def get_trace(self, trace_id: str) -> dict:
        """One trace by id or by a unique prefix of at least 4 characters."""
        t = schema.traces
        prefix = id_prefix(trace_id, "trace", "protege traces list")
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == prefix)).first()
            if row is None and len(prefix) >= 4:
                rows = conn.execute(sa.select(t).where(t.c.id.startswith(prefix, autoescape=True)).limit(2)).all()
                if len(rows) > 1:
                    raise NotFoundError(f"trace id prefix {trace_id!r} is ambiguous; give more characters")
                row = rows[0] if rows else None
        if row is None:
            raise NotFoundError(f"no trace with id {trace_id!r}; `protege traces list` shows ids")
        return dict(row._mapping)

    def _listed(self, stmt, since: datetime | None = None, until: datetime | None = None, search: str | None = None,
                **filters):
        """`_filtered`, plus a time range and a case-insensitive search of the request's text."""
        t = schema.traces.c
        stmt = self._filtered(stmt, **filters)
        if since is not None:
            stmt = stmt.where(t.created_at >= since)
        if until is not None:
            stmt = stmt.where(t.created_at < until)
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            stmt = stmt.where(sa.cast(t.request, sa.Text).ilike(pattern, escape="\\"))
        return stmt

    def page_traces(self, *, limit: int = 50, cursor: str | None = None, scan: int | None = None,
                    **filters) -> tuple[list[dict], str | None]:
        """One page of traces, newest first, and the cursor of the next page (None on the last).

        Keyset pagination on (created_at, id), read off the index of the same columns (with the
        task in front when one is given), so page 1,000 costs what page 1 does. Filters: those of
        `count`, `since`/`until` (datetimes) and `search` (the request's text). The response
        payload is not read.

        `scan` (with a search): search only the next `scan` traces of the list (of the task and
        time range; other filters narrow them further); when they hold fewer than `limit`
        matches the page is short and its cursor is the last trace searched, so a search for a
        rare word costs a bounded read per page instead of the whole store."""
        t = schema.traces.c
        cols = [t.id, t.created_at, t.source, t.task, t.model, t.status, t.latency_ms, t.cost_usd, t.prompt_tokens,
                t.completion_tokens, t.output_text, t.request, t.feedback, t.metadata]
        after = None
        if cursor:
            at, last = parse_cursor(cursor)
            # the plain range on created_at is what lets the database start the index walk there
            after = sa.and_(t.created_at <= at, sa.or_(t.created_at < at, t.id < last))
        order = (t.created_at.desc(), t.id.desc())
        search = filters.pop("search", None)
        edge = None
        if search and scan:
            # the last trace of the window, read off the index alone (task and time are its columns)
            keys = {k: filters.get(k) for k in ("task", "since", "until")}
            inner = self._listed(sa.select(t.created_at, t.id), **keys)
            inner = inner.where(after) if after is not None else inner
            with self.engine.connect() as conn:
                edge = conn.execute(inner.order_by(*order).offset(scan - 1).limit(1)).first()
        stmt = self._listed(sa.select(*cols), search=search, **filters)
        if after is not None:
            stmt = stmt.where(after)
        if edge is not None:
            stmt = stmt.where(t.created_at >= edge.created_at, sa.or_(t.created_at > edge.created_at, t.id >= edge.id))
        stmt = stmt.order_by(*order).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        if edge is not None and len(rows) <= limit:  # the window held too few: the search goes on past it
            return rows, f"{edge.created_at.isoformat()}|{edge.id}"
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (f"{rows[-1]['created_at'].isoformat()}|{rows[-1]['id']}" if more else None)

    def count_upto(self, cap: int, **filters) -> int:
        """How many traces match (the filters of `page_traces`), counting no further than `cap`:
        on a large store an exact count is a scan."""
        inner = self._listed(sa.select(schema.traces.c.id), **filters).limit(cap).subquery()
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(inner)).scalar_one()

    def stats_by_task(self) -> dict[str | None, int]:
        """Traces per task tag (None: untagged), counted off the task index."""
        t = schema.traces.c
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(t.task, sa.func.count()).group_by(t.task)).all())

    def feedback_of(self, ids: list[str]) -> dict[str, dict | None]:
        """The stored feedback of each of these traces (ids not stored are left out)."""
        t = schema.traces.c
        out: dict[str, dict | None] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 900):
                out.update((r.id, r.feedback) for r in conn.execute(sa.select(t.id, t.feedback).where(
                    t.id.in_(ids[i:i + 900]))))
        return out

    def recent_values(self, column: str, newest: int = 10_000) -> list[str]:
        """The distinct values of a column among the newest traces (filter suggestions that stay
        cheap on a large store)."""
        t = schema.traces.c
        inner = sa.select(t[column].label("v")).order_by(t.created_at.desc(), t.id.desc()).limit(newest).subquery()
        with self.engine.connect() as conn:
            return sorted(v for v in conn.execute(sa.select(inner.c.v).distinct()).scalars() if v)

    def daily(self, since: datetime, task: str | None = None) -> list[dict]:
        """Per UTC day and model since `since`: traces, errors, token sums and recorded cost."""
        t = schema.traces.c
        if self.is_sqlite:
            day = sa.func.substr(t.created_at, 1, 10)
        else:
            day = sa.func.to_char(sa.func.timezone("UTC", t.created_at), "YYYY-MM-DD")
        stmt = self._filtered(sa.select(
            day.label("day"), t.model, sa.func.count().label("traces"),
            sa.func.sum(sa.case((t.status != "ok", 1), else_=0)).label("errors"),
            sa.func.sum(t.prompt_tokens).label("prompt_tokens"), sa.func.sum(t.completion_tokens).label("completion_tokens"),
            sa.func.sum(sa.case((t.prompt_tokens.is_(None), 1), (t.completion_tokens.is_(None), 1), else_=0)).label("no_usage"),
            sa.func.sum(t.cost_usd).label("cost_usd")), task=task).where(t.created_at >= since).group_by(day, t.model)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt.order_by(day))]

    def stats(self, task: str | None = None) -> dict:
        """Counts, tokens, cost and latency, overall and per task/model/source/status."""
        t = schema.traces.c
        base = self._filtered(sa.select(t.task, t.model, t.source, t.status, t.prompt_tokens, t.completion_tokens,
                                        t.cost_usd, t.latency_ms, t.ttft_ms, t.created_at), task=task)
        groups: dict[str, dict[str, int]] = {"task": {}, "model": {}, "source": {}, "status": {}}
        n = prompt = completion = 0
        cost = 0.0
        cost_known = tokens_known = 0
        latencies, ttfts = [], []
        first = last = None
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=5000).execute(base):
                n += 1
                for key in groups:
                    value = getattr(row, key) or "(none)"
                    groups[key][value] = groups[key].get(value, 0) + 1
                if row.prompt_tokens is not None and row.completion_tokens is not None:
                    tokens_known += 1
                    prompt += row.prompt_tokens
                    completion += row.completion_tokens
                if row.cost_usd is not None:
                    cost_known += 1
                    cost += row.cost_usd
                if row.latency_ms is not None:
                    latencies.append(row.latency_ms)
                if row.ttft_ms is not None:
                    ttfts.append(row.ttft_ms)
                first = row.created_at if first is None or row.created_at < first else first
                last = row.created_at if last is None or row.created_at > last else last
        return {
            "traces": n,
            "first": first.isoformat() if first else None,
            "last": last.isoformat() if last else None,
            "by": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in groups.items()},
            "tokens": {"with_usage": tokens_known, "prompt": prompt, "completion": completion},
            "cost_usd": {"with_cost": cost_known, "total": cost if cost_known else None},
            "latency_ms": _quantiles(latencies),
            "ttft_ms": _quantiles(ttfts),
        }


def id_prefix(text: str, what: str, lister: str) -> str:
    """`text` as an id prefix to match literally (lower-cased), or a NotFoundError saying
    why it cannot be one: LIKE would read `_` and `%` in it as wildcards."""
    prefix = text.strip().lower()
    if not prefix:
        raise NotFoundError(f"give a {what} id or a unique prefix of one; `{lister}` shows them")
    bad = sorted(set(prefix) - ID_CHARS)
    if bad:
        raise NotFoundError(f"{text!r} is not a {what} id or id prefix: ids hold only hex digits and '-' "
                            f"(found {', '.join(map(repr, bad))}); `{lister}` shows them")
    return prefix


def parse_cursor(cursor: str) -> tuple[datetime, str]:
    """A page cursor ("CREATED_AT|ID", as `page_traces` returns it) as its two parts."""
    at, _, last = cursor.partition("|")
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        when = None
    if when is None or not last or set(last) - ID_CHARS:
        raise ProtegeError(f"not a page cursor: {cursor!r} (it is CREATED_AT|ID, as the list's next link gives it)")
    return when, last


def is_connection_error(exc: BaseException) -> bool:
    """Is this the store being unreachable (spool and retry) rather than a row it refuses?"""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError,
                        sa.exc.TimeoutError, ConnectionError, TimeoutError)):
        return True
    return bool(getattr(exc, "connection_invalidated", False))


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"measured": 0, "p50": None, "p95": None, "p99": None}
    if len(values) == 1:
        return {"measured": 1, "p50": values[0], "p95": values[0], "p99": values[0]}
    qs = statistics.quantiles(values, n=100, method="inclusive")
    return {"measured": len(values), "p50": qs[49], "p95": qs[94], "p99": qs[98]}


def error_summary(exc: BaseException) -> str:
    """The first line of a database error's own message (the driver's, not SQLAlchemy's wrapper)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
