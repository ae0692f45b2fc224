"""The answer's text as tokens come: linear in the answer's length, cut at the first stop string."""

from __future__ import annotations


class Detokenizer:
    """Each ``step`` decodes one id incrementally (``Tokenizer.decode_stream``) and returns the text it adds;
    a stop string is looked for only in the last ``len(stop) - 1`` characters plus the new piece, so neither
    decoding nor the stop check re-reads the whole answer. ``text(ids)`` is the final answer: the full decode
    of ``ids`` (what a batch ``decode`` gives, a trailing incomplete character included) cut at the stop."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.step_text = tokenizer.decode_stream()
        self.parts: list[str] = []
        self.length = 0
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.tail = ""
        self.cut: int | None = None  # where the first stop string starts, once seen

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    def step(self, token_id: int) -> str:
        if self.stopped:
            return ""
        piece = self.step_text(token_id)
        if not piece:
            return ""
        window = self.tail + piece
        found = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if found:
            self.cut = self.length - len(self.tail) + min(found)
            piece = piece[: max(0, self.cut - self.length)]
        self.parts.append(piece)
        self.length += len(piece)
        self.tail = window[-self.keep:] if self.keep else ""
        return piece

    def text(self, ids: list[int]) -> str:
        emitted = "".join(self.parts)
        if self.stopped:
            return emitted[: self.cut]
        full = self.tokenizer.decode(ids)
        if not full.startswith(emitted):
            return full  # the incremental and the batch decode disagree: the batch decode is the answer
        found = [i for i in (full.find(s, max(0, len(emitted) - self.keep)) for s in self.stops) if i >= 0]
        return full[: min(found)] if found else full
