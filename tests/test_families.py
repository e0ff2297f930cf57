"""Model families beyond one dense layer per MLP role (issue 14): mixture-of-experts layers
measured per routed expert, fused gate/up projections, activation modules found by a broader
rule (BLOOM), decoder-only stacks on the generic rule, unique layer numbers (Swin) — and
what deft refuses for them, in one line. Expected numbers are computed by hand from the
weights, never by the code under test."""

import json

import pytest
import torch
import transformers as T

from conftest import FAMILIES, make_inputs, make_model
from deft.adaptive import AdaptiveError, apply_adaptive, skip_sites
from deft.analysis.energy import estimate_energy
from deft.analysis.prune import PruneConfig, wanda_prune
from deft.cli import main
from deft.core.approx import make_approx
from deft.core.capture import ActivationCapture
from deft.core.experts import RoutingError
from deft.core.loss import DensityLossConfig, combine_terms
from deft.core.metrics import DensityMeter
from deft.core.neurons import remove_neurons
from deft.core.sites import SiteMap, UnsupportedModelError, find_sites
from deft.deploy.sparse_mlp import sparsify_mlps
from deft.methods import UnsupportedCombinationError, get_method
from deft.methods.lora import default_attention_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _qwen3_moe():
    return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=16,
        pad_token_id=0))


def _moe(family, implementation, seed=0):
    torch.manual_seed(seed)
    model = _qwen3_moe().eval() if family == "qwen3-moe" else make_model(family, seed)
    model.set_experts_implementation(implementation)
    with torch.no_grad():  # larger weights than the init, and ReLU: exact zeros to count
        for p in model.parameters():
            p.normal_(0, 0.3)
    for layer in model.model.layers:
        layer.mlp.experts.act_fn = torch.nn.ReLU()
    return model


