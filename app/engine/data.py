"""BoolQ loading (local jsonl in SuperGLUE or original format, or the Hugging Face hub) and splits."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HUB_DATASET = "google/boolq"
# Value of --data-dir / DATA_DIR that asks for the hub copy instead of a local folder.
HUB_SOURCE = "hub"


class DataError(ValueError):
    """The data could not be found or is malformed; the message says where and why."""


@dataclass(frozen=True)
class BoolQExample:
    idx: int
    question: str
    passage: str
    label: bool


@dataclass(frozen=True)
class BoolQ:
    train: list[BoolQExample]
    val: list[BoolQExample]


def digest(rows: list[BoolQExample]) -> str:
    """A short fingerprint of exactly these rows (ids, labels and text), so runs on different data differ."""
    h = hashlib.sha256()
    for row in rows:
        h.update(f"{row.idx}\t{int(row.label)}\t{row.question}\t{row.passage}\n".encode())
    return h.hexdigest()[:16]


def load_boolq(source: str | Path) -> BoolQ:
    """Load train and val from a folder with ``train.jsonl`` and ``val.jsonl``, or from the hub (``"hub"``)."""
    if str(source) == HUB_SOURCE:
        return load_boolq_from_hub()
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist; pass --data-dir (or DATA_DIR) a folder holding "
            "train.jsonl and val.jsonl"
        )
    return BoolQ(train=read_jsonl(folder / "train.jsonl"), val=read_jsonl(folder / "val.jsonl"))


def read_jsonl(path: Path) -> list[BoolQExample]:
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


def parse_example(row: object, default_idx: int) -> BoolQExample:
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
    return BoolQExample(idx=idx, question=row["question"], passage=passage, label=row[label_field])


def load_boolq_from_hub() -> BoolQ:
    """Download google/boolq with ``datasets``; offline, fail at once with a pointer to local files."""
    from huggingface_hub import constants

    hint = "pass --data-dir (or set DATA_DIR to) a folder holding train.jsonl and val.jsonl"
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"HF_HUB_OFFLINE is set, so {HUB_DATASET} cannot be downloaded; {hint}")
    try:
        import datasets

        hub = datasets.load_dataset(HUB_DATASET)
    except Exception as exc:  # any network or cache failure means the same thing to the user
        raise DataError(f"could not load {HUB_DATASET} from the Hugging Face hub ({exc}); {hint}") from exc

    def convert(split) -> list[BoolQExample]:
        return [parse_example(dict(row), default_idx=i) for i, row in enumerate(split)]

    return BoolQ(train=convert(hub["train"]), val=convert(hub["validation"]))


def split_train_dev(
    examples: list[BoolQExample], dev_size: float, seed: int
) -> tuple[list[BoolQExample], list[BoolQExample]]:
    """Hold out ``dev_size`` of train as dev, stratified by label and fixed by ``seed``."""
    # Imported here: the API and its console read rows through this module without loading scikit-learn.
    from sklearn.model_selection import train_test_split

    if len(examples) < 2:
        raise DataError(f"need at least 2 train examples to split off a dev set, got {len(examples)}")
    labels = [ex.label for ex in examples]
    try:
        train, dev = train_test_split(examples, test_size=dev_size, random_state=seed, stratify=labels)
    except ValueError:
        # Too few of one class to stratify (tiny smoke runs): fall back to a plain seeded split.
        log.warning(
            "dev split of %d examples cannot be stratified; using a random split",
            len(examples),
        )
        train, dev = train_test_split(examples, test_size=dev_size, random_state=seed)
    return list(train), list(dev)
