"""Shared test fixtures: tiny random-init models, one per supported family, built from config
objects (no downloads); the family × method matrix the capture, loss, ADA, export and prune tests
run over; the GLUE data directory.

The matrix follows peft's test suite (``ALL_CONFIGS × MODELS_TO_TEST`` driven by
``testing_common.py``): :data:`FAMILIES` × :data:`METHODS`, less the pairs :data:`UNSUPPORTED`
names with the reason, is :data:`MATRIX`; :func:`build` gives a pair's model with the method
applied, :func:`matrix_params` its pytest parameters (ids ``"bert-lora"``). Operations that refuse
a method altogether are listed once in :data:`REFUSED`; tests over the matrix assert that refusal
for those pairs instead of leaving them out silently.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers as T

# Without a CUDA device the Triton kernels run in Triton's CPU interpreter (test_triton_mlp.py);
# Triton reads this when it is imported, so it is set before anything can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# -- data ------------------------------------------------------------------------------------
# The data root (it holds glue/ and squad/): $DEFT_DATA_DIR when set, else the checkout's sibling
# ../shared/data. When the variable is set the caller says the data is there (CI does), so tests
# that need it fail if it is missing; without it they skip.
DATA_DIR_ENV = "DEFT_DATA_DIR"
_ENV_DATA_DIR = os.environ.get(DATA_DIR_ENV) or None  # read once: some tests unset it for the code under test
SHARED_DATA_FROM_ENV = _ENV_DATA_DIR is not None
SHARED_DATA = (Path(_ENV_DATA_DIR).expanduser().resolve() if SHARED_DATA_FROM_ENV
               else Path(__file__).resolve().parents[2] / "shared" / "data")

# family -> (config factory, model class for a task head, kind)
FAMILIES = {
    "bert": (lambda: T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64), T.BertForSequenceClassification, "encoder"),
    "roberta": (lambda: T.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, pad_token_id=1), T.RobertaForSequenceClassification,
                "encoder"),
    "distilbert": (lambda: T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
                   T.DistilBertForSequenceClassification, "encoder"),
    "t5": (lambda: T.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                              decoder_start_token_id=0, pad_token_id=0), T.T5ForConditionalGeneration, "seq2seq"),
    "t5-gated": (lambda: T.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                    feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0),
                 T.T5ForConditionalGeneration, "seq2seq"),
    "gpt2": (lambda: T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0), T.GPT2LMHeadModel, "decoder"),
    "opt": (lambda: T.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0), T.OPTForCausalLM, "decoder"),
    "llama": (lambda: T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=64, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0), T.LlamaForCausalLM, "decoder"),
    "mistral": (lambda: T.MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0), T.MistralForCausalLM, "decoder"),
    "qwen2": (lambda: T.Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=64, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0), T.Qwen2ForCausalLM, "decoder"),
    "gemma3": (lambda: T.Gemma3TextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=64, head_dim=16, bos_token_id=1,
                                          eos_token_id=2, pad_token_id=0), T.Gemma3ForCausalLM, "decoder"),
    # ALBERT: one MLP module shared by every layer (each call is a layer of its own).
    "albert": (lambda: T.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, pad_token_id=0),
               T.AlbertForSequenceClassification, "encoder"),
    # An encoder-decoder classifier: it builds its decoder inputs by shifting input_ids, and
    # classifies from the decoder state at the (one per sequence) </s> token.
    "bart": (lambda: T.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2),
             T.BartForSequenceClassification, "encdec-cls"),
    "vit": (lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=16, patch_size=8, num_labels=3), T.ViTForImageClassification, "vision"),
    # Mixture of experts: 4 routed experts (3-D weights), 2 per token; Qwen2-MoE adds a shared
    # expert every token goes through (its own width, 48).
    "mixtral": (lambda: T.MixtralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, num_local_experts=4,
                                        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                T.MixtralForCausalLM, "decoder"),
    "qwen2-moe": (lambda: T.Qwen2MoeConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, intermediate_size=64, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0),
                  T.Qwen2MoeForCausalLM, "decoder"),
    # Fused gate/up projections: one dense layer, chunk(2).
    "phi3": (lambda: T.Phi3Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0), T.Phi3ForCausalLM, "decoder"),
    "modernbert": (lambda: T.ModernBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
                   T.ModernBertForSequenceClassification, "encoder"),
    # BLOOM's activation is a model-file class (BloomGelu); Swin's stages restart their block numbers.
    "bloom": (lambda: T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0), T.BloomForCausalLM, "decoder"),
    "swin": (lambda: T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=2, mlp_ratio=4.0, num_labels=3), T.SwinForImageClassification, "vision"),
}
TEXT_FAMILIES = [f for f, (_, _, kind) in FAMILIES.items() if kind != "vision"]
N_LAYERS = 2


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    config_fn, cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config_fn())
    model.eval()
    return model


def family_kind(family: str) -> str:
    return FAMILIES[family][2]


def make_inputs(family: str, batch: int = 2, length: int = 6, pad: int = 0, seed: int = 0) -> dict:
    """Inputs for ``family``; the last sequence gets ``pad`` right-padding positions (masked out)."""
    g = torch.Generator().manual_seed(seed)
    kind = family_kind(family)
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        ids[-1, -pad:] = 0
        mask[-1, -pad:] = 0
    if kind == "encdec-cls":  # BART's head reads the decoder at </s>: one per sequence, its last real token
        ids[torch.arange(batch), mask.sum(1) - 1] = FAMILIES[family][0]().eos_token_id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        labels = torch.randint(3, 100, (batch, 4), generator=g)
        inputs["labels"] = labels
    return inputs


# -- the family × method matrix ---------------------------------------------------------------
# method -> options for deft.methods (get_method(name).apply(model, options, task_type)), sized for
# the width-32 models above: LoRA of rank 2 also on the MLP's first dense layer (what the density
# loss acts on, and what block skipping / pruning must handle); no dropout, so train-mode passes
# are deterministic. At hidden width 32 the paper's adapter reduction factor 16 leaves 2 ReLU
# units, which may all be off where a gradient arrives; 4 leaves 8. Three virtual tokens keep
# prefix / prompt passes small.
METHODS = {
    "lora": {"r": 2, "include_mlp": True, "lora_dropout": 0.0},
    "qlora": {"r": 2, "include_mlp": True, "lora_dropout": 0.0},
    "adapter": {"reduction_factor": 4},
    "prefix": {"num_virtual_tokens": 3},
    "prompt": {"num_virtual_tokens": 3},
}
# The task type each kind of model is trained with (vision: no peft task wrapper).
TASK_TYPES = {"encoder": "SEQ_CLS", "encdec-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "decoder": "CAUSAL_LM",
              "vision": None}
# The stacks of each kind of model (an encoder-decoder classifier has both).
KIND_STACKS = {"seq2seq": ("encoder", "decoder"), "encdec-cls": ("encoder", "decoder"), "decoder": ("decoder",),
               "encoder": ("encoder",), "vision": ("encoder",)}

# (family or kind, method) -> why the pair is not in the matrix: deft.methods refuses it
# (UnsupportedCombinationError; test_methods.py checks every entry really is refused).
# QLoRA is in: with bitsandbytes' CPU repack switched off (deft.methods.qlora) the 4-bit layers
# take any width, so it runs on every family here; its base is saved and reloaded in 4 bits.
UNSUPPORTED = {
    ("vision", "prefix"): "virtual tokens need a text model taking input_ids (ViT takes pixel_values)",
    ("vision", "prompt"): "virtual tokens need a text model taking input_ids (ViT takes pixel_values)",
    ("distilbert", "prefix"): "DistilBERT's forward takes no past_key_values to carry the prefix",
    ("albert", "prefix"): "ALBERT's forward takes no past_key_values to carry the prefix",
    ("encdec-cls", "prefix"): "peft's virtual tokens on an encoder-decoder model work only for SEQ_2_SEQ_LM",
    ("encdec-cls", "prompt"): "peft's virtual tokens on an encoder-decoder model work only for SEQ_2_SEQ_LM",
    ("modernbert", "prefix"): "ModernBERT's forward takes no past_key_values to carry the prefix",
    ("mixtral", "adapter"): "bottleneck adapters wrap the down projection; routed experts have none (3-D weights)",
    ("qwen2-moe", "adapter"): "bottleneck adapters wrap the down projection; routed experts have none (3-D weights)",
}

# operation -> method -> why that operation refuses the method on every family. Tests of the
# operation run over the whole matrix and assert the refusal for these methods.
REFUSED = {
    "export": {"qlora": "merging LoRA into NF4 weights re-quantises them: QLoRA export is refused"},
    "prune": {"qlora": "4-bit weights are no plain float matrix: prune before quantising"},
}
# Mixture-of-experts families: one site per layer over the routed experts' (token, expert) pairs
# (plus Qwen2-MoE's shared expert: SITES_PER_LAYER). Their 3-D expert weights are no dense
# layers, so these operations refuse them in one line (tests assert the refusal):
ROUTED_FAMILIES = ("mixtral", "qwen2-moe")
ROUTED_REFUSED = {
    "product": "the routed experts' gated product is computed inside the experts module: no input to hook",
    "skip": "skipping a block replaces its dense layers; routed experts have none",
    "prune": "WANDA scores dense layers; routed experts hold 3-D weights",
}
SITES_PER_LAYER = {"qwen2-moe": 2}  # routed experts and the shared expert

# One family per kind, for per-pair tests too slow to run over every family (export round trips):
# BERT (encoder), gated T5 (encoder-decoder, gated MLP), GPT-2 (decoder, Conv1D weights),
# Llama (decoder, gated MLP) and ViT (vision).
REPRESENTATIVES = ("bert", "t5-gated", "gpt2", "llama", "vit")


def unsupported(family: str, method: str) -> str | None:
    """Why (family, method) is not in the matrix, or None."""
    return UNSUPPORTED.get((family, method)) or UNSUPPORTED.get((family_kind(family), method))


MATRIX = [(f, m) for f in FAMILIES for m in METHODS if unsupported(f, m) is None]


def matrix_params(families=None, methods=None) -> list:
    """``pytest.param(family, method, id="family-method")`` for the matrix pairs (optionally only
    these families / methods), for ``@pytest.mark.parametrize(("family", "method"), ...)``."""
    unknown = (set(families or ()) - set(FAMILIES)) | (set(methods or ()) - set(METHODS))
    assert not unknown, f"not in the matrix: {sorted(unknown)}"
    return [pytest.param(f, m, id=f"{f}-{m}") for f, m in MATRIX
            if (families is None or f in families) and (methods is None or m in methods)]


def task_type_of(family: str) -> str | None:
    return TASK_TYPES[family_kind(family)]


_saved_bases: list[Path] = []  # the session's directory of saved bases, once made


def saved_base(family: str, seed: int = 0) -> str:
    """``make_model(family, seed)`` saved once per session (QLoRA's 4-bit ``load_base`` reads a directory)."""
    if not _saved_bases:
        _saved_bases.append(Path(tempfile.mkdtemp(prefix="deft-test-bases-")))
        atexit.register(shutil.rmtree, _saved_bases[0], True)
    path = _saved_bases[0] / f"{family}-{seed}"
    if not path.is_dir():
        make_model(family, seed).save_pretrained(path)
    return str(path)


def perturb(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give the modules that start as the identity (LoRA's B, the adapters' up projections) random
    values, as after training: otherwise they would not change the model's function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "adapter_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def build(family: str, method: str, seed: int = 0, options: dict | None = None,
          trained: bool = False) -> tuple[torch.nn.Module, str | None]:
    """``(model, task_type)``: the family's tiny model with ``method`` applied (options:
    :data:`METHODS`, updated by ``options``), in eval mode; ``trained``: :func:`perturb` it."""
    from deft.methods import get_method

    reason = unsupported(family, method)
    if reason is not None:
        raise ValueError(f"{family}-{method} is not in the matrix: {reason}")
    task_type = task_type_of(family)
    config = {**METHODS[method], **(options or {})}
    impl = get_method(method)
    if method == "qlora":
        base = impl.load_base(saved_base(family, seed), FAMILIES[family][1], config)
    else:
        base = make_model(family, seed)
    model = impl.apply(base, config, task_type=task_type)
    if trained:
        perturb(model, seed=seed)
    model.eval()
    return model, task_type


def labels_for(family: str, inputs: dict) -> dict:
    """``inputs`` with labels for the family's task loss (sequence class, next token, or as given)."""
    kind = family_kind(family)
    if kind == "seq2seq":
        return dict(inputs)
    batch = next(iter(inputs.values())).shape[0]
    if kind == "decoder":
        return {**inputs, "labels": inputs["input_ids"].clone()}
    return {**inputs, "labels": torch.arange(batch) % 2}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT with MiniLM's vocabulary (so its tokenizer fits) and widths bitsandbytes' CPU kernel takes."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
                add_pooling_layer=True).save_pretrained(path)
    return str(path)


