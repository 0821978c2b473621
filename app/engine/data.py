"""Datasets as data: a :class:`DatasetSpec` says where rows come from and which columns hold the text, the
optional text pair and the label; :func:`load_dataset` turns it into generic :class:`Example` rows with label ids.

Files (CSV, TSV, JSON Lines, Parquet) and hub datasets are read with Hugging Face ``datasets`` (Arrow,
memory-mapped); the built-in ``boolq`` entry is :mod:`app.engine.boolq`. Every problem with the data is a
:class:`DataError` naming the file, the row or line where it can, and the fix (those types live in
:mod:`app.engine.examples`, which both readers build on; import them from here). Torch-free: the API validates
uploads with it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Literal

from huggingface_hub import constants
from pydantic import BaseModel, ConfigDict, Field

from app.engine.boolq import load_boolq
from app.engine.examples import DataError, Dataset, Example

log = logging.getLogger(__name__)

MIN_LABELS, MAX_LABELS = 2, 1_000
# A file without a val split gets this share of its rows as val (stratified, always the same seed, so every run
# on the dataset is scored on the same rows).
VAL_SHARE = 0.1
VAL_SPLIT_SEED = 0
FILE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
# Rows of a CSV/TSV file start on this line (line 1 is the header); JSON Lines rows on line 1.
HEADER_LINES = {"csv": 1, "tsv": 1, "jsonl": 0}


class DatasetSpec(BaseModel):
    """Where a dataset's rows come from and how its columns map onto text, text pair and label.

    ``task`` is single-label classification today; multi-label classification and regression are further values,
    read by the same spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=255)
    source: str = Field(min_length=1, description="A file, a BoolQ folder, or hub:<name>[:<config>].")
    format: Literal["boolq", "csv", "tsv", "jsonl", "parquet", "hub"]
    val_source: str | None = Field(default=None, description="A second file holding the val rows.")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: tuple[str, ...] | None = Field(
        default=None, description="The labels in id order; default: the train split's values, sorted."
    )
    file_sha256: str | None = Field(default=None, description="The file's sha256, where the caller knows it.")
    train_split: str = "train"
    val_split: str = "validation"
    task: Literal["single_label_classification"] = "single_label_classification"

    @property
    def columns(self) -> dict[str, str]:
        """Role → column, for the roles this spec maps."""
        mapped = {"text": self.text_column, "text_pair": self.text_pair_column, "label": self.label_column}
        return {role: column for role, column in mapped.items() if column}


def format_of(path: str | Path) -> str:
    """The file format a file name's suffix says, or a DataError listing the ones we read."""
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(
            f"{Path(path).name}: unknown file type; name it .csv, .tsv, .jsonl or .parquet (formats: "
            f"{', '.join(FILE_FORMATS)})"
        )
    return fmt


def load_dataset(spec: DatasetSpec, max_rows: int = 0) -> Dataset:
    """The spec's rows as train and val examples; ``max_rows`` > 0 refuses files with more rows than that."""
    if spec.format == "boolq":  # the BoolQ entry reads its own folder layout
        return load_boolq(spec.source)
    if spec.format == "hub":
        train_table, val_table = read_hub(spec)
    else:
        train_table = read_table(Path(spec.source), spec.format, max_rows)
        val_table = read_table(Path(spec.val_source), format_of(spec.val_source), max_rows) if spec.val_source else None
    return dataset_from_tables(spec, train_table, val_table)


def dataset_from_tables(spec: DatasetSpec, train_table, val_table) -> Dataset:
    """Check the mapped columns, map labels to ids, and split val off train where there is no val table."""
    where = Path(spec.source).name if spec.format != "hub" else spec.source
    train_rows = rows_of(train_table, spec, where)
    names = spec.label_names or label_names_of([label for *_, label in train_rows])
    check_label_count(names, spec.label_column, where)
    train = examples_of(train_rows, names, spec, where)
    if val_table is None:
        train, val = split_off(train, VAL_SHARE, VAL_SPLIT_SEED)
    else:
        val_where = Path(spec.val_source).name if spec.val_source else f"{spec.source} ({spec.val_split})"
        val = examples_of(rows_of(val_table, spec, val_where), names, spec, val_where, unseen_hint=True)
    return Dataset(spec.name, spec.source, tuple(names), train, val, file_sha256=spec.file_sha256)


def rows_of(table, spec: DatasetSpec, where: str) -> list[tuple]:
    """(row number, text, text pair, label) per row of an Arrow-backed table, after checking the mapping."""
    existing = list(table.column_names)
    for role, column in spec.columns.items():
        if column not in existing:
            raise DataError(
                f"{where}: no column '{column}' (the {role} column); the file's columns are: "
                f"{', '.join(existing)}. Map the {role} to one of them ({role}_column / --{role.replace('_', '-')}"
                "-column)"
            )
    texts = column_values(table, spec.text_column)
    pairs = column_values(table, spec.text_pair_column) if spec.text_pair_column else [None] * len(texts)
    labels = column_values(table, spec.label_column)
    return list(zip(range(len(texts)), texts, pairs, labels, strict=True))


def column_values(table, column: str) -> list:
    """One column as Python values, converted by Arrow in one call (iterating ``datasets``' column object goes
    row by row through its formatter: ~60x slower)."""
    return table.data.column(column).to_pylist()