# -- mixture of experts --------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_routed_experts_measured_over_the_tokens_routed_to_them(family, implementation):
    """Per layer and per expert, density over the (real token, expert) pairs the router chose,
    against a by-hand pass: the router's top-2 of the MoE block's input, σ(x W_gate[e]ᵀ) token by
    token. Padding is routed too but must not count (was: Mixtral had no site at all; Qwen2-MoE
    reported its shared expert only)."""
    model = _moe(family, implementation)
    inputs = make_inputs("mixtral", batch=2, length=7, pad=3)
    sites = find_sites(model)
    routed = [s for s in sites if s.routed]
    assert len(routed) == 2 and all(s.experts == 4 for s in routed)
    meter = DensityMeter(sites.sites, threshold=0.5)
    with ActivationCapture(model, sites, meter=meter):
        model(**inputs)
    rows = meter.result().per_layer
    eps = 0.1  # the loss terms of the routed sites alone
    only_routed = SiteMap(tuple(routed), sites.family, sites.model_type, sites.point)
    with ActivationCapture(model, only_routed, approx=make_approx("l0", eps=eps)) as cap:
        model(**inputs)
        terms = cap.pop_terms()["decoder"]

    blocks = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, x, i=i: blocks.__setitem__(i, x[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    real = inputs["attention_mask"].reshape(-1).bool()
    assert int(real.sum()) == 11
    penalty, elements = 0.0, 0
    for layer_index, layer in enumerate(model.model.layers):
        x = blocks[layer_index].reshape(-1, 32).double()
        top = (x @ layer.mlp.gate.weight.double().t()).softmax(-1).topk(2, dim=-1).indices
        gate = layer.mlp.experts.gate_up_proj.detach().double()[:, :64]  # (E, w, h): the gate half
        nonzero, above, count = [0] * 4, 0, [0] * 4
        active = torch.zeros(2, 4, 64, dtype=torch.bool)  # union: per sequence and expert
        for t in range(x.shape[0]):
            if not real[t]:
                continue
            for e in top[t].tolist():
                a = torch.relu(gate[e] @ x[t])
                nonzero[e] += int((a != 0).sum())
                above += int((a > 0.5).sum())
                count[e] += 1
                active[t // 7, e] |= a != 0
                penalty += float((a * a / (a * a + eps)).sum())
                elements += 64
        row = [r for r in rows if r["site"] == f"model.layers.{layer_index}.mlp.experts.act_fn"][0]
        assert row["tokens"] == 11 and row["experts"][0]["tokens"] + sum(e["tokens"] for e in row["experts"][1:]) == 22
        assert row["density"] == pytest.approx(sum(nonzero) / (22 * 64), abs=1e-12)
        assert row["density_threshold"] == pytest.approx(above / (22 * 64), abs=1e-12)
        assert [e["tokens"] for e in row["experts"]] == count
        assert [e["density"] for e in row["experts"]] == [pytest.approx(n / (c * 64)) if c else None
                                                          for n, c in zip(nonzero, count)]
        live = [(s, e) for s in range(2) for e in range(4)  # (sequence, expert) pairs with a routed real token
                if any(real[t] and e in top[t].tolist() for t in range(s * 7, s * 7 + 7))]
        assert row["union_density"] == pytest.approx(sum(int(active[s, e].sum()) for s, e in live) / (len(live) * 64))
    if family == "qwen2-moe":  # the shared expert is a site of its own, next to the routed ones
        assert [r["site"].rsplit(".", 2)[-2] for r in rows] == ["experts", "shared_expert"] * 2
    assert sum(float(t.detach()) for t, _ in terms) == pytest.approx(penalty, rel=1e-5)
    assert sum(n for _, n in terms) == elements


def test_routed_experts_loss_trains_and_counts_once_under_gradient_checkpointing():
    model = _moe("mixtral", "grouped_mm")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sites = find_sites(model)
    with ActivationCapture(model, sites, approx=make_approx("l0")) as cap:
        out = model(**make_inputs("mixtral"))
        loss = combine_terms(cap.pop_terms(), DensityLossConfig())
        (loss + out.logits.float().mean()).backward()
        assert dict(cap.calls) == {0: 1, 1: 1} and dict(cap.recomputed) == {0: 1, 1: 1}
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_routed_experts_refusals_are_one_line():
    model = make_model("mixtral")
    sites = find_sites(model)
    refusals = [
        (lambda: skip_sites(model, sites.sites[:1]), AdaptiveError),
        (lambda: get_method("adapter").apply(make_model("mixtral"), None, "CAUSAL_LM"), UnsupportedCombinationError),
        (lambda: wanda_prune(model, [make_inputs("mixtral")], PruneConfig(sparsity=0.5)), UnsupportedModelError),
        (lambda: remove_neurons(model, {sites.sites[0].module: torch.arange(3)}), UnsupportedModelError),
        (lambda: sparsify_mlps(model, 0.1), UnsupportedModelError),
        (lambda: estimate_energy(model, [make_inputs("mixtral")]), RoutingError),
        (lambda: ActivationCapture(model, sites, approx=DensityLossConfig(form="sequence").build_approx()).attach(),
         RoutingError),
    ]
    for action, error in refusals:
        with pytest.raises(error) as err:
            action()
        message = str(err.value)
        assert "\n" not in message and ("expert" in message or "mixture" in message), message


def test_unknown_mixture_of_experts_types_are_refused_not_half_measured():
    model = T.OlmoeForCausalLM(T.OlmoeConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                             num_experts=4, num_experts_per_tok=2, pad_token_id=0))
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts layers .* deft does not know"):
        find_sites(model)

    class Expert(torch.nn.Module):  # experts as a list of MLPs: each would be "measured" on its own tokens
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([Expert() for _ in range(3)])

    class ListMoe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PretrainedConfig()
            self.layers = torch.nn.ModuleList([Layer() for _ in range(2)])

    with pytest.raises(UnsupportedModelError, match="layers.0.experts.0"):
        find_sites(ListMoe())


def test_unknown_experts_implementation_is_refused():
    model = _moe("mixtral", "eager")
    model.config._experts_implementation = "sonicmoe"  # another row order: refused, not guessed
    with pytest.raises(RoutingError, match="sonicmoe"):
        ActivationCapture(model, meter=DensityMeter(find_sites(model).sites)).attach()


# -- fused gate/up ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["phi3", "modernbert"])
def test_fused_halves_neuron_removal_equals_zeroed_down_columns(family):
    """Removing neurons of a fused gate/up layer keeps rows j and width + j: the same function as
    the full model with the removed neurons' down-projection columns zeroed (computed by hand)."""
    model, inputs = make_model(family), make_inputs(family)
    site = find_sites(model).sites[0]
    keep = torch.tensor([0, 3, 5, 17, 40, 63])
    reference = make_model(family)
    down = reference.get_submodule(site.down)
    removed = torch.ones(site.width, dtype=torch.bool)
    removed[keep] = False
    with torch.no_grad():
        down.weight[:, removed] = 0
        expected = reference(**inputs).logits
    remove_neurons(model, {site.module: keep})
    assert model.get_submodule(site.first).weight.shape == (2 * len(keep), 32)
    assert find_sites(model).sites[0].width == len(keep)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedModelError, match="fused"):
        sparsify_mlps(make_model(family), 0.1)


@pytest.mark.parametrize("family", ["phi3", "modernbert"])
def test_fused_block_skipped_exactly(family):
    model, inputs = make_model(family), make_inputs(family, pad=2)
    handle = apply_adaptive(model, find_sites(model))
    site = handle.sites[0]
    handle.set_alphas({site.module: 0.0})
    with torch.no_grad():
        reference = model(**inputs).logits
    skip_sites(model, [site])
    assert model.get_submodule(site.first).out_features == 2 * site.width
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


# -- activation modules, stacks, layer numbers -----------------------------------------------------

def test_bloom_gelu_found_and_softmax_modules_are_not():
    sites = find_sites(make_model("bloom"))
    assert [(s.module, s.activation, s.width) for s in sites] == [
        (f"transformer.h.{i}.mlp.gelu_impl", "BloomGelu", 128) for i in range(2)]
    assert [s.down for s in sites] == [f"transformer.h.{i}.mlp.dense_4h_to_h" for i in range(2)]

    class ScaledSoftmax(torch.nn.Module):  # parameter-free, but attention's, not an MLP activation
        def forward(self, x):
            return x.softmax(-1)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 16), ScaledSoftmax(), torch.nn.Linear(16, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PretrainedConfig()
            self.layers = torch.nn.ModuleList([Block() for _ in range(2)])

    with pytest.raises(UnsupportedModelError):
        find_sites(Model())


@pytest.mark.parametrize("build", [
    lambda: T.GPTNeoXModel(T.GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64)),
    lambda: T.FalconForSequenceClassification(T.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=2, pad_token_id=0)),
    lambda: T.PhiModel(T.PhiConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64)),
    lambda: T.BloomModel(FAMILIES["bloom"][0]()),
], ids=["gpt-neox", "falcon", "phi", "bloom"])
def test_decoder_only_models_without_a_generating_head_are_decoder_stacks(build):
    """Loaded as a base model or a classifier these cannot generate; they were labelled "encoder",
    so --decoder-weight did nothing for them."""
    sites = find_sites(build())
    assert sites.family == "generic" and sites.stacks == ("decoder",) and [s.layer for s in sites] == [0, 1]


