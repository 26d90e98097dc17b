"""Narrow exception types of the data plane.

Every error a user can cause by a bad argument or bad input derives from
:class:`JobInputError`; the command line prints its message as one line and exits 2,
before any Ray work starts. Everything else is a bug or an infrastructure failure.
"""


class JobInputError(Exception):
    """An input the user controls is wrong; the message says what to fix."""


class UsageError(JobInputError):
    """A command-line argument or config value is invalid."""


class ManifestError(JobInputError):
    """The manifest is unreadable, empty, or violates the schema contract."""


class ModelError(JobInputError):
    """The model checkpoint is missing, incomplete or of an unsupported architecture."""


class StageSpecError(UsageError):
    """A stage layout does not cover the model's layers exactly once, in order."""


class OutputError(JobInputError):
    """The output location is unusable, or holds a commit that contradicts this run."""


class FilesystemUnavailable(JobInputError, ValueError):
    """A URI's protocol needs an fsspec filesystem package that is not installed here; the
    message names the package. Never a reject: every row of that protocol would fail alike."""


class PlanError(JobInputError):
    """A plan file is missing, unreadable, or does not match the manifest it names."""


class AdmissionTimeout(Exception):
    """The cluster did not grant a job its whole minimum footprint in time (not an input error:
    the same job can succeed on a larger or less busy cluster). The message names what is missing."""


#: Every :class:`TransientFailure` message starts with this, so Ray Data's in-task retry
#: (``DataContext.retried_map_errors``, matched on the message) retries exactly these.
TRANSIENT_MARKER = "transient failure:"


class TransientFailure(Exception):
    """Infrastructure, not data: throttling, a timeout, a lost connection, an out-of-memory
    stage. The batch fails and is retried; it is never committed as a reject."""

    def __init__(self, message: str):
        super().__init__(f"{TRANSIENT_MARKER} {message}")


class CommitConflict(Exception):
    """Another attempt committed this partition first; this attempt's files were removed."""
