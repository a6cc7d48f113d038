"""Shared fixtures: a temporary protege home, real stores (SQLite and PostgreSQL), a real
scripted upstream and a real proxy server on 127.0.0.1."""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
from helpers import ServerThread

from protege.testing import ScriptedUpstream

PG_URL = os.environ.get("PROTEGE_TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Converted base models (SmolLM2 from its GGUF) are made once per test session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch, model_cache):
    """Every test gets its own PROTEGE_HOME and no inherited store or price settings."""
    h = tmp_path / "home"
    monkeypatch.setenv("PROTEGE_HOME", str(h))
    monkeypatch.delenv("PROTEGE_DATABASE_URL", raising=False)
    monkeypatch.delenv("PROTEGE_PRICES", raising=False)
    monkeypatch.setenv("PROTEGE_MODEL_CACHE", str(model_cache))
    return h


class PgSchema:
    """A fresh PostgreSQL schema reachable through a URL whose search_path points at it."""

    def __init__(self, base_url: str, host_port: str | None = None):
        from protege.config import normalize_db_url

        self.name = "t_" + uuid.uuid4().hex[:12]
        self.admin = sa.create_engine(normalize_db_url(base_url))
        with self.admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{self.name}"')
        self.base_url = base_url
        self.url = self.with_host(host_port)

    def with_host(self, host_port: str | None) -> str:
        url = self.base_url
        if host_port:
            scheme, rest = url.split("://", 1)
            creds, after = rest.split("@", 1) if "@" in rest else ("", rest)
            path = after.split("/", 1)[1]
            url = f"{scheme}://{creds + '@' if creds else ''}{host_port}/{path}"
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        with self.admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{self.name}" CASCADE')
        self.admin.dispose()


@pytest.fixture
def pg_schema():
    if not PG_URL:
        pytest.skip("PROTEGE_TEST_DATABASE_URL is not set")
    schema = PgSchema(PG_URL)
    yield schema
    schema.drop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """The store URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if not PG_URL:
        pytest.skip("PROTEGE_TEST_DATABASE_URL is not set")
    schema = PgSchema(PG_URL)
    yield schema.url
    schema.drop()


@pytest.fixture
def sqlite_store(tmp_path):
    """A SQLite store of the test's own, for tests that need one store, not both kinds."""
    from protege.traces.store import Store

    s = Store(f"sqlite:///{tmp_path / 'protege.db'}")
    yield s
    s.close()


@pytest.fixture
def store(db_url):
    from protege.traces.store import Store

    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def upstream():
    up = ScriptedUpstream().start()
    yield up
    up.stop()


@pytest.fixture
def make_proxy(tmp_path):
    """Start a real proxy in front of an upstream; yields (server, app)."""
    from protege.capture.proxy import ProxyApp
    from protege.capture.writer import TraceWriter
    from protege.prices import load_prices
    from protege.traces.store import Store

    started = []

    def make(upstream_url: str, db_url: str, timeout_s: float = 600.0, **writer_kw):
        def open_store():
            return Store(db_url)

        try:
            st = open_store()
        except Exception:
            st = None
        writer = TraceWriter(st, tmp_path / f"spool{len(started)}", store_factory=open_store, **writer_kw)
        app = ProxyApp(upstream_url, writer, prices=load_prices(), timeout_s=timeout_s)
        server = ServerThread(app).__enter__()
        started.append((server, writer))
        return server, app

    yield make
    for server, writer in started:
        server.__exit__()
        writer.close()
        if writer.store is not None:
            writer.store.close()


@pytest.fixture
def tiny_bert(tmp_path):
    """A 1-layer, 32-wide BERT with MiniLM's tokenizer: the real architecture, random weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from protege.bases import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    path = tmp_path / "tiny-bert"
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_llama(tmp_path):
    """A 1-layer, 32-wide Llama (SmolLM2's architecture) with SmolLM2's tokenizer, random weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from protege.bases import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m", tmp_path))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