def test_encoders_stay_encoder_stacks():
    electra = T.ElectraModel(T.ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=48))
    assert find_sites(electra).stacks == ("encoder",)


def test_swin_layers_numbered_across_stages():
    sites = find_sites(make_model("swin"))
    assert [(s.layer, s.module.split(".")[3], s.width) for s in sites] == [(0, "0", 64), (1, "1", 128)]


# -- LoRA targets and inspect ----------------------------------------------------------------------

@pytest.mark.parametrize(("family", "targets"), [
    ("mixtral", ["q_proj", "v_proj"]), ("qwen2-moe", ["q_proj", "v_proj"]), ("phi3", ["qkv_proj"]),
    ("modernbert", ["Wqkv"]), ("bloom", ["query_key_value"]), ("swin", ["q_proj", "v_proj"])])
def test_default_lora_targets(family, targets):
    model = make_model(family)
    assert default_attention_targets(model) == targets
    names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) <= names


@pytest.mark.parametrize(("family", "header", "gated", "experts", "mlp"), [
    # MLP parameters by hand: Mixtral 4 experts × (2·64·32 + 32·64) per layer; Phi-3 2·64·32 + 32·64
    # (the down projection counted); BLOOM 32·128 + 128 + 128·32 + 32.
    ("mixtral", "mixture of experts: 4 routed experts per layer", "yes", "4", 2 * 4 * 3 * 64 * 32),
    ("phi3", "(gated MLP)", "yes", "-", 2 * 3 * 64 * 32),
    ("bloom", "family rule: generic", "no", "-", 2 * (2 * 32 * 128 + 128 + 32)),
])
def test_inspect_prints_stack_layer_width_gating_and_experts(family, header, gated, experts, mlp, tmp_path, capsys):
    make_model(family).save_pretrained(tmp_path / family)
    assert main(["inspect", "--model", str(tmp_path / family)]) == 0
    out = capsys.readouterr().out
    assert header in out
    rows = [line.split() for line in out.splitlines() if ".mlp." in line]
    assert [(r[0], r[1], r[4], r[5]) for r in rows] == [("decoder", str(i), gated, experts) for i in range(2)]
    assert all(r[3] == ("128" if family == "bloom" else "64") for r in rows)
    assert main(["inspect", "--model", str(tmp_path / family), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["mlp"] == mlp and info["experts"] == (4 if family == "mixtral" else 0)


def test_alpha_of_routed_experts_folds_into_every_expert():
    """ADA's α on the experts' σ: α·σ(g)·u through each expert's down weight = σ(g)·u through α·W_down."""
    from deft.deploy.export import fold_alphas

    model, inputs = make_model("mixtral"), make_inputs("mixtral", pad=2)
    handle = apply_adaptive(model, find_sites(model))
    handle.set_alphas({s.module: a for s, a in zip(handle.sites, (0.5, -1.5))})
    with torch.no_grad():
        reference = model(**inputs).logits
    down = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    assert fold_alphas(model) == {handle.sites[0].module: 0.5, handle.sites[1].module: -1.5}
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj.detach(), -1.5 * down)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
