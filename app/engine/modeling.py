"""Loading a BERT-family classifier and placing it: device, bf16, and the [CLS]-only last layer."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward

from app.engine.attention import attend
from app.engine.model_names import resolve_model

log = logging.getLogger(__name__)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The fast (Rust) tokenizer of a checkpoint."""
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_classifier(name: str, label_names: tuple[str, ...] = ("no", "yes")) -> PreTrainedModel:
    """A sequence classifier with one output per label (named in its config, so the saved folder loads with names
    in a ``pipeline``) on top of the checkpoint, with SDPA attention, in fp32 whatever dtype the
    checkpoint stores: training keeps fp32 master weights (autocast computes in bf16 where that pays), since AdamW's
    small updates round away in half precision and autocast rejects fp16 weights on the CPU."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name),
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={label: i for i, label in enumerate(label_names)},
        attn_implementation="sdpa",
        dtype=torch.float32,
        ignore_mismatched_sizes=True,  # a classifier checkpoint with another label count gets a fresh head
    )
    return model


def takes_prepared_mask(model: PreTrainedModel) -> bool:
    """Whether the model gets ``encoding.prepared_mask``'s 4-D boolean mask (no host sync per forward): BERT
    encoders on SDPA, whose mask handling tests/test_gpu_path.py checks against the 2-D mask. Eager attention
    adds the mask to the scores (it wants 0/-inf floats) and other architectures are unchecked: the 2-D mask."""
    if type(model) is not BertForSequenceClassification or model.config.is_decoder:
        return False
    return model.config._attn_implementation == "sdpa"


def compute_last_layer_for_first_token_only(model: PreTrainedModel) -> bool:
    """Make a BERT classifier's last encoder layer compute the [CLS] position only; True if applied.

    The classifier reads only the pooled [CLS] vector, and in the last layer the other positions
    contribute only their keys and values. Skipping their queries, attention outputs and feed-forward
    gives the same logits and gradients for about 1/num_layers less work. The weights are untouched
    (the change is an instance attribute, not saved); other architectures are left as they are.
    """
    if type(model) is not BertForSequenceClassification or model.config.is_decoder:
        return False
    last = model.bert.encoder.layer[-1]
    last.forward = functools.partial(_first_token_layer_forward, last)
    return True


def _first_token_layer_forward(layer, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
    """``BertLayer.forward`` restricted to the first output position (queries of position 0 only)."""
    attention = layer.attention.self
    first = hidden_states[:, :1]
    heads = (hidden_states.shape[0], -1, attention.num_attention_heads, attention.attention_head_size)
    query = attention.query(first).view(heads).transpose(1, 2)
    key = attention.key(hidden_states).view(heads).transpose(1, 2)
    value = attention.value(hidden_states).view(heads).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1]  # the mask's rows are query positions
    if getattr(attention, "cheap_cpu", False):  # app.engine.attention's dropout (the encoder uses it too)
        context = attend(attention, query, key, value, attention_mask)
    else:
        implementation = attention.config._attn_implementation
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        context, _ = interface(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=attention.dropout.p if attention.training else 0.0,
            scaling=attention.scaling,
        )
    attention_output = layer.attention.output(context.reshape(first.shape[0], 1, -1), first)
    return layer.feed_forward_chunk(attention_output)


class DeviceNotAvailable(ValueError):
    """DEVICE names a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA GPU when torch sees one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceNotAvailable(f"DEVICE={name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceNotAvailable(f"DEVICE={name!r}: torch sees no CUDA GPU here (torch {torch.__version__})")
    return device


@functools.cache
def bf16_supported(device_type: str = "cpu") -> bool:
    """Whether the device runs bf16 matmuls natively (CPU: AVX512-BF16 / AMX; GPU: Ampere or newer).

    Elsewhere bf16 is far slower than fp32. Cached: the autocast helper asks on every batch."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_tf32(device: torch.device) -> None:
    """On CUDA GPUs with TF32 (Ampere and newer) let fp32 matmuls use it: several times the fp32 rate with a
    10-bit mantissa, which fine-tuning tolerates (most matmuls already run in bf16 under autocast there)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device computes bf16 natively; fp32 elsewhere."""
    if bf16_supported(device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
