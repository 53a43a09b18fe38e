"""Stop strings: the generation ends at the first one, and the client never sees it.

Text is released as tokens arrive, except a tail that could still grow into a stop string
(it is held back until the next piece decides); when a stop string completes, the text up
to it is released and the rest is dropped, as llama.cpp's server and OpenAI's API do.
"""

from __future__ import annotations

__all__ = ["StopFilter"]


class StopFilter:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can be released after ``piece``; after a stop string, nothing."""
        if self.stopped:
            return ""
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = max((self._overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the generation ended without a stop string."""
        text, self._held = ("" if self.stopped else self._held), ""
        return text

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """The longest tail of ``text`` that is a proper prefix of ``stop``."""
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                return n
        return 0
