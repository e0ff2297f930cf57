"""Tiny random-init models, one per supported family, built from config objects (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as T

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

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
    "vit": (lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=16, patch_size=8, num_labels=3), T.ViTForImageClassification, "vision"),
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
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        labels = torch.randint(3, 100, (batch, 4), generator=g)
        inputs["labels"] = labels
    return inputs


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
    if not (SHARED_DATA / "glue").is_dir():
        pytest.skip(f"shared GLUE data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub: fail fast instead of hanging on a network timeout.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