@pytest.fixture
def shared_data() -> Path:
    """The data root, if it holds ``glue/``; else skip — or fail when $DEFT_DATA_DIR named it."""
    return require_shared_data()


def tiny_run_config(root: Path, **overrides):
    """A TrainConfig for a two-step SST-2 run of a tiny BERT (hidden 32, MiniLM's vocabulary) saved
    under ``root/tiny``: the trained run that command-level tests start from."""
    from deft.training import TrainConfig

    data = require_shared_data()
    if not (root / "tiny").is_dir():
        torch.manual_seed(0)
        T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                    add_pooling_layer=True).save_pretrained(root / "tiny")
    base = dict(model=str(root / "tiny"), tokenizer="minilm", task="sst2", max_train_samples=32,
                max_eval_samples=16, batch_size=8, eval_batch_size=8, max_steps=2, max_length=24,
                data_dir=str(data))
    return TrainConfig(**{**base, **overrides})


def require_shared_data() -> Path:
    """:func:`shared_data` for module-scoped fixtures (which cannot take a function-scoped one)."""
    if not (SHARED_DATA / "glue").is_dir():
        if SHARED_DATA_FROM_ENV:
            pytest.fail(f"${DATA_DIR_ENV}={_ENV_DATA_DIR!r} has no glue/ directory (looked for "
                        f"{SHARED_DATA / 'glue'})", pytrace=False)
        pytest.skip(f"shared GLUE data not found at {SHARED_DATA} (set ${DATA_DIR_ENV} to the data root)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: tiny models run several times faster on one
    thread than on two contended ones (this machine has 2 cores, shared with other runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub: fail fast instead of hanging on a network timeout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
