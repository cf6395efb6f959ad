"""Producers: the `docbatch` CLI (submit, status, results, run, demo) and the folder walk."""
from producer.submit import Submission, submit

__all__ = ["Submission", "submit"]
