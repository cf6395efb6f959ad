"""task definitions stored with batches; a batch lists names, several of which may share a job

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('task_defs',
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('definition', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('hash')
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('task_hash', sa.String(length=64), nullable=True))
        batch_op.create_foreign_key('fk_batches_task_hash', 'task_defs', ['task_hash'], ['hash'])
    _set_batch_items_key(['batch_id', 'name'])
    op.create_index('ix_batch_items_job_id', 'batch_items', ['job_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_batch_items_job_id', 'batch_items')
    _set_batch_items_key(['batch_id', 'job_id'])
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_constraint('fk_batches_task_hash', type_='foreignkey')
        batch_op.drop_column('task_hash')
    op.drop_table('task_defs')


def _set_batch_items_key(columns: list[str]) -> None:
    """PostgreSQL alters the key in place; SQLite cannot, so the table is copied into a new one."""
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_constraint('batch_items_pkey', 'batch_items', type_='primary')
        op.create_primary_key('batch_items_pkey', 'batch_items', columns)
        return
    op.create_table('batch_items_new',
    sa.Column('batch_id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint(*columns, name='batch_items_pkey')
    )
    op.execute('INSERT OR IGNORE INTO batch_items_new (batch_id, job_id, name) '
               'SELECT batch_id, job_id, name FROM batch_items')
    op.drop_table('batch_items')
    op.rename_table('batch_items_new', 'batch_items')
