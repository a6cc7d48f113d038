"""Table definitions (SQLAlchemy Core). Changes to these go through a new Alembic migration."""

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)

traces = sa.Table(
    "traces",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("task", sa.String(200)),
    sa.Column("provider", sa.String(100)),
    sa.Column("model", sa.String(200)),
    sa.Column("endpoint", sa.String(50), nullable=False),
    sa.Column("request", JSONType, nullable=False),
    sa.Column("response", JSONType),
    sa.Column("output_text", sa.Text),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("cached_tokens", sa.Integer),
    sa.Column("latency_ms", sa.Float),
    sa.Column("ttft_ms", sa.Float),
    sa.Column("cost_usd", sa.Float),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("http_status", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("metadata", JSONType, nullable=False),
    sa.Column("feedback", JSONType),
    sa.Column("content_hash", sa.String(64), unique=True),
    sa.Index("ix_traces_task_created_id", "task", "created_at", "id"),
    sa.Index("ix_traces_created_id", "created_at", "id"),
)

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("filters", JSONType, nullable=False),
    sa.Column("split_sizes", JSONType, nullable=False),
    sa.Column("report", JSONType),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.UniqueConstraint("task", "version", name="uq_datasets_task_version"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("task", sa.String(200)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("config", JSONType, nullable=False),
    sa.Column("base_model", sa.Text),
    sa.Column("dataset_id", sa.String(64)),
    sa.Column("metrics", JSONType),
    sa.Column("checkpoint_path", sa.Text),
    sa.Column("outputs_path", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp),
    sa.Index("ix_runs_task_kind", "task", "kind"),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Float),
    sa.Column("fallback", sa.Text),
    sa.Column("options", JSONType, nullable=False),
    sa.Column("evidence", JSONType, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("previous_id", sa.String(36)),
    sa.Column("ended_at", Timestamp),
    sa.Column("ended_by", sa.String(200)),
    sa.Column("end_reason", sa.Text),
    sa.Column("alarm", JSONType),
    sa.Index("ix_deployments_task_created", "task", "created_at"),
    # at most one active deployment per task, whatever races: the store refuses a second
    sa.Index("uq_deployments_one_active", "task", unique=True, sqlite_where=sa.text("status = 'active'"),
             postgresql_where=sa.text("status = 'active'")),
)
