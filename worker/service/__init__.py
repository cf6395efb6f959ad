"""The worker's service machinery: processes, their supervisor, Celery tasks, claims, leases and the sweep."""
