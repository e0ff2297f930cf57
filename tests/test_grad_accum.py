"""Gradient accumulation must not scale λ·L_density, whatever the Trainer does with the task loss.

transformers' ``training_step`` divides the loss by the accumulation steps only when the loss is
not already normalised by ``num_items_in_batch`` (models that accept loss kwargs, given ``labels``:
causal LMs, and in transformers 5 sequence classifiers too; extractive QA has no ``labels``, so
the Trainer divides). The density term is a per-micro-batch mean either way, so its gradient
over one optimizer step must be the same for one batch of 4 and for two accumulated halves.
"""

import pytest
import torch
import transformers as T

from deft.core.loss import DensityLossConfig
from deft.core.sites import find_sites
from deft.methods import get_method
from deft.training import make_deft_trainer

BATCH, LENGTH = 4, 8
TASK_TYPES = {"causal": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "qa": "QUESTION_ANS"}


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "causal":
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    cls = T.BertForQuestionAnswering if kind == "qa" else T.BertForSequenceClassification
    return cls(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def examples(kind: str) -> list[dict]:
    # Equal lengths, no padding: each half holds exactly half the tokens, so the mean of the two
    # half-batch density terms is the full-batch term.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (BATCH, LENGTH), generator=g)
    rows = []
    for i in range(BATCH):
        row = {"input_ids": ids[i].tolist(), "attention_mask": [1] * LENGTH}
        if kind == "qa":
            row.update(start_positions=i, end_positions=i + 2)
        else:
            row["labels"] = ids[i].tolist() if kind == "causal" else i % 2
        rows.append(row)
    return rows


class GradRecorder(T.TrainerCallback):
    """The accumulated gradients of the one optimizer step (before the optimizer consumes them)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None}


def step_grads(kind: str, accumulation: int, density: DensityLossConfig | None, tmp_path,
               loss_counts_items: bool | None = None, teacher: torch.nn.Module | None = None) -> dict:
    model = get_method("lora").apply(tiny_model(kind), {"lora_dropout": 0.0, "include_mlp": True},
                                     task_type=TASK_TYPES[kind])
    recorder = GradRecorder()
    args = T.TrainingArguments(
        output_dir=str(tmp_path / f"{kind}-{accumulation}-{density is not None}-{loss_counts_items}-{teacher is None}"),
        per_device_train_batch_size=BATCH // accumulation, gradient_accumulation_steps=accumulation,
        max_steps=1, max_grad_norm=0.0, learning_rate=1e-3, seed=0, use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = make_deft_trainer(sites=find_sites(model), density=density, threshold=0.01, model=model, args=args,
                                train_dataset=examples(kind), data_collator=T.default_data_collator,
                                callbacks=[recorder], loss_counts_items=loss_counts_items, teacher=teacher,
                                distill_weight=0.5 if teacher is not None else None,
                                distill_temperature=2.0 if teacher is not None else None)
    trainer.train()
    trainer.capture.detach()
    assert recorder.grads
    return recorder.grads


def density_grads(kind: str, accumulation: int, tmp_path) -> dict:
    """Gradient of λ·L_density alone: the step's gradient with the term minus without it."""
    with_term = step_grads(kind, accumulation, DensityLossConfig(weight=1.0), tmp_path)
    without = step_grads(kind, accumulation, None, tmp_path)
    return {n: with_term[n] - without[n] for n in with_term}


@pytest.mark.parametrize("kind", list(TASK_TYPES))
def test_density_gradient_does_not_depend_on_accumulation_steps(kind, tmp_path):
    one = density_grads(kind, 1, tmp_path)
    two = density_grads(kind, 2, tmp_path)
    norm_one = torch.sqrt(sum((g.double() ** 2).sum() for g in one.values()))
    norm_two = torch.sqrt(sum((g.double() ** 2).sum() for g in two.values()))
    assert norm_one > 0  # the term reaches the LoRA weights
    ratio = float(norm_two / norm_one)
    assert ratio == pytest.approx(1.0, rel=1e-4), f"density gradient ×{ratio:.4f} at accumulation 2"
    # Elementwise too; atol allows the fp32 cancellation of subtracting the (larger) task gradient.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5 * float(norm_one))


def _norm(grads: dict) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


@pytest.mark.parametrize("kind,counts", [("seq_cls", False), ("causal", True)])
def test_task_and_density_gradients_do_not_depend_on_accumulation_steps(kind, counts, tmp_path):
    """What training uses (``runner.loss_counts_items``): a classification head returns a per-batch
    mean, so the Trainer must divide by the accumulation steps (transformers 5 skips it for any
    model taking **kwargs: ×2 at accumulation 2 without the flag); a causal LM's loss counts items."""
    density = DensityLossConfig(weight=1.0)
    one = step_grads(kind, 1, density, tmp_path, loss_counts_items=counts)
    two = step_grads(kind, 2, density, tmp_path, loss_counts_items=counts)
    assert _norm(two) / _norm(one) == pytest.approx(1.0, rel=1e-4)
    if kind == "seq_cls":  # the flag is what makes it so
        unflagged = step_grads(kind, 2, density, tmp_path)
        assert _norm(unflagged) / _norm(one) > 1.5


def teacher_of(kind: str) -> torch.nn.Module:
    torch.manual_seed(7)
    teacher = tiny_model(kind)
    with torch.no_grad():  # another model: its outputs differ from the student's
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return teacher.eval().requires_grad_(False)


@pytest.mark.parametrize("kind,counts", [("seq_cls", False), ("causal", True), ("qa", None)])
def test_distillation_gradient_does_not_depend_on_accumulation_steps(kind, counts, tmp_path):
    """The distillation term is a per-micro-batch mean like L_density: one batch of 4 and two
    accumulated halves give the same step (task and term together, as training runs them)."""
    teacher = teacher_of(kind)
    one = step_grads(kind, 1, None, tmp_path, loss_counts_items=counts, teacher=teacher)
    two = step_grads(kind, 2, None, tmp_path, loss_counts_items=counts, teacher=teacher)
    plain = step_grads(kind, 1, None, tmp_path, loss_counts_items=counts)
    assert _norm({n: one[n] - plain[n] for n in one}) > 1e-4 * _norm(plain)  # the term changes the step
    assert _norm(two) / _norm(one) == pytest.approx(1.0, rel=1e-4)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5 * _norm(one))
