"""Hand-computed approximations, loss (eq. 6) and density (METHOD.md §2) on small fixed tensors, and
on every pair of conftest.py's family × method matrix from the activations plain hooks record."""

import math

import pytest
import torch

from conftest import build, make_inputs, matrix_params
from deft.core.approx import APPROXIMATIONS, PAPER_L0_EPS, apply_fp32, make_approx
from deft.core.capture import ActivationCapture
from deft.core.loss import DensityLossConfig, combine_terms, site_term
from deft.core.metrics import DensityMeter, density_change
from deft.core.sites import ActivationSite, find_sites, unwrap_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

A = torch.tensor([[[0.0, 1.0, -2.0], [0.5, 0.0, 0.0]],
                  [[3.0, 0.0, 0.001], [9.0, 9.0, 9.0]]])  # (B=2, T=2, h=3); last token of seq 2 is padding
MASK = torch.tensor([[True, True], [True, False]])


def test_approximations_by_hand():
    a = torch.tensor([0.0, 1.0, -2.0])
    torch.testing.assert_close(make_approx("l0", eps=1.0)(a), torch.tensor([0.0, 0.5, 0.8]))
    torch.testing.assert_close(make_approx("tanh", beta=2.0)(a), torch.tanh(torch.tensor([0.0, 2.0, 4.0])))
    e = math.e
    torch.testing.assert_close(make_approx("sigmoid", beta=1.0)(a),
                               torch.tensor([0.0, 2 / (1 + 1 / e) - 1, 2 / (1 + e ** -2) - 1]))
    torch.testing.assert_close(make_approx("l1")(a), torch.tensor([0.0, 1.0, 2.0]))
    assert make_approx("l0").eps == 0.1  # deft's default; the paper's reference ε is 1e-7
    assert PAPER_L0_EPS == 1e-7


@pytest.mark.parametrize("name", ["l0", "tanh", "sigmoid"])
def test_bounded_forms_map_signed_activations_into_0_1_with_zero_only_at_zero(name):
    """On GELU-like signed values no form may go negative or charge an exact zero (was: tanh(βa) < 0
    for a < 0 and sigmoid(0) = 0.5, so the loss rewarded negative activations)."""
    a = torch.cat([torch.linspace(-6, 6, 1200), torch.zeros(1)])
    f = make_approx(name)(a)
    assert float(f.min()) >= 0.0 and float(f.max()) < 1.0
    assert float(f[a == 0].max()) == 0.0 and bool((f[a != 0] > 0).all())
    torch.testing.assert_close(f, make_approx(name)(-a))  # a penalty on |a|: -a costs what a costs


