"""The int8 LM head (deft.deploy.int8_head): rows quantised within half a step, the kernel's
logits within the rounding bound of the float32 ones, the argmax exactly the float32 (float64
here) argmax even on rows built to tie, a model generating the tokens of its float32 self, and
the float32 path where the kernel does not apply or cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch import nn

from deft.deploy import int8_head
from deft.deploy.int8_head import Int8LMHead, quantize_lm_head, quantize_rows


@pytest.fixture(scope="module")
def compiled():
    try:
        return int8_head.build_kernel()
    except int8_head.native.KernelUnavailable as exc:
        pytest.skip(f"compiled int8 head kernel unavailable here: {exc}")


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_rows_are_quantised_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g) * torch.rand(37, 1, generator=g)
    w[5] = 0  # an all-zero row keeps scale 1 and q 0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    for j in range(w.shape[0]):  # by hand, row by row
        step = float(w[j].abs().max()) / 127 or 1.0
        assert float(s[j]) == pytest.approx(step, rel=1e-6)
        assert float((w[j] - s[j] * q[j].float()).abs().max()) <= step / 2 * (1 + 1e-5)
    assert float(s[5]) == 1.0 and not q[5].any()


def near_ties(vocab: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that differ from one base row by far less than an int8 step: int8 alone reorders them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    w = base + 1e-4 * torch.randn(vocab, d, generator=g)
    w[: vocab // 2] = torch.randn(vocab // 2, d, generator=g) * 0.5  # and some ordinary rows
    return w, torch.randn(d, generator=g)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_kernel_is_within_the_bound_and_its_argmax_is_exact(compiled, threads, bias):
    vocab, d = 203, 45  # neither a multiple of the kernel's 4 rows nor of its 8 lanes
    flipped = 0
    for seed in range(12):
        w, x = near_ties(vocab, d, seed)
        b = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 1e-4 if bias else None
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        q, s = quantize_rows(w)
        bound = s.double() / 2 * x.abs().double().sum()
        approx, none = compiled.forward(x, q, s, None, b, threads)
        assert none == 0 and bool(((approx.double() - exact).abs() <= bound * 1.02 + 1e-5).all())
        got, recomputed = compiled.forward(x, q, s, w, b, threads)
        assert int(got.argmax()) == int(exact.argmax())
        flipped += int(approx.argmax()) != int(exact.argmax())
        again = (got.double() - exact).abs() <= 1e-5 * exact.abs().max()
        assert 1 <= recomputed <= vocab and int(again.sum()) >= recomputed  # recomputed rows are float32 logits
    assert flipped > 0  # the near ties really do fool int8 alone: the exact pass is what keeps the argmax


def test_head_module_uses_the_kernel_for_one_token_and_float32_otherwise(compiled):
    w, x = near_ties(64, 24, seed=3)
    layer = linear(w, torch.zeros(64))
    head = Int8LMHead(layer)
    with torch.no_grad():
        one = head(x.view(1, 1, -1))
        assert one.shape == (1, 1, 64) and head.last_recomputed is not None
        assert int(one.argmax()) == int(F.linear(x.double(), w.double()).argmax())
        head.last_recomputed = None
        xs = torch.randn(2, 3, 24)
        assert torch.equal(head(xs), layer(xs)) and head.last_recomputed is None  # prefill / batches: float32
    assert head.weight is layer.weight  # shared, not copied


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_model_with_an_int8_head_generates_its_float32_tokens(compiled, family):
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    dense, quant = make_model(family), make_model(family)
    head = quantize_lm_head(quant)
    assert isinstance(quant.get_output_embeddings(), Int8LMHead)
    assert quantize_lm_head(quant) is head  # idempotent
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(quant.generate(ids, **kwargs), dense.generate(ids, **kwargs))
        assert torch.equal(quant(input_ids=ids).logits, dense(input_ids=ids).logits)  # several positions: float32


def test_models_without_a_linear_head_are_refused():
    with pytest.raises(ValueError, match="no output embeddings"):
        quantize_lm_head(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="nn.Linear"):
        Int8LMHead(nn.Bilinear(2, 2, 2))
    with pytest.raises(ValueError, match="float32"):
        Int8LMHead(nn.Linear(4, 4).double())


def test_no_compiler_means_the_float32_path_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(int8_head, "_STATE", {})
    layer = linear(torch.randn(16, 8))
    head = Int8LMHead(layer)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(head(x), layer(x))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "fallback" in err and "Traceback" not in err
