"""The peer: Hugging Face ``Trainer`` set up the way a careful user would, on the bench's rows and recipe.

What users would otherwise pick instead of our engine, configured well rather than by its defaults: the fast
tokenizer called once per split without padding, ``DataCollatorWithPadding`` (dynamic padding),
length-grouped sampling (``train_sampling_strategy="group_by_length"``, transformers 5's spelling), SDPA
attention, fused AdamW, no logging or checkpoint saving inside the loop, dev accuracy after each epoch (as
both other sides do), bf16 exactly where the engine uses it (native bf16 hardware), and the same seed,
thread count and hyperparameters: AdamW(lr, eps), linear schedule without warm-up, clipping at 1.0.

On a GPU it gets what a careful user would add there, and no host sync of the benchmark's own: tokens are
counted on the device (read once at the end), ``logging_nan_inf_filter=False`` (its check reads every loss back),
widths padded to a multiple of 8, batches copied from pinned memory by 2 loader workers, and the engine's GPU
evaluation batch. The CPU keeps exact widths (padding costs it compute) and loads in the main process, so the CPU
ratios do not move.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from app.engine.data import Example
from app.engine.evaluation import DEVICE_EVAL_BATCH_SIZE, EVAL_BATCH_SIZE


@dataclass(frozen=True)
class TrainerResult:
    """Timings and outcome of one Trainer run."""

    tokenize_s: float
    train_s: float
    dev_eval_s: float
    dev_accuracy: float
    real_tokens: int
    padded_tokens: int


class Pairs(Dataset):
    """Tokenized pairs as a plain map-style dataset of feature dicts (what ``DataCollatorWithPadding`` takes); no
    ``datasets`` library, so the peer also runs where only torch and transformers are installed."""

    def __init__(self, features: dict[str, list], labels: list[int]):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {name: values[i] for name, values in self.features.items()} | {"labels": self.labels[i]}


def tokenize(tokenizer: PreTrainedTokenizerBase, rows: list[Example], max_length: int) -> Pairs:
    """Unpadded pairs, tokenized by one batched fast-tokenizer call."""
    encoded = tokenizer(
        [r.text for r in rows],
        [r.text_pair for r in rows],
        truncation="longest_first",
        max_length=max_length,
    )
    return Pairs(dict(encoded), [int(r.label) for r in rows])


class TokenCounter:
    """Counts the tokens of training forwards (real and padded), as a forward pre-hook on the model. The real ones
    are summed on the mask's device and read once, at the end (``real``): no host sync per step."""

    def __init__(self) -> None:
        self.padded = 0
        self.real_on_device: torch.Tensor | int = 0

    def __call__(self, module: torch.nn.Module, args, kwargs) -> None:
        if module.training:
            mask = kwargs["attention_mask"]
            self.padded += mask.numel()  # from the shape: no sync
            self.real_on_device = self.real_on_device + mask.sum()

    @property
    def real(self) -> int:
        return int(self.real_on_device)


class EvalClock(TrainerCallback):
    """Sums the Trainer's own ``eval_runtime`` of each epoch's dev evaluation, and keeps the last accuracy."""

    def __init__(self) -> None:
        self.seconds, self.accuracy = 0.0, float("nan")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seconds += metrics["eval_runtime"]
        self.accuracy = metrics["eval_accuracy"]


def dev_accuracy(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def train_with_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[Example],
    dev_rows: list[Example],
    *,
    max_length: int,
    batch_size: int,
    lr: float,
    eps: float,
    epochs: int,
    seed: int,
    bf16: bool,
    device: str = "cpu",
) -> TrainerResult:
    """Tokenize, then ``Trainer.train()`` with a dev evaluation after each epoch; timed like the other sides."""
    started = time.perf_counter()
    train_set = tokenize(tokenizer, train_rows, max_length)
    dev_set = tokenize(tokenizer, dev_rows, max_length)
    tokenize_s = time.perf_counter() - started

    counter, clock = TokenCounter(), EvalClock()
    model.register_forward_pre_hook(counter, with_kwargs=True)
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_arguments(
            output_dir, batch_size=batch_size, lr=lr, eps=eps, epochs=epochs, seed=seed, bf16=bf16, device=device
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=dev_set,
            data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if device != "cpu" else None),
            compute_metrics=dev_accuracy,
            callbacks=[clock],
        )
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
    return TrainerResult(tokenize_s, train_s, clock.seconds, clock.accuracy, counter.real, counter.padded)


def training_arguments(
    output_dir: str, *, batch_size: int, lr: float, eps: float, epochs: int, seed: int, bf16: bool, device: str
) -> TrainingArguments:
    """The Trainer's settings: the bench's recipe, and on a GPU what a careful user adds there."""
    on_cpu = device == "cpu"
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=EVAL_BATCH_SIZE if on_cpu else DEVICE_EVAL_BATCH_SIZE,  # the engine's
        learning_rate=lr,
        adam_epsilon=eps,
        weight_decay=0.01,  # torch AdamW's default, which the other two sides use
        num_train_epochs=epochs,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=on_cpu,
        dataloader_num_workers=0 if on_cpu else 2,
        dataloader_persistent_workers=not on_cpu,  # not re-forked for each epoch's evaluation
        dataloader_pin_memory=not on_cpu,
        logging_nan_inf_filter=False,  # on: a host sync every step, for logs this run does not write
    )