@pytest.mark.parametrize("name,params,match", [
    ("l0", {"eps": 0.0}, "eps > 0"), ("l0", {"eps": -1e-3}, "eps > 0"), ("tanh", {"beta": 0.0}, "beta > 0"),
    ("sigmoid", {"beta": -1.0}, "beta > 0"), ("relu6", {}, "unknown density approximation"),
    ("l0", {"beta": 2.0}, "takes"), ("l1", {"eps": 1e-3}, "takes"),
])
def test_invalid_approximations_rejected(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_approx(name, **params)


def test_approx_in_fp32_under_autocast():
    a = torch.full((4,), 1e-4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apply_fp32(make_approx("l0", eps=1e-7), a)
    assert out.dtype == torch.float32
    expected = (1e-4 ** 2) / (1e-4 ** 2 + 1e-7)  # 0.0990…: ε matters; in bf16 it would not
    torch.testing.assert_close(out, torch.full((4,), expected), rtol=2e-2, atol=0)


def test_site_term_counts_real_tokens_only():
    total, count = site_term(A, MASK, make_approx("l1"))
    # real tokens: [0,1,-2], [0.5,0,0], [3,0,0.001] → |a| summed
    assert count == 9
    assert total.item() == pytest.approx(3 + 0.5 + 3.001)


def test_loss_eq6_pools_layers_and_weights_stacks():
    approx = make_approx("l0", eps=1.0)
    enc = [site_term(A, MASK, approx), site_term(torch.zeros(2, 2, 3), MASK, approx)]
    dec = [site_term(torch.ones(1, 1, 3), torch.ones(1, 1, dtype=torch.bool), approx)]
    f = lambda x: x * x / (x * x + 1)  # noqa: E731
    enc_sum = sum(f(v) for v in [1.0, -2.0, 0.5, 3.0, 0.001])
    enc_loss = enc_sum / 18  # 9 real elements per layer × 2 layers
    dec_loss = 0.5  # f(1) = 0.5 for every element
    cfg = DensityLossConfig(weight=2.0, approx="l0", eps=1.0, encoder_weight=1.0, decoder_weight=3.0)
    value = combine_terms({"encoder": enc, "decoder": dec}, cfg)
    assert value.item() == pytest.approx(2.0 * (enc_loss + 3.0 * dec_loss), rel=1e-6)
    cfg0 = DensityLossConfig(approx="l0", eps=1.0, decoder_weight=0.0)
    assert combine_terms({"encoder": enc, "decoder": dec}, cfg0).item() == pytest.approx(enc_loss, rel=1e-6)
    assert combine_terms({"encoder": [], "decoder": []}, cfg) is None


@pytest.mark.parametrize("field", ["weight", "encoder_weight", "decoder_weight"])
def test_loss_config_rejects_negative_weights(field):
    with pytest.raises(ValueError, match=field):
        DensityLossConfig(**{field: -1.0})


def test_loss_config_validates_approx_early():
    with pytest.raises(ValueError, match="choose one of"):
        DensityLossConfig(approx="l2")


def _site(i, stack="encoder"):
    return ActivationSite(module=f"m{i}", point="act", stack=stack, layer=i, width=3, activation="GELU", family="t")


def test_density_meter_by_hand():
    meter = DensityMeter((_site(0), _site(1, "decoder")), threshold=0.01)
    meter.update(0, A, MASK)
    meter.update(1, torch.zeros(2, 2, 3), MASK)
    rep = meter.result().to_dict()
    row = rep["per_layer"][0]
    # real entries: 0,1,-2 | .5,0,0 | 3,0,.001 → 5 non-zero of 9; |a|>0.01: 4 of 9
    assert row["density"] == pytest.approx(5 / 9)
    assert row["density_threshold"] == pytest.approx(4 / 9)
    # union per sequence (exact): seq1 neurons {0,1,2} all active → 3/3; seq2 {0,2} → 2/3
    assert row["union_density"] == pytest.approx(5 / 6)
    assert row["tokens"] == 3
    assert rep["encoder"] == pytest.approx(5 / 9) and rep["decoder"] == 0.0
    assert rep["overall"] == pytest.approx((5 / 9 + 0) / 2)
    assert rep["threshold"]["tau"] == 0.01 and rep["threshold"]["encoder"] == pytest.approx(4 / 9)
    assert rep["tokens"] == {"encoder": 3, "decoder": 3}


def test_density_meter_streams_without_holding_activations():
    meter = DensityMeter((_site(0),))
    for _ in range(50):
        meter.update(0, A, MASK)
        meter.end_sequences()
    row = meter.result().per_layer[0]
    assert row["density"] == pytest.approx(5 / 9) and row["tokens"] == 150
    assert not meter._union  # nothing retained after the sequences closed


def test_absent_stack_is_none():
    meter = DensityMeter((_site(0),))
    meter.update(0, A, MASK)
    rep = meter.result().to_dict()
    assert rep["decoder"] is None and rep["threshold"]["decoder"] is None and rep["tokens"]["decoder"] is None


def test_density_change_eq10():
    assert density_change(0.94, 0.47) == pytest.approx(50.0)
    assert density_change(0.5, 0.5) == 0.0
    with pytest.raises(ValueError):
        density_change(0.0, 0.1)


def test_all_approximations_registered():
    assert set(APPROXIMATIONS) == {"l0", "tanh", "sigmoid", "l1"}
    # defaults (deft.core.approx): β = 1 for tanh (was: only "not NaN", which any number passed)
    assert make_approx("tanh")(torch.tensor(-1.0)).item() == pytest.approx(math.tanh(1.0))


def test_fused_l0_matches_autograd_value_and_gradient():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 7, dtype=torch.float64) * 0.3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    approx = make_approx("l0", eps=1e-2)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    fused = approx.masked_sum(a1, mask)
    plain = (approx(a2) * mask.unsqueeze(-1)).sum()
    torch.testing.assert_close(fused, plain)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    assert torch.autograd.gradcheck(lambda x: approx.masked_sum(x, mask), (a.clone().requires_grad_(),))


def test_fused_l0_recomputes_activation_from_its_input():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    approx = make_approx("l0", eps=1e-2)
    gelu = torch.nn.GELU()
    a = gelu(x)
    approx.masked_sum(a, mask, (gelu.forward, x)).backward()
    grad_recomputed = x.grad.clone()
    x.grad = None
    (approx(gelu(x)) * mask.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(grad_recomputed, x.grad)


# -- on real models: the family × method matrix -----------------------------------------------

@pytest.mark.parametrize(("family", "method"), matrix_params())
def test_model_loss_and_density_match_hand_computation(family, method):
    """eq. 6 and the density meter, fed by ActivationCapture on a real model, equal the numbers
    computed by hand from the activations that plain forward hooks record. No padding: every
    position (prompt tuning's virtual tokens too) is real. A site enters the loss only when its
    activation depends on a trainable parameter (else it cannot be trained down); the meter
    counts every site. The capture must not change the model's output. A module called once per
    layer it serves (ALBERT's shared MLP) is recorded at every call: one layer each."""
    model, _ = build(family, method, trained=True)
    inputs = make_inputs(family)
    sites = find_sites(model)
    recorded = {i: [] for i in range(len(sites))}  # per site: its activation at every call
    hooks = [unwrap_model(model).get_submodule(s.module).register_forward_hook(
        lambda m, x, y, i=i: recorded[i].append(y)) for i, s in enumerate(sites)]
    eps, tau, stack_weight = 1e-2, 0.05, {"encoder": 1.0, "decoder": 3.0}
    cfg = DensityLossConfig(weight=2.0, approx="l0", eps=eps, encoder_weight=1.0, decoder_weight=3.0)
    meter = DensityMeter(sites.sites, threshold=tau)
    with torch.no_grad():
        plain = model(**inputs).logits
    with ActivationCapture(model, sites, approx=make_approx("l0", eps=eps), meter=meter) as cap:
        captured = model(**inputs).logits
        loss = combine_terms(cap.pop_terms(), cfg)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(captured.detach(), plain, rtol=0, atol=0)

    penalty, elements = {}, {}  # per stack: Σ f(a) = Σ a² / (a² + ε) over trainable sites, and their size
    layers = [(site, y) for i, site in enumerate(sites) for y in recorded[i][len(recorded[i]) // 2:]]  # 2nd pass
    assert len(meter.result().per_layer) == len(layers)
    for i, (site, y) in enumerate(layers):
        a = y.detach().double()
        if y.requires_grad:
            penalty[site.stack] = penalty.get(site.stack, 0.0) + float((a * a / (a * a + eps)).sum())
            elements[site.stack] = elements.get(site.stack, 0) + a.numel()
        row = meter.result().per_layer[i]
        if site.routed:  # rows are (token, expert) pairs, top-2 of conftest's MoE configs (union: test_families)
            assert row["tokens"] == a.shape[0] // 2
            assert row["density"] == pytest.approx(float((a != 0).double().mean()), abs=1e-12)
            assert row["density_threshold"] == pytest.approx(float((a.abs() > tau).double().mean()), abs=1e-12)
            continue
        a = a.reshape(2, -1, site.width)  # (batch, positions, neurons); OPT hands over (B·T, h)
        assert row["tokens"] == a.shape[0] * a.shape[1]
        assert row["density"] == pytest.approx(float((a != 0).double().mean()), abs=1e-12)
        assert row["density_threshold"] == pytest.approx(float((a.abs() > tau).double().mean()), abs=1e-12)
        assert row["union_density"] == pytest.approx(float((a != 0).any(dim=1).double().mean()), abs=1e-12)
    assert penalty, "no site depends on a trainable parameter"
    expected = 2.0 * sum(stack_weight[k] * penalty[k] / elements[k] for k in penalty)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
