"""The energy estimator's counts pinned against the original per-call implementation.

``deft energy`` used to re-count every weight matrix's non-zeros on every call (≈0.1–0.2 s per
MiniLM input); the estimator now counts what does not depend on the input once. The values in
``energy_pinned.json`` were computed by the original implementation (deft.analysis.energy as of
commit 6b388ff, which counted everything per call) on the fixed models and inputs below — tiny
models of several families from conftest, peft methods on them, padded batches, two zero tests
and two batches of the same shape with different data (a shape-keyed cache must not reuse
data-dependent counts). Every per-layer count must match exactly.

Regenerate only from a reference implementation, never from the code under test:
``python tests/test_energy_pinned.py --write`` with the original estimator checked out.

QLoRA's 4-bit weights are dequantised by bitsandbytes' CPU kernels, which give other values on
other CPUs (the weights above the zero test differ: 13 of q_proj's 1,024 on one machine, none on
another), so its counts are pinned per weight fingerprint (``variants``: fingerprint → counts, each
computed by the original implementation on a machine whose bitsandbytes gives those weights);
a machine whose fingerprint is not listed is compared against the first recording.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from deft.analysis.energy import EnergyConfig, estimate_energy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build, make_inputs, make_model, saved_base  # noqa: E402

PINNED = Path(__file__).with_name("energy_pinned.json")
FIELDS = ("params", "params_nz", "inputs", "inputs_nz", "outputs", "outputs_nz", "macs", "macs_nz", "ops", "ops_nz")
THRESHOLD = 0.05  # a zero test that finds zeros in random weights and GELU/SiLU activations

# case id -> (family, method or None, zero thresholds measured)
CASES = {
    "bert": ("bert", None, (None, THRESHOLD)),
    "distilbert": ("distilbert", None, (THRESHOLD,)),
    "t5-gated": ("t5-gated", None, (THRESHOLD,)),
    "t5": ("t5", None, (None,)),  # ReLU: exact zeros
    "gpt2": ("gpt2", None, (None, THRESHOLD)),
    "opt": ("opt", None, (None, THRESHOLD)),
    "mistral": ("mistral", None, (THRESHOLD,)),  # grouped-query attention
    "gemma3": ("gemma3", None, (THRESHOLD,)),
    "vit": ("vit", None, (THRESHOLD,)),
    "bert-lora": ("bert", "lora", (THRESHOLD,)),
    "bert-adapter": ("bert", "adapter", (None, THRESHOLD)),
    "gpt2-prefix": ("gpt2", "prefix", (THRESHOLD,)),
    "llama-prompt": ("llama", "prompt", (THRESHOLD,)),
    "llama-qlora": ("llama", "qlora", (THRESHOLD,)),
}


def _model(family: str, method: str | None):
    if method is None:
        return make_model(family)
    if method == "qlora":
        # QLoRA loads its base from conftest's saved_base, which builds (and seeds) the base model
        # only the first time in a session: make the global RNG the same whether or not an earlier
        # test already built it (the pinned values are those of a first build).
        saved_base(family)
        make_model(family)
    return build(family, method, trained=True)[0]


def _batches(family: str) -> list[dict]:
    # Two batches of one shape (different data, right padding), then a batch of another shape.
    return [make_inputs(family, batch=2, length=6, pad=2, seed=0),
            make_inputs(family, batch=2, length=6, pad=2, seed=2),
            make_inputs(family, batch=1, length=5, seed=1)]


def weight_fingerprint(model) -> str | None:
    """A hash of the model's 4-bit weights as bitsandbytes dequantises them here (None: none)."""
    digest, found = hashlib.sha256(), False
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            import bitsandbytes.functional as bnbf

            found = True
            digest.update(name.encode())
            digest.update(bnbf.dequantize_4bit(weight.data, weight.quant_state).float().numpy().tobytes())
    return digest.hexdigest()[:16] if found else None


def measure(case: str, threshold: float | None) -> dict:
    family, method, _ = CASES[case]
    config = EnergyConfig() if threshold is None else EnergyConfig(zero_threshold=threshold)
    torch.manual_seed(0)
    model = _model(family, method)
    report = estimate_energy(model, _batches(family), config)
    return {"rows": {f"{r['name']}|{r['kind']}|{r['calls']}": [r[f"n_{f}"] for f in FIELDS] for r in report.per_layer},
            "batch_ratios": report.batch_ratios, "tokens": report.tokens, "skipped": report.skipped,
            "fingerprint": weight_fingerprint(model)}


def _params():
    return [pytest.param(case, t, id=f"{case}-{'exact' if t is None else t}")
            for case, (_, _, thresholds) in CASES.items() for t in thresholds]


def _key(threshold: float | None) -> str:
    return "exact" if threshold is None else str(threshold)


@pytest.mark.parametrize(("case", "threshold"), _params())
def test_counts_match_the_original_per_call_implementation(case, threshold, one_thread):
    if CASES[case][1] == "qlora":
        pytest.importorskip("bitsandbytes")
    expected = json.loads(PINNED.read_text())[case][_key(threshold)]
    got = measure(case, threshold)
    expected = expected.get("variants", {}).get(got["fingerprint"], expected)
    assert list(got["rows"]) == list(expected["rows"])  # same modules, kinds and calls, same order
    for name, counts in expected["rows"].items():
        assert got["rows"][name] == counts, name
    assert got["tokens"] == expected["tokens"] and got["skipped"] == expected["skipped"]
    assert got["batch_ratios"] == pytest.approx(expected["batch_ratios"], rel=1e-12)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    torch.set_num_threads(1)
    PINNED.write_text(json.dumps({case: {_key(t): measure(case, t) for t in thresholds}
                                  for case, (_, _, thresholds) in CASES.items()}, separators=(",", ":")) + "\n")
    print(f"wrote {PINNED}")
