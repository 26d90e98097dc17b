"""Narrow exception types of the control plane."""


class ControlPlaneError(Exception):
    """Base class."""


class ClusterError(ControlPlaneError):
    """A Ray cluster could not be created, reached, or torn down."""


class ClusterNotReady(ClusterError):
    """The cluster did not become ready in time."""


class RayJobError(ControlPlaneError):
    """A Ray job could not be submitted, or ended FAILED or STOPPED."""


class RayJobsApiError(ControlPlaneError):
    """The Ray Jobs API answered with an error (status code and body in the message)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
