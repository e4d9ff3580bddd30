"""The checkpoint error, in a module of its own so that the format checks and the safe loader, which use
each other, can both raise it without importing one another at start-up."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, truncated, corrupted, unsafe, or made for another model)."""
