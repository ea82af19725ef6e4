"""Self-speculative decoding: drafts that read the dense model's weights in place, their
delta checkpoints, and the draft-and-verify acceptance rules."""

from .delta import DraftBaseMismatchError, load_draft, save_draft
from .draft import DRAFT_METHODS, make_draft
from .healing import heal_draft

__all__ = ["DRAFT_METHODS", "DraftBaseMismatchError", "heal_draft", "load_draft", "make_draft",
           "save_draft"]
