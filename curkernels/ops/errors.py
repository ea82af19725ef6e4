"""Exceptions shared by the ops layer."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name (argument or CURKERNELS_BACKEND) but cannot run here."""
