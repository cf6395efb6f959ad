"""Producers: the `docbatch` CLI (submit, status, results, run, demo) and the folder walk."""
from producer.intake.submit import Submission, submit

__all__ = ["Submission", "submit"]
