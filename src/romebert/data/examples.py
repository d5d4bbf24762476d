"""One input row (:class:`Example`) and its label: the label set of a file, and label strings turned
into class ids with a one-line error naming the row's file and line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from romebert.core.errors import RomebertError


@dataclass
class Example:
    """One input row. ``label`` is the label string as written in the file (float for regression)."""

    guid: str
    text_a: str
    text_b: str | None
    label: str | float | None
    where: str | None = None  # "file:line" of a user's file, for messages


def label_set(examples: Sequence[Example]) -> tuple[str, ...]:
    """The distinct label strings of ``examples``, sorted (numerically when all labels are integers)."""
    found = {str(ex.label) for ex in examples if ex.label is not None}
    if all(_is_int(label) for label in found):
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _where(ex: Example) -> str:
    return ex.where or f"example {ex.guid}"


def label_ids(examples: Sequence[Example], labels: tuple[str, ...] | None) -> list[int | float | None]:
    """Label strings -> class indices (position in ``labels``); regression (``labels=None``) -> floats."""
    ids: list[int | float | None] = []
    if labels is None:
        for ex in examples:
            if ex.label is None:
                ids.append(None)
                continue
            try:
                ids.append(float(ex.label))
            except ValueError:
                raise RomebertError(f"{_where(ex)}: score '{ex.label}' is not a number") from None
        return ids
    position = {label: i for i, label in enumerate(labels)}
    for ex in examples:
        if ex.label is None:
            ids.append(None)
        elif str(ex.label) in position:
            ids.append(position[str(ex.label)])
        else:
            raise RomebertError(f"{_where(ex)}: label '{ex.label}' is not one of {list(labels)}")
    return ids
