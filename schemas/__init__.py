"""The shared vocabulary: settings, lifecycle states and reason codes, the SQL store, boundary records."""
from schemas.records import BatchStatus, JobRecord
from schemas.settings import Settings
from schemas.states import DocbatchError, ErrorCode, JobState
from schemas.sql.store import Store

__all__ = ["BatchStatus", "DocbatchError", "ErrorCode", "JobRecord", "JobState", "Settings", "Store"]
