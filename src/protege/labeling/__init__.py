"""Labeling: the teacher answers every text once, through the store.

``prompts`` (how a text becomes a request), ``data`` (reading the user's files into examples), ``engine`` (API
calls: concurrency, limits, retries, budget), ``batch`` (provider batch APIs), ``labeler`` (the stage itself:
:func:`label`, :func:`estimate`, the signal files).
"""

