"""The worker's small error tree.

- `TransientError`: the outage kind; retried with backoff for as long as it lasts.
- `SchemaNotReady`: the database is not migrated; `run` refuses to start.
- anything else raised while applying a record is unexpected: retried a bounded
  number of times on that record alone, then the record is rejected (500/504).
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the worker's own errors."""


class TransientError(WorkerError):
    """A condition expected to clear by itself (lost connection, a lost race)."""


class SchemaNotReady(WorkerError):
    """The database schema is missing or older than this worker needs."""


class StartupError(WorkerError):
    """An embedded server or a dependency could not be started; the message says why."""
