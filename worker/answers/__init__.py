"""Prompts and answers: chat-templated prompts, answer validation, consistency checks, chunk merges."""
