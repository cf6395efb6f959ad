"""page images and OCR, chunk jobs of long documents, submit-time rejects

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('pages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=16), nullable=False, server_default='text'))
        batch_op.add_column(sa.Column('image_sha256', sa.String(length=64), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('chunk_level', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('chunk_index', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('num_chunks', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('chunks_done', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('input_parts', JSON, nullable=True))
        batch_op.create_foreign_key('fk_jobs_parent_id', 'jobs', ['parent_id'], ['id'], ondelete='CASCADE')
        batch_op.create_index('ix_jobs_parent_id', ['parent_id'], unique=False)
    op.create_table('batch_rejects',
    sa.Column('batch_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=False),
    sa.Column('error_message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('batch_id', 'name')
    )


def downgrade() -> None:
    op.drop_table('batch_rejects')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_parent_id')
        batch_op.drop_constraint('fk_jobs_parent_id', type_='foreignkey')
        for column in ('input_parts', 'chunks_done', 'num_chunks', 'chunk_index', 'chunk_level', 'parent_id'):
            batch_op.drop_column(column)
    with op.batch_alter_table('pages', schema=None) as batch_op:
        batch_op.drop_column('image_sha256')
        batch_op.drop_column('source')
