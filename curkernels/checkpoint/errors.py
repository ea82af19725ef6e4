"""The one exception a corrupt, mismatched or foreign checkpoint raises."""


class CheckpointError(ValueError):
    """A compressed checkpoint is corrupt, mismatched or of an unknown format."""
