"""Trace list indexes: (created_at, id) and (task, created_at, id), so a page of the newest
traces (all, or one task's, in a time range) is read straight off an index, in order, by a
keyset cursor (`Store.page_traces`), however large the store.

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.drop_index("ix_traces_created", table_name="traces")
    op.drop_index("ix_traces_task_created", table_name="traces")
    op.create_index("ix_traces_created_id", "traces", ["created_at", "id"])
    op.create_index("ix_traces_task_created_id", "traces", ["task", "created_at", "id"])


def downgrade():
    op.drop_index("ix_traces_task_created_id", table_name="traces")
    op.drop_index("ix_traces_created_id", table_name="traces")
    op.create_index("ix_traces_created", "traces", ["created_at"])
    op.create_index("ix_traces_task_created", "traces", ["task", "created_at"])
