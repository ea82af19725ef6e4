"""Self-speculative decoding: drafts that read the dense model's weights in place, their
delta checkpoints, and the draft-and-verify acceptance rules."""

from .draft import DRAFT_METHODS, make_draft
from .healing import heal_draft

__all__ = ["DRAFT_METHODS", "heal_draft", "make_draft"]
