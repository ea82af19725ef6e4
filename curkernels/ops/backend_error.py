"""`BackendUnavailableError`: a backend asked for by name cannot run here."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name (argument or CURKERNELS_BACKEND) but cannot run here."""
