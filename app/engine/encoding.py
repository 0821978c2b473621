"""From text to tensors: one fast-tokenizer call per split, length-grouped batches, dynamic padding."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from app.engine.data import Example

# Length-grouped sampling sorts within windows of this many batches (as HF's LengthGroupedSampler).
MEGABATCH_FACTOR = 50
# On a GPU batch widths are rounded up to a multiple of this: a few shapes (8 at max_length 256) instead of one per
# width, so kernels and attention plans are picked once per shape; the CPU pads exactly (padding costs it compute).
GPU_WIDTH_MULTIPLE = 32


@dataclass
class Encoded:
    """A tokenized split: unpadded token ids per example, plus labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer: PreTrainedTokenizerBase, rows: list[Example], max_length: int) -> Encoded:
    """Tokenize texts (or text pairs) in one batched fast-tokenizer call, without padding."""
    pairs = [r.text_pair for r in rows] if any(r.text_pair is not None for r in rows) else None
    if pairs is not None:
        pairs = [pair or "" for pair in pairs]
    enc = tokenizer(
        [r.text for r in rows],
        pairs,
        truncation="longest_first",
        max_length=max_length,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    return Encoded(enc["input_ids"], enc["token_type_ids"], [r.label for r in rows])


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


@dataclass
class DeviceSplit:
    """A split as padded tensors on the training device, built once before training.

    A training batch is then a gather and a slice on the device: no per-step Python padding and, on a GPU,
    no per-step host-to-device copy (all of BoolQ train is ~30 MB). Lengths are kept on the host too, so a
    batch's width is known without reading the device.
    """

    input_ids: torch.Tensor  # [rows, longest row], pad_id past each row's end
    token_type_ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    host_lengths: list[int]
    prepared_mask: bool = False  # attention masks as [batch, 1, 1, width] booleans (``prepared_mask``)

    def batch(self, rows: torch.Tensor, host_rows: list[int], pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
        """Rows ``rows`` (a device index tensor; ``host_rows`` the same indices) padded to their longest member,
        rounded up to ``pad_to_multiple_of`` (``GPU_WIDTH_MULTIPLE`` on GPUs; the CPU takes the exact width)."""
        longest = max(self.host_lengths[i] for i in host_rows)
        width = min(-(-longest // pad_to_multiple_of) * pad_to_multiple_of, self.input_ids.shape[1])
        lengths = self.lengths.index_select(0, rows)
        attend = torch.arange(width, device=rows.device) < lengths[:, None]
        return {
            "input_ids": self.input_ids[:, :width].index_select(0, rows),
            "token_type_ids": self.token_type_ids[:, :width].index_select(0, rows),
            "attention_mask": prepared_mask(attend) if self.prepared_mask else attend.long(),
            "labels": self.labels.index_select(0, rows),
        }


def prepared_mask(attend: torch.Tensor) -> torch.Tensor:
    """A [batch, width] padding mask as the [batch, 1, 1, width] boolean one transformers' attention applies.

    transformers passes a 4-D mask through untouched (``masking_utils``), where a 2-D one is expanded on every
    forward with a Python-level ``padding_mask.all()``: a host sync per forward on a GPU. Only for models whose
    mask handling tests/test_gpu_path.py checks (``modeling.takes_prepared_mask``)."""
    return attend[:, None, None, :]


def width_multiple(device: torch.device) -> int:
    """What batch widths are rounded up to on ``device``: ``GPU_WIDTH_MULTIPLE`` on GPUs, exact (1) elsewhere."""
    return GPU_WIDTH_MULTIPLE if device.type == "cuda" else 1


def to_device(data: Encoded, pad_id: int, device: torch.device, with_prepared_mask: bool = False) -> DeviceSplit:
    """Pad every row of ``data`` to the longest once, and move the tensors to ``device`` in one copy each."""
    lengths = [len(ids) for ids in data.input_ids]
    input_ids = np.full((len(data), max(lengths, default=1)), pad_id, dtype=np.int64)
    token_type_ids = np.zeros_like(input_ids)
    for row, (ids, types) in enumerate(zip(data.input_ids, data.token_type_ids, strict=True)):
        input_ids[row, : len(ids)] = ids
        token_type_ids[row, : len(types)] = types
    tensors = (input_ids, token_type_ids, np.array(lengths, dtype=np.int64), np.array(data.labels, dtype=np.int64))
    return DeviceSplit(
        *(move(torch.from_numpy(t), device) for t in tensors), host_lengths=lengths, prepared_mask=with_prepared_mask
    )


def move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To ``device``; to a GPU from pinned memory without blocking, so the copy overlaps work already queued."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def device_batches(
    split: DeviceSplit, batches: list[list[int]], pad_to_multiple_of: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches (lists of row indices) of one epoch from ``split``: the epoch's order is copied to the
    device once, then each batch is gathered there."""
    order = move(torch.tensor([i for indices in batches for i in indices], dtype=torch.long), split.labels.device)
    start = 0
    for indices in batches:
        yield split.batch(order[start : start + len(indices)], indices, pad_to_multiple_of)
        start += len(indices)


def padding_bounded_batches(lengths: list[int], max_padding: float, max_batch: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``max_batch`` whose padding share stays within
    ``max_padding``: one padded batch of mixed lengths (BoolQ's) computes about twice its real tokens, and on a CPU
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
