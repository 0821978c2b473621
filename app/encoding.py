"""From text to tensors: one fast-tokenizer call per split, length-grouped batches, dynamic padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from app.data import BoolQExample

# Length-grouped sampling sorts within windows of this many batches (as HF's LengthGroupedSampler).
MEGABATCH_FACTOR = 50


@dataclass
class Encoded:
    """A tokenized split: unpadded token ids per example, plus labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer: PreTrainedTokenizerBase, rows: list[BoolQExample], max_length: int) -> Encoded:
    """Tokenize question+passage pairs in one batched fast-tokenizer call, without padding."""
    enc = tokenizer(
        [r.question for r in rows],
        [r.passage for r in rows],
        truncation="longest_first",
        max_length=max_length,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    return Encoded(enc["input_ids"], enc["token_type_ids"], [int(r.label) for r in rows])


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle, sort by length inside windows of ``MEGABATCH_FACTOR`` batches, shuffle the batches.

    Batches then hold similar lengths, so dynamic padding wastes little, yet the order stays random.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def padding_bounded_batches(lengths: list[int], max_padding: float, max_batch: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``max_batch`` whose padding share stays within
    ``max_padding``: one padded batch of mixed BoolQ lengths computes about twice its real tokens, and on a CPU
    a few smaller batches cost less than that. ``max_padding`` 1 gives plain sorted slices of ``max_batch``."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Ascending order: the newcomer is the longest, so it sets the batch's width.
        full = len(current) == max_batch
        if current and (full or padding_share(tokens + lengths[i], len(current) + 1, lengths[i]) > max_padding):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return batches + [current] if current else batches


def padding_share(tokens: int, rows: int, width: int) -> float:
    """The share of a padded ``rows`` × ``width`` batch that is padding, for ``tokens`` real tokens."""
    return 1 - tokens / (rows * width) if rows and width else 0.0


def collate(
    data: Encoded, indices: list[int], pad_id: int, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Pad one batch to its longest member (dynamic padding), on ``device`` (default: the CPU)."""
    width = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(indices), width), dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        token_type_ids[row, :n] = torch.tensor(data.token_type_ids[i])
        attention_mask[row, :n] = 1
    labels = torch.tensor([data.labels[i] for i in indices])
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
    if device is not None:  # .to() returns the tensor itself when it is already there
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
    return batch
