"""The one error type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class MoetrtError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` says what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; {self.hint.rstrip('.')}"
        return " ".join(text.split())

    def naming(self, old: str, new: str) -> MoetrtError:
        """The same error with the path `old` (a hidden staging path) written as `new` (what the user asked)."""
        return MoetrtError(self.message.replace(old, new), self.hint.replace(old, new))
