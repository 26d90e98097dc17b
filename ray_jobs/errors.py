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


#: The exit status of a partition job whose pipeline stalled (2: bad input, 3: admission timeout).
STALL_EXIT_CODE = 4


class PipelineStalled(Exception):
    """No row moved for ``stall_timeout_s`` (to the sink, nor between the pipeline's operators):
    the pipeline is stuck, typically on an actor that died but keeps its pool slot, or one that
    never got its resources. The message names the stuck operator and its pending or dead actors.

    A failure of the job, not of a batch: it is not a :class:`TransientFailure` (retrying a batch
    inside a hung pipeline would hang again) and never a reject. The attempt is discarded, nothing
    is committed, and the job exits :data:`STALL_EXIT_CODE`. The control plane retries the
    partition like any failed job: a fresh attempt gets fresh actors, so a dead actor or a lost
    node is survived; a stall that is in the data or the model stalls every try and fails the
    task with this message."""


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
