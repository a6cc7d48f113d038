"""Deployments: which trained run serves each task, on what evidence, and its history.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade():
    op.create_table(
        "deployments",
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
    )
    op.create_index("ix_deployments_task_created", "deployments", ["task", "created_at"])
    op.create_index("uq_deployments_one_active", "deployments", ["task"], unique=True,
                    sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"))


def downgrade():
    op.drop_table("deployments")
