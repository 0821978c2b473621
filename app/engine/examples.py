"""What every dataset reader gives the engine: :class:`Example` rows, a :class:`Dataset` of them, and the
:class:`DataError` each reader raises. A leaf module, so the generic readers (:mod:`app.engine.data`) and the
built-in BoolQ entry (:mod:`app.engine.boolq`) both build on it without importing each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """The data could not be found or is malformed; the message says where and why."""


@dataclass(frozen=True)
class Example:
    """One row as the engine trains on it: a text, an optional second text, and a label id."""

    idx: int
    text: str
    text_pair: str | None
    label: int


@dataclass(frozen=True)
class Dataset:
    """A dataset's rows, split into train and val, with its label names (label id i is ``label_names[i]``)."""

    name: str
    source: str
    label_names: tuple[str, ...]
    train: list[Example]
    val: list[Example]
    file_sha256: str | None = None  # of the file read (an uploaded dataset's content address); None for BoolQ
