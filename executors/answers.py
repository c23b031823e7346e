"""Answer normalisation shared by aggregators and replay scoring."""

from __future__ import annotations

import re

__all__ = ["INVALID_ANSWERS", "normalize_answer"]

INVALID_ANSWERS = frozenset({"", "err", "none", "null", "?", "n/a"})
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{(.*)\}", re.S)
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def normalize_answer(answer: object) -> str | None:
    """A canonical string for comparing answers, or ``None`` when there is no usable answer.

    Strips ``\\boxed{}``, ``$``, surrounding text macros, spaces and thousands separators; numbers are
    written in their shortest form (``"204.0"`` -> ``"204"``); letters are compared case-insensitively.
    """
    if answer is None:
        return None
    text = str(answer).strip()
    boxed = _BOXED.search(text)
    if boxed:
        text = boxed.group(1)
    text = _TEXT.sub(r"\1", text)
    text = text.replace("$", "").replace("\\!", "").replace("\\,", "").strip().rstrip(".").strip()
    compact = text.replace(",", "").replace(" ", "")
    if _NUMBER.match(compact):
        try:
            value = float(compact)
        except ValueError:  # pragma: no cover - the regex admits only floats
            value = None
        if value is not None and value == value and abs(value) != float("inf"):
            if value.is_integer() and abs(value) < 1e15:
                return str(int(value))
            return repr(value)
    text = "".join(text.split()).lower()
    if text in INVALID_ANSWERS:
        return None
    return text
