"""Initial store: traces, datasets, runs.

Shipped migrations are never edited; schema changes get a new file (append-only).

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade():
    op.create_table(
        "traces",
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
    )
    op.create_index("ix_traces_task_created", "traces", ["task", "created_at"])
    op.create_index("ix_traces_created", "traces", ["created_at"])
    op.create_table(
        "datasets",
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
    op.create_table(
        "runs",
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
    )
    op.create_index("ix_runs_task_kind", "runs", ["task", "kind"])


def downgrade():
    op.drop_table("runs")
    op.drop_table("datasets")
    op.drop_index("ix_traces_created", "traces")
    op.drop_index("ix_traces_task_created", "traces")
    op.drop_table("traces")
