"""A module that serves several layers (ALBERT shares one MLP across all of them) is measured as
one layer per call: the loss sums every call and the density meter reports one row per call —
while gradient checkpointing's recomputation in backward still counts nothing. Each number is
compared with plain forward hooks recording every call of the shared modules."""

from functools import partial

import json

import pytest
import torch
import transformers as T
from torch.utils.checkpoint import checkpoint

from deft.core.approx import make_approx
from deft.core.capture import ActivationCapture
from deft.core.loss import DensityLossConfig, combine_terms
from deft.core.metrics import DensityMeter
from deft.core.sites import find_sites

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

EPS, TAU = 1e-2, 0.05


def _albert(layers=3, groups=1, seed=0):
    torch.manual_seed(seed)
    return T.AlbertForSequenceClassification(T.AlbertConfig(
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=layers, num_hidden_groups=groups,
        num_attention_heads=2, intermediate_size=64, pad_token_id=0,
        initializer_range=0.3)).eval()  # wide enough init that the layers' activations differ


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, 4:], mask[1, 4:] = 0, 0  # 3 padding positions
    return {"input_ids": ids, "attention_mask": mask}


def _record_calls(model, sites):
    """Every call of every site module, in forward order: [(module path, activation)]."""
    calls, modules = [], dict(model.named_modules())
    hooks = [modules[path].register_forward_hook(lambda m, x, y, p=path: calls.append((p, y)))
             for path in dict.fromkeys(s.module for s in sites)]
    return calls, hooks


def test_albert_shared_mlp_counts_every_layer():
    """3 layers sharing one MLP: 3 × real tokens × width elements in the loss and 3 meter rows
    (was: 1 of 3, 1,792 of 5,376 elements on a real batch, one per-layer row)."""
    model, inputs = _albert(), _inputs()
    sites = find_sites(model)
    calls, hooks = _record_calls(model, sites)
    meter = DensityMeter(sites.sites, threshold=TAU)
    model.train()  # dropout is 0 in this config; gradients on, as in training
    with ActivationCapture(model, sites, approx=make_approx("l0", eps=EPS), meter=meter) as cap:
        model(**inputs)
        terms = cap.pop_terms()
    for h in hooks:
        h.remove()
    real = inputs["attention_mask"].bool()
    n_real, width = int(real.sum()), sites.sites[0].width
    assert len(calls) == 3 and width == 64
    assert sum(n for _, n in terms["encoder"]) == 3 * n_real * width
    loss = combine_terms(terms, DensityLossConfig(approx="l0", eps=EPS))
    acts = [a.detach().double()[real] for _, a in calls]  # (real tokens, width) per call
    by_hand = sum(float((a * a / (a * a + EPS)).sum()) for a in acts) / (3 * n_real * width)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    rows = meter.result().per_layer
    assert [(r["stack"], r["layer"], r["width"], r["tokens"]) for r in rows] == \
        [("encoder", k, width, n_real) for k in range(3)]
    for row, a in zip(rows, acts):
        assert row["density"] == pytest.approx(float((a != 0).double().mean()), abs=1e-12)
        assert row["density_threshold"] == pytest.approx(float((a.abs() > TAU).double().mean()), abs=1e-12)
    assert len({r["density_threshold"] for r in rows}) == 3  # three different layers, not one call repeated


def test_albert_layer_groups_numbered_in_forward_order():
    """4 layers in 2 groups (layers 0-1 run group 0's MLP, 2-3 group 1's): rows 0..3, each with the
    module that ran at that layer and that call's tokens."""
    model, inputs = _albert(layers=4, groups=2), _inputs()
    sites = find_sites(model)
    calls, hooks = _record_calls(model, sites)
    meter = DensityMeter(sites.sites, threshold=TAU)
    with torch.no_grad(), ActivationCapture(model, sites, meter=meter) as cap:
        model(**inputs)
    for h in hooks:
        h.remove()
    rows = meter.result().per_layer
    assert [(r["layer"], r["site"]) for r in rows] == [(k, path) for k, (path, _) in enumerate(calls)]
    assert [path for path, _ in calls][1] != [path for path, _ in calls][2]  # the groups' modules differ
    real = inputs["attention_mask"].bool()
    for row, (_, a) in zip(rows, calls):
        assert row["density_threshold"] == pytest.approx(float((a[real].abs() > TAU).double().mean()), abs=1e-12)
    assert sum(cap.calls.values()) == 4


def _checkpointed(model, reentrant):
    """ALBERT's layer groups under torch.utils.checkpoint (transformers does not offer it for ALBERT)."""
    def wrap(forward, *args, **kwargs):  # keyword arguments bound outside: reentrant takes none
        return checkpoint(lambda *xs: forward(*xs, **kwargs), *args, use_reentrant=reentrant)

    for group in model.albert.encoder.albert_layer_groups:
        group.forward = partial(wrap, group.forward)
    return model


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_mlp_under_gradient_checkpointing_counts_each_layer_once(reentrant):
    """Recomputation in backward re-runs the shared module once per layer: ignored, while the 3
    calls of the forward count (a signal "fired before in this model call" cannot tell the two)."""
    model, inputs = _checkpointed(_albert(), reentrant), _inputs()
    model.train()
    sites = find_sites(model)
    meter = DensityMeter(sites.sites)
    n_real, width = int(inputs["attention_mask"].sum()), sites.sites[0].width
    with ActivationCapture(model, sites, approx=make_approx("l0"), meter=meter) as cap:
        out = model(**inputs)
        terms = cap.pop_terms()
        loss = out.logits.float().mean()
        if not reentrant:  # a reentrant checkpoint runs its forward without gradients: no loss terms
            assert sum(n for _, n in terms["encoder"]) == 3 * n_real * width
            loss = loss + combine_terms(terms, DensityLossConfig())
        loss.backward()
    assert dict(cap.calls) == {0: 3} and dict(cap.recomputed) == {0: 3}
    assert [r["tokens"] for r in meter.result().per_layer] == [n_real] * 3


@pytest.mark.parametrize("layers,groups,want", [(3, 1, ["0-2"]), (4, 2, ["0-1", "2-3"])])
def test_inspect_says_which_layers_a_shared_module_serves(layers, groups, want, tmp_path, capsys):
    # The layers each ALBERT group serves, from its config: group g runs layers_per_group times.
    import transformers as T

    from deft.cli import main

    config = T.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=layers,
                            num_hidden_groups=groups, num_attention_heads=2, intermediate_size=64)
    T.AlbertModel(config).save_pretrained(tmp_path / "albert")
    assert main(["inspect", "--model", str(tmp_path / "albert"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [s["calls_per_forward"] for s in payload["sites"]] == [layers // groups] * groups
    assert main(["inspect", "--model", str(tmp_path / "albert")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "albert_layer_groups" in line]
    assert [line.split()[1] for line in rows] == want
    assert "shared weights" in out
