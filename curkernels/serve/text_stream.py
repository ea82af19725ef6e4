"""Token ids → text, one piece at a time: incremental detokenization and stop strings."""

from collections.abc import Iterable


class IncrementalDetokenizer:
    """Turns a growing sequence of token ids into text deltas.

    A multi-byte character may span several byte-level tokens; until it is complete the
    decoded text ends in U+FFFD, and that tail is held back rather than sent.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._sent = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.token_ids.append(int(token_id))
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def finish(self) -> str:
        """Whatever was held back, once no more tokens will come."""
        return self._take(self.tokenizer.decode(self.token_ids,
                                                skip_special_tokens=self.skip_special_tokens))

    def _take(self, text: str) -> str:
        delta = text[self._sent:]
        self._sent = len(text)
        return delta


class StopMatcher:
    """Cuts generated text at the first stop string, holding back a tail that could still be
    the start of one so that a streamed response never sends part of a stop string."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text that is safe to send now; sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self._pending += delta
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            ready, self._pending = self._pending[:cut], ""
            return ready
        split = max(len(self._pending) - self._hold, 0)
        ready, self._pending = self._pending[:split], self._pending[split:]
        return ready

    def flush(self) -> str:
        """The held-back tail, once generation has ended without a stop string."""
        ready, self._pending = self._pending, ""
        return ready