def examples_of(rows: list[tuple], names: list[str], spec: DatasetSpec, where: str, unseen_hint=False) -> list[Example]:
    """Examples with label ids; a DataError names the first row with an empty text or an unknown label."""
    ids = {name: i for i, name in enumerate(names)}
    line_offset = 1 + HEADER_LINES.get(spec.format, 0)
    examples = []
    for row, text, pair, label in rows:
        at = f"{where}: row {row + 1}" + (f" (line {row + line_offset})" if spec.format in HEADER_LINES else "")
        for column, value in ((spec.text_column, text), (spec.text_pair_column, pair)):
            if column and (value is None or not str(value).strip()):
                raise DataError(f"{at}: empty text in column '{column}'; fill it in or drop the row")
        key = label_key(label)
        if key not in ids:
            if label is None:
                raise DataError(f"{at}: no label in column '{spec.label_column}'; fill it in or drop the row")
            why = "does not occur in the train split" if unseen_hint else "is not one of the label names"
            raise DataError(
                f"{at}: label {key!r} {why} ({', '.join(names[:20])}{', …' if len(names) > 20 else ''}); "
                "every val label needs train rows"
            )
        examples.append(Example(idx=row, text=str(text), text_pair=None if pair is None else str(pair), label=ids[key]))
    return examples


def label_key(value) -> str:
    """A label value as its name: strings as they are, integers (and integral floats) as digits."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def label_names_of(labels: list) -> list[str]:
    """The distinct labels in a fixed order: numerically for integer labels, alphabetically otherwise."""
    keys = {label_key(label) for label in labels if label is not None}
    if keys and all(re.fullmatch(r"-?\d+", key) for key in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def check_label_count(names: list[str] | tuple[str, ...], column: str, where: str) -> None:
    if len(names) < MIN_LABELS:
        raise DataError(
            f"{where}: the label column '{column}' has {len(names)} class{'es' if len(names) != 1 else ''} "
            f"({', '.join(names)}); classification needs at least {MIN_LABELS}: map the label to another column"
        )
    if len(names) > MAX_LABELS:
        raise DataError(
            f"{where}: the label column '{column}' has {len(names):,} classes, more than {MAX_LABELS:,}; "
            "is it a text or id column? Map the label to the column holding the classes"
        )


def read_table(path: Path, fmt: str, max_rows: int = 0):
    """One file as a Hugging Face ``datasets.Dataset`` (Arrow); a DataError for an empty, non-UTF-8, ragged or
    oversized file, naming the line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: the file is empty; upload a file with a header and rows")
    if fmt != "parquet":
        check_utf8(path)
    import datasets  # why: pyarrow and pandas (seconds): only where a file is read, not at the web process's start

    datasets.disable_progress_bars()
    builder, options = {
        "csv": ("csv", {}),
        "tsv": ("csv", {"sep": "\t"}),
        "jsonl": ("json", {}),
        "parquet": ("parquet", {}),
    }[fmt]
    try:
        table = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
    except Exception as exc:  # the reader's own words, with the line where it gives one
        raise DataError(f"{path.name}: {reader_problem(exc, fmt)}") from exc
    if len(table) == 0:
        raise DataError(f"{path.name}: no rows (only a header?); a dataset needs rows")
    if max_rows and len(table) > max_rows:
        raise DataError(f"{path.name}: {len(table):,} rows, more than MAX_DATASET_ROWS ({max_rows:,}); split the file")
    return table


def check_utf8(path: Path) -> None:
    """A DataError naming the first line with bytes that are not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path.name}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None


def reader_problem(exc: Exception, fmt: str) -> str:
    """What the reader says is wrong, the innermost cause first (``datasets`` wraps the parser's error)."""
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    text = " ".join(messages)
    ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if ragged:
        expected, line, saw = ragged.groups()
        return f"line {line} has {saw} fields where the header has {expected}; quote fields holding the separator"
    return f"cannot be read as {fmt.upper()} ({messages[-1][:300]})"


def read_hub(spec: DatasetSpec):
    """``hub:<name>[:<config>]``'s train and val splits; offline, a DataError at once."""
    name, _, config = spec.source.removeprefix("hub:").partition(":")
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"HF_HUB_OFFLINE is set, so {name} cannot be downloaded; upload the files instead")
    try:
        import datasets  # why: as in read_table

        hub = datasets.load_dataset(name, config or None)
    except Exception as exc:  # any network or cache failure means the same thing to the user
        raise DataError(f"could not load {name} from the Hugging Face hub ({exc})") from exc
    if spec.train_split not in hub:
        raise DataError(f"{name}: no split '{spec.train_split}'; its splits are: {', '.join(hub)}")
    return hub[spec.train_split], hub.get(spec.val_split)


def digest(rows: list[Example]) -> str:
    """A short fingerprint of exactly these rows (ids, labels and text), so runs on different data differ."""
    h = hashlib.sha256()
    for row in rows:
        pair = "" if row.text_pair is None else row.text_pair
        h.update(f"{row.idx}\t{row.label}\t{row.text}\t{pair}\n".encode())
    return h.hexdigest()[:16]


def split_off(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``share`` of ``examples``, stratified by label and fixed by ``seed``."""
    # why (both): the API and its console read rows through this module without loading numpy and scikit-learn.
    import numpy as np
    from sklearn.model_selection import train_test_split

    if len(examples) < 2:
        raise DataError(f"need at least 2 train examples to split off a held-out set, got {len(examples)}")
    labels = [ex.label for ex in examples]
    rows = np.arange(len(examples))  # split positions, not the examples: sklearn indexes a list of objects slowly
    try:
        kept, held = train_test_split(rows, test_size=share, random_state=seed, stratify=labels)
    except ValueError:
        # Too few of one class to stratify (tiny smoke runs): fall back to a plain seeded split.
        log.warning("held-out split of %d examples cannot be stratified; using a random split", len(examples))
        kept, held = train_test_split(rows, test_size=share, random_state=seed)
    return [examples[i] for i in kept], [examples[i] for i in held]


def split_train_dev(examples: list[Example], dev_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``dev_size`` of train as dev (for per-epoch accuracy, early stopping), stratified and seeded."""
    return split_off(examples, dev_size, seed)
