"""The one exception type the data layer raises for bad input.

Every check that a user can trip (an empty file, undecodable bytes, a tokenizer that does not match the
model, data too short for the stream layout, a truncated token file) raises :class:`DataError` with a
message that names the file and the problem. The tools turn it into ``error: ...`` and exit code 2;
the trainer lets it surface before the first step. It subclasses ``ValueError`` so callers that only
know "bad value" still catch it.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or inconsistent input data; the message says what and where."""
