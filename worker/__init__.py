"""Workers: the Celery app and tasks, the prepare stage, the model and its batching engine."""
