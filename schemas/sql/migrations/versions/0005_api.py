"""the HTTP API: keys, files (with their chunks) and OpenAI's batch objects

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', TIME, nullable=False),
    sa.Column('revoked_at', TIME, nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('api_files',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('key_id', sa.String(length=16), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('filename', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('document_sha256', sa.String(length=64), nullable=True),
    sa.Column('created_at', TIME, nullable=False),
    sa.Column('expires_at', TIME, nullable=True),
    sa.Column('expired_at', TIME, nullable=True),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id']),
    sa.ForeignKeyConstraint(['document_sha256'], ['documents.sha256']),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_api_files_key_created', 'api_files', ['key_id', 'created_at'])
    op.create_index('ix_api_files_expires_at', 'api_files', ['expires_at'])
    op.create_table('api_file_chunks',
    sa.Column('file_id', sa.String(length=40), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['file_id'], ['api_files.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('file_id', 'seq')
    )
    op.create_table('api_batches',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('key_id', sa.String(length=16), nullable=False),
    sa.Column('endpoint', sa.String(length=200), nullable=False),
    sa.Column('input_file_id', sa.String(length=40), nullable=False),
    sa.Column('completion_window', sa.String(length=16), nullable=False),
    sa.Column('metadata', JSON, nullable=True),
    sa.Column('output_expires_s', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('end_status', sa.String(length=16), nullable=True),
    sa.Column('errors', JSON, nullable=True),
    sa.Column('output_file_id', sa.String(length=40), nullable=True),
    sa.Column('error_file_id', sa.String(length=40), nullable=True),
    sa.Column('created_at', TIME, nullable=False),
    sa.Column('expires_at', TIME, nullable=False),
    *[sa.Column(f'{name}_at', TIME, nullable=True) for name in (
        'in_progress', 'finalizing', 'completed', 'failed', 'expired', 'cancelling', 'cancelled')],
    *[sa.Column(name, sa.Integer(), nullable=False) for name in (
        'num_total', 'num_completed', 'num_failed', 'num_unfinished')],
    sa.Column('input_tokens', sa.BigInteger(), nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), nullable=False),
    sa.Column('counted_at', TIME, nullable=True),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_until', TIME, nullable=True),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id']),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_api_batches_key_created', 'api_batches', ['key_id', 'created_at'])
    op.create_index('ix_api_batches_status', 'api_batches', ['status'])


def downgrade() -> None:
    op.drop_table('api_batches')
    op.drop_table('api_file_chunks')
    op.drop_table('api_files')
    op.drop_table('api_keys')
