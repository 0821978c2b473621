"""The CPU attention path: exact where it claims exactness (merged Q/K/V, no dropout), and a dropout with the
recipe's probability and scaling, reproducible from torch's seed."""

import pytest
import torch

from app.engine.attention import drop_mask, dropout, use_cheap_cpu_attention
from app.engine.modeling import compute_last_layer_for_first_token_only
from tests.helpers import tiny_bert


def batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[3, 2:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


@pytest.mark.parametrize("first_token_only", [False, True])
def test_merged_qkv_attention_gives_the_stock_logits_and_gradients_without_dropout(first_token_only):
    torch.manual_seed(0)
    stock, cheap = tiny_bert(), tiny_bert()
    cheap.load_state_dict(stock.state_dict())
    assert use_cheap_cpu_attention(cheap)
    if first_token_only:
        compute_last_layer_for_first_token_only(cheap)
    outputs = [m.train()(**batch()) for m in (stock, cheap)]
    for out in outputs:
        out.loss.backward()
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=0, atol=1e-5)
    for (name, a), b in zip(stock.named_parameters(), cheap.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert cheap.state_dict().keys() == stock.state_dict().keys()  # what is saved is unchanged


def test_with_dropout_training_is_reproducible_from_torch_seed_and_evaluation_is_exact():
    torch.manual_seed(0)
    stock, cheap = tiny_bert(dropout=0.1), tiny_bert(dropout=0.1)
    cheap.load_state_dict(stock.state_dict())
    use_cheap_cpu_attention(cheap)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(cheap.train()(**batch()).logits)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with torch.no_grad():  # evaluation has no dropout: the stock model's logits
        torch.testing.assert_close(cheap.eval()(**batch()).logits, stock.eval()(**batch()).logits, rtol=0, atol=1e-5)


def test_the_drop_rate_is_p_and_the_rest_is_scaled():
    torch.manual_seed(0)
    n, p = 4_000_000, 0.1
    mask = drop_mask(torch.Size([n]), p)
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(mask.float().mean().item() - p) < 5 * sigma
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, p, training=True)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.sum().backward()  # the gradient flows through the same mask, with the same scale
    torch.testing.assert_close(x.grad, y.detach())
    assert dropout(x, p, training=False) is x


def test_masks_differ_between_calls_but_not_between_equal_seeds():
    torch.manual_seed(3)
    a, b = drop_mask(torch.Size([1000]), 0.5), drop_mask(torch.Size([1000]), 0.5)
    torch.manual_seed(3)
    assert not torch.equal(a, b) and torch.equal(drop_mask(torch.Size([1000]), 0.5), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dropout_path_computes_dropout_of_the_softmax_times_values(monkeypatch, dtype):
    import app.engine.attention

    torch.manual_seed(0)
    p = 0.25
    model = tiny_bert(dropout=p).train()
    attention = model.bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=dtype) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # the second row's last two positions are padding
    dropped = torch.rand(2, 4, 5, 5) < p
    monkeypatch.setattr(app.engine.attention, "drop_mask", lambda shape, rate: dropped)
    out = app.engine.attention.attend(attention, q, k, v, mask)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attention.scaling
    probabilities = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    expected = (probabilities.masked_fill(dropped, 0) / (1 - p)) @ v.float()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), expected.transpose(1, 2).flatten(2), rtol=0, atol=tolerance)


def softmax_dropout_values(scores, dropped, value):
    """The plain expression the dropout path computes, for autograd to differentiate."""
    return torch.matmul(torch.softmax(scores, dim=-1).masked_fill(dropped, 0), value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dropout_path_gives_the_gradients_autograd_gives_bit_for_bit(dtype):
    from app.engine.attention import _SoftmaxDropoutValues

    torch.manual_seed(0)
    scores, value = torch.randn(2, 4, 7, 7, dtype=dtype), torch.randn(2, 4, 7, 8, dtype=dtype)
    dropped, grad = torch.rand(2, 4, 7, 7) < 0.25, torch.randn(2, 4, 7, 8, dtype=dtype)
    found = []
    for function in (softmax_dropout_values, _SoftmaxDropoutValues.apply):
        s, v = scores.clone().requires_grad_(), value.clone().requires_grad_()
        out = function(s, dropped, v)
        out.backward(grad)
        found.append((out.detach(), s.grad, v.grad))
    for ours, autograds in zip(found[1], found[0], strict=True):
        assert torch.equal(ours, autograds)


def test_the_dropout_path_keeps_one_positions_by_positions_tensor_for_backward():
    """Of the [batch, heads, positions, positions] tensors, backward keeps the softmax output and the 1-byte mask
    only (autograd alone would also keep the dropped copy: 50 MB per layer at batch 32 x 256 tokens in bf16)."""
    import app.engine.attention

    model = tiny_bert(dropout=0.1).train()
    attention = model.bert.encoder.layer[0].attention.self
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    kept = []

    def keep(tensor):
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        app.engine.attention.attend(attention, q, k, v, torch.ones(2, 1, 6, 6, dtype=torch.bool))
    square = [t for t in kept if t.shape == (2, 4, 6, 6)]  # not the [2, 1, 6, 6] padding mask
    assert sorted(str(t.dtype) for t in square) == ["torch.bool", "torch.float32"], [t.dtype for t in square]
