"""Decoder padding of encoder-decoder models that build their decoder inputs themselves: the
decoder's real positions are those of the inputs the model derives, found here by calling
transformers' own derivation (``shift_tokens_right``) and plain forward hooks."""

import pytest
import torch
import transformers as T
from transformers.models.bart.modeling_bart import shift_tokens_right

from conftest import FAMILIES, make_inputs, make_model
from deft.core.approx import make_approx
from deft.core.capture import ActivationCapture
from deft.core.loss import DensityLossConfig, combine_terms
from deft.core.masks import TokenMasks
from deft.core.metrics import DensityMeter
from deft.core.sites import find_sites

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

TAU, EPS = 0.05, 1e-2


def _real_decoder_positions(model, inputs):
    """(B, T) bool: decoder positions whose input token (BART shifts input_ids right behind the
    start token) is not padding."""
    config = model.config
    decoder_ids = shift_tokens_right(inputs["input_ids"], config.pad_token_id, config.decoder_start_token_id)
    return decoder_ids != config.pad_token_id


def _run(model, inputs):
    sites = find_sites(model)
    recorded, modules = {}, dict(model.named_modules())
    hooks = [modules[s.module].register_forward_hook(lambda m, x, y, i=i: recorded.__setitem__(i, y))
             for i, s in enumerate(sites)]
    meter = DensityMeter(sites.sites, threshold=TAU)
    with ActivationCapture(model, sites, approx=make_approx("l0", eps=EPS), meter=meter) as cap:
        model(**inputs)
        terms = cap.pop_terms()
    for h in hooks:
        h.remove()
    return sites, recorded, meter.result(), terms


@pytest.mark.parametrize("pad", [3, 5])
def test_bart_classifier_decoder_padding_not_counted(pad):
    """BartForSequenceClassification gets no decoder mask: it shifts input_ids into its decoder
    inputs. Only their real positions count (was: every position, 14 decoder tokens for 12 real)."""
    model, inputs = make_model("bart"), make_inputs("bart", batch=2, length=7, pad=pad)
    model.train()  # dropout is off in the tiny config; gradients on for the loss terms
    sites, recorded, report, terms = _run(model, inputs)
    masks = {"encoder": inputs["attention_mask"].bool(), "decoder": _real_decoder_positions(model, inputs)}
    assert int(masks["decoder"].sum()) == int(masks["encoder"].sum()) + 1  # the start token, one pad shifted out
    assert report.to_dict()["tokens"] == {s: int(m.sum()) for s, m in masks.items()}
    penalty, elements = {}, {}
    for i, site in enumerate(sites):
        a = recorded[i].detach().double()[masks[site.stack]]  # (real positions, width)
        row = report.per_layer[i]
        assert row["density_threshold"] == pytest.approx(float((a.abs() > TAU).double().mean()), abs=1e-12)
        penalty[site.stack] = penalty.get(site.stack, 0.0) + float((a * a / (a * a + EPS)).sum())
        elements[site.stack] = elements.get(site.stack, 0) + a.numel()
    assert {s: sum(n for _, n in t) for s, t in terms.items()} == elements
    loss = combine_terms(terms, DensityLossConfig(approx="l0", eps=EPS))
    assert loss.item() == pytest.approx(sum(penalty[s] / elements[s] for s in penalty), rel=1e-6)


def test_classifier_labels_are_classes_not_decoder_tokens():
    """A (B, labels) multi-label target is no decoder sequence (was: read as the decoder mask)."""
    config = FAMILIES["bart"][0]()
    config.problem_type = "multi_label_classification"
    torch.manual_seed(0)
    model = T.BartForSequenceClassification(config).eval()
    inputs = make_inputs("bart", batch=2, length=7, pad=3)
    inputs["labels"] = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    _, _, report, _ = _run(model, inputs)
    assert report.to_dict()["tokens"]["decoder"] == int(_real_decoder_positions(model, inputs).sum())
    masks = TokenMasks.from_batch(model, inputs)  # the energy model's and pruning's masks
    assert torch.equal(masks.decoder, _real_decoder_positions(model, inputs))


def test_generation_model_without_labels_shifts_input_ids_and_with_labels_reads_them():
    """BartForConditionalGeneration derives its decoder inputs from labels when given, else from
    input_ids, like the classifier."""
    torch.manual_seed(0)
    model = T.BartForConditionalGeneration(FAMILIES["bart"][0]()).eval()
    inputs = make_inputs("bart", batch=2, length=7, pad=3)
    _, _, report, _ = _run(model, inputs)
    assert report.to_dict()["tokens"]["decoder"] == int(_real_decoder_positions(model, inputs).sum())
    labels = torch.tensor([[5, 6, 7, 8], [5, 6, -100, -100]])
    _, _, report, _ = _run(model, {**inputs, "labels": labels})
    assert report.to_dict()["tokens"]["decoder"] == 6
