"""Where protege keeps its state and how it reaches the store.

Resolution order for each setting: the CLI flag, then the environment variable, then the
default. Tests point `PROTEGE_HOME` at a temporary folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """Resolved settings for one invocation."""

    home: Path
    """Folder for all user state (SQLite store, frozen datasets, runs, spool). Flag `--home`,
    env `PROTEGE_HOME`, default `./.protege`."""

    database_url: str
    """SQLAlchemy URL of the trace store. Flag `--db`, env `PROTEGE_DATABASE_URL`, default a
    SQLite file `protege.db` inside `home`. `postgresql://...` URLs use psycopg 3."""

    prices_path: Path | None
    """CSV price table overriding the shipped one. Flag `--prices`, env `PROTEGE_PRICES`,
    else `home/prices.csv` if that file exists, else the copy shipped with protege."""

    @classmethod
    def resolve(
        cls,
        home: str | os.PathLike | None = None,
        db: str | None = None,
        prices: str | os.PathLike | None = None,
    ) -> "Settings":
        home_path = Path(home or os.environ.get("PROTEGE_HOME") or ".protege").expanduser()
        url = db or os.environ.get("PROTEGE_DATABASE_URL") or f"sqlite:///{(home_path / 'protege.db').resolve()}"
        price_file = prices or os.environ.get("PROTEGE_PRICES")
        if price_file is None and (home_path / "prices.csv").exists():
            price_file = home_path / "prices.csv"
        if price_file is not None and not Path(price_file).is_file():
            raise ConfigError(f"price table {price_file} does not exist (set by --prices or PROTEGE_PRICES)")
        return cls(home=home_path, database_url=normalize_db_url(url), prices_path=Path(price_file) if price_file else None)

    def ensure_home(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home


def normalize_db_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://) and pick the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if not (url.startswith("sqlite") or url.startswith("postgresql+")):
        raise ConfigError(
            f"database URL {redact_url(url)!r} is not supported: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        )
    return url


PUBLIC_QUERY_KEYS = frozenset({"api-version", "sslmode", "options", "application_name", "connect_timeout",
                               "target_session_attrs"})
"""Query parameters shown as they are; every other value in a URL's query is redacted."""


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that are credentials: its password and its non-public query values."""
    from urllib.parse import parse_qsl, quote, urlsplit

    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in PUBLIC_QUERY_KEYS and v]
    both = set(found) | {quote(v, safe="") for v in found} | {quote(v) for v in found}
    return sorted((s for s in both if len(s) >= 3), key=len, reverse=True)


def redact_text(text: str, secrets: list[str]) -> str:
    """`text` with every occurrence of each secret replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """The URL with its password and non-public query values replaced, for messages and logs."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    query = "&".join(f"{k}={v if k in PUBLIC_QUERY_KEYS or not v else '***'}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(netloc=netloc, query=query))
