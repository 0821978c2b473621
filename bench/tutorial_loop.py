"""The baseline: the McCormick & Ryan "BERT Fine-Tuning Tutorial with PyTorch" recipe our first script followed.

Kept faithful on purpose, slow parts included: one tokenizer call per example (``encode_plus`` in older
transformers; calling the tokenizer on one pair is the same thing), every example padded to ``max_length``,
a ``TensorDataset`` read by a ``RandomSampler`` (no length grouping), fp32, ``AdamW(lr, eps)`` with a linear
schedule and no warm-up, gradient clipping at 1.0, ``model.zero_grad()`` every step, and dev accuracy after
each epoch. The only departure: BoolQ is a sentence pair, so ``token_type_ids`` are passed as the tokenizer
returns them (the tutorial's single-sentence CoLA passes ``None``), and dev accuracy is total correct / total
rather than a mean of per-batch accuracies, so it compares exactly with the engine's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from app.engine.data import Example


@dataclass(frozen=True)
class TutorialResult:
    """Timings and outcome of one tutorial-style training run."""

    train_s: float
    dev_eval_s: float
    dev_accuracy: float
    real_tokens: int
    padded_tokens: int
    losses: list[float]


def seed_everything(seed: int) -> None:
    """The tutorial's seeding cell."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def encode_padded(tokenizer: PreTrainedTokenizerBase, rows: list[Example], max_length: int) -> TensorDataset:
    """Tokenize one example at a time, each padded to ``max_length``, and stack the tensors."""
    input_ids, token_type_ids, attention_masks = [], [], []
    for row in rows:
        encoded = tokenizer(
            row.text,
            row.text_pair,
            max_length=max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        input_ids.append(encoded["input_ids"])
        token_type_ids.append(encoded["token_type_ids"])
        attention_masks.append(encoded["attention_mask"])
    labels = torch.tensor([int(row.label) for row in rows])
    return TensorDataset(torch.cat(input_ids), torch.cat(token_type_ids), torch.cat(attention_masks), labels)


def train_tutorial(
    model: torch.nn.Module,
    train_data: TensorDataset,
    dev_data: TensorDataset,
    *,
    batch_size: int,
    lr: float,
    eps: float,
    epochs: int,
    device: str = "cpu",
) -> TutorialResult:
    """The tutorial's training loop, timed; dev evaluation time is measured apart."""
    train_loader = DataLoader(train_data, sampler=RandomSampler(train_data), batch_size=batch_size)
    dev_loader = DataLoader(dev_data, sampler=SequentialSampler(dev_data), batch_size=batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps)
    total_steps = len(train_loader) * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    model.to(device)
    losses: list[float] = []
    dev_eval_s, dev_accuracy = 0.0, 0.0
    started = time.perf_counter()

    for _epoch in range(epochs):
        model.train()
        for batch in train_loader:
            b_input_ids, b_token_types, b_mask, b_labels = (t.to(device) for t in batch)
            model.zero_grad()
            result = model(
                b_input_ids,
                token_type_ids=b_token_types,
                attention_mask=b_mask,
                labels=b_labels,
                return_dict=True,
            )
            losses.append(result.loss.item())
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

        eval_started = time.perf_counter()
        dev_accuracy = evaluate(model, dev_loader, device)
        dev_eval_s += time.perf_counter() - eval_started

    train_data_mask = train_data.tensors[2]
    return TutorialResult(
        train_s=time.perf_counter() - started,
        dev_eval_s=dev_eval_s,
        dev_accuracy=dev_accuracy,
        real_tokens=int(train_data_mask.sum()) * epochs,
        padded_tokens=train_data_mask.numel() * epochs,
        losses=losses,
    )


def evaluate(model: torch.nn.Module, loader: DataLoader, device: str) -> float:
    """The tutorial's validation pass: argmax of the logits, no gradients."""
    model.eval()
    correct, total = 0, 0
    for batch in loader:
        b_input_ids, b_token_types, b_mask, b_labels = (t.to(device) for t in batch)
        with torch.no_grad():
            logits = model(b_input_ids, token_type_ids=b_token_types, attention_mask=b_mask, return_dict=True).logits
        correct += int((logits.argmax(dim=1) == b_labels).sum())
        total += len(b_labels)
    return correct / total
