"""The built-in ``boolq`` dataset: local jsonl (SuperGLUE or original format) or google/boolq from the hub.

The one module that knows BoolQ's fields: question → ``text``, passage → ``text_pair``, the boolean answer →
label ``no`` (0) / ``yes`` (1). Everything downstream trains on :class:`app.engine.examples.Example`.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import constants

from app.engine.examples import DataError, Dataset, Example

NAME = "boolq"
LABEL_NAMES = ("no", "yes")
HUB_DATASET = "google/boolq"
# Value of --data-dir / DATA_DIR that asks for the hub copy instead of a local folder.
HUB_SOURCE = "hub"


def load_boolq(source: str | Path) -> Dataset:
    """Load train and val from a folder with ``train.jsonl`` and ``val.jsonl``, or from the hub (``"hub"``)."""
    if str(source) == HUB_SOURCE:
        return load_boolq_from_hub()
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist; pass --data-dir (or DATA_DIR) a folder holding "
            "train.jsonl and val.jsonl"
        )
    return boolq_dataset(str(folder), read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "val.jsonl"))


def boolq_dataset(source: str, train: list[Example], val: list[Example]) -> Dataset:
    return Dataset(name=NAME, source=source, label_names=LABEL_NAMES, train=train, val=val)


def read_jsonl(path: Path) -> list[Example]:
    """Read one BoolQ file; each line is SuperGLUE (idx, label) or original BoolQ (title, answer)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (a BoolQ folder needs train.jsonl and val.jsonl)")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse_example(json.loads(line), default_idx=len(examples)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc
            except DataError as exc:
                raise DataError(f"{path}:{line_no}: {exc}") from exc
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def parse_example(row: object, default_idx: int) -> Example:
    """Turn one decoded JSON row into an example, naming the first missing or mistyped field."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    label_field = "label" if "label" in row else "answer"
    for name, kind in (("question", str), ("passage", str), (label_field, bool)):
        if name not in row:
            raise DataError(f"missing field '{name}'")
        if not isinstance(row[name], kind):
            raise DataError(f"field '{name}' must be {kind.__name__}, got {json.dumps(row[name])[:40]}")
    idx = row.get("idx", default_idx)
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise DataError(f"field 'idx' must be int, got {json.dumps(idx)[:40]}")
    passage = row["passage"]
    if isinstance(row.get("title"), str) and row["title"]:
        # The original format keeps the title apart; SuperGLUE writes "Title -- passage".
        passage = f"{row['title']} -- {passage}"
    return Example(idx=idx, text=row["question"], text_pair=passage, label=int(row[label_field]))


def load_boolq_from_hub() -> Dataset:
    """Download google/boolq with ``datasets``; offline, fail at once with a pointer to local files."""
    hint = "pass --data-dir (or set DATA_DIR to) a folder holding train.jsonl and val.jsonl"
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"HF_HUB_OFFLINE is set, so {HUB_DATASET} cannot be downloaded; {hint}")
    try:
        import datasets  # why: pyarrow and pandas (seconds), for the hub copy only; the web process imports this module

        hub = datasets.load_dataset(HUB_DATASET)
    except Exception as exc:  # any network or cache failure means the same thing to the user
        raise DataError(f"could not load {HUB_DATASET} from the Hugging Face hub ({exc}); {hint}") from exc

    def convert(split) -> list[Example]:
        return [parse_example(dict(row), default_idx=i) for i, row in enumerate(split)]

    return boolq_dataset(f"hub:{HUB_DATASET}", convert(hub["train"]), convert(hub["validation"]))
