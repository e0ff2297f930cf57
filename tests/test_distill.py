"""Distillation from a trained run (--distill-from): the term by hand, the Trainer's loss against
separate forwards, two steps on the family × method matrix, and the run and command paths."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import build, labels_for, make_inputs, matrix_params, tiny_run_config

from deft.cli import main as deft_main
from deft.core.sites import find_sites
from deft.training import RunDir, TrainConfig, load_run, train
from deft.training.distill import distillation_term, token_masks
from deft.training.trainer import make_deft_trainer


def _kl_by_hand(student_rows, teacher_rows, T):
    total = 0.0
    for s, t in zip(student_rows, teacher_rows):
        ps = [math.exp(v / T) for v in s]
        pt = [math.exp(v / T) for v in t]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return total / len(student_rows) * T * T


def test_classifier_term_is_the_softened_kl_times_t_squared():
    s = [[1.0, -0.5, 2.0], [0.3, 0.3, -1.0]]
    t = [[0.0, 1.5, 0.5], [2.0, -1.0, 0.0]]
    for T in (1.0, 2.0, 4.0):
        got = distillation_term({"logits": torch.tensor(s)}, {"logits": torch.tensor(t)}, temperature=T)
        assert float(got) == pytest.approx(_kl_by_hand(s, t, T), rel=1e-5)
    same = distillation_term({"logits": torch.tensor(s)}, {"logits": torch.tensor(s)}, temperature=2.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_regression_term_is_the_squared_error_to_the_teacher():
    got = distillation_term({"logits": torch.tensor([[1.0], [3.0]])}, {"logits": torch.tensor([[2.0], [0.0]])},
                            temperature=2.0)
    assert float(got) == pytest.approx((1 + 9) / 2)  # no temperature: not a distribution


def test_per_token_logits_count_the_masked_tokens_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    got = distillation_term({"logits": s}, {"logits": t}, temperature=2.0, masks=(None, mask))
    rows = [(0, 0), (0, 1), (0, 2), (1, 0)]
    expected = _kl_by_hand([s[i, j].tolist() for i, j in rows], [t[i, j].tolist() for i, j in rows], 2.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # prompt tuning: the student's logits start with 2 virtual tokens; the common positions are the last ones
    longer = torch.cat([torch.randn(2, 2, 5, generator=g), s], dim=1)
    assert float(distillation_term({"logits": longer}, {"logits": t}, temperature=2.0, masks=(mask,))) == \
        pytest.approx(expected, rel=1e-5)


def test_qa_heads_average_start_and_end():
    s = {"start_logits": torch.tensor([[0.0, 1.0, 2.0]]), "end_logits": torch.tensor([[1.0, 0.0, 0.0]])}
    t = {"start_logits": torch.tensor([[2.0, 0.0, 0.0]]), "end_logits": torch.tensor([[0.0, 0.0, 3.0]])}
    expected = (_kl_by_hand([[0.0, 1.0, 2.0]], [[2.0, 0.0, 0.0]], 1.0)
                + _kl_by_hand([[1.0, 0.0, 0.0]], [[0.0, 0.0, 3.0]], 1.0)) / 2
    assert float(distillation_term(s, t, temperature=1.0)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="same task head"):
        distillation_term({"logits": torch.zeros(2, 3)}, {"logits": torch.zeros(2, 4)}, temperature=1.0)
    with pytest.raises(ValueError, match="needs one of the outputs"):
        distillation_term({"last_hidden_state": torch.zeros(1)}, {}, temperature=1.0)


@pytest.mark.parametrize(("family", "method"), matrix_params())
def test_distillation_trains_two_steps_on_the_matrix(family, method, tmp_path):
    """The Trainer's loss is (1 − w)·task + w·term, each recomputed here from separate forwards of
    the student and of the teacher (another trained copy); two optimizer steps then run."""
    student, _ = build(family, method)
    teacher, _ = build(family, method, seed=1, trained=True)
    teacher.requires_grad_(False)
    inputs = labels_for(family, make_inputs(family, batch=2, length=8, pad=2))
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2,
                             per_device_train_batch_size=2, learning_rate=1e-2, remove_unused_columns=False)
    trainer = make_deft_trainer(sites=find_sites(student), density=None, threshold=0.01, model=student, args=args,
                                teacher=teacher, distill_weight=0.3, distill_temperature=2.0)
    trainer.model_accepts_loss_kwargs = False
    student.train()
    torch.manual_seed(0)  # the same dropout masks in both student forwards
    loss = trainer.compute_loss(student, dict(inputs))
    with torch.no_grad():
        torch.manual_seed(0)
        out = student(**inputs)
        term = distillation_term(out, teacher(**inputs), temperature=2.0, masks=token_masks(inputs, student))
        task = out.loss
    assert float(term) > 0
    assert float(loss.detach()) == pytest.approx(0.7 * float(task) + 0.3 * float(term), rel=1e-4)
    params = [p for p in student.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    for _ in range(2):
        loss = trainer.compute_loss(student, dict(inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert all(p.grad is None for p in teacher.parameters())


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    train(tiny_run_config(root, mode="peft"), root / "teacher", progress=False)
    return root


def test_a_run_distils_from_its_teacher(teacher_run):
    root = teacher_run
    config = tiny_run_config(root, mode="peft", train_density=0.3, max_steps=4, distill_from=str(root / "teacher"))
    state = torch.random.get_rng_state()
    from deft.training.run import load_teacher

    teacher = load_teacher(config)
    assert torch.equal(torch.random.get_rng_state(), state)  # the student's draws do not depend on the teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    results = train(config, root / "student", progress=False)
    history = json.loads((root / "student" / RunDir.HISTORY).read_text())
    assert any("distill_loss" in h and h["distill_loss"] > 0 for h in history)
    assert results["config"]["distill_from"] == str(root / "teacher")
    load_run(root / "student")  # loads without its teacher


def test_bad_teachers_are_refused_before_anything_is_written(teacher_run, tmp_path, capsys):
    root = teacher_run
    for teacher, message in ((tmp_path / "nothing", "not a finished deft run"),
                             (root / "teacher", "the teacher's task is 'sst2'")):
        config = tiny_run_config(root, mode="peft", task="rte", distill_from=str(teacher))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(config, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="distill_weight"):
        TrainConfig(distill_weight=0.0)
    with pytest.raises(ValueError, match="distill_temperature"):
        TrainConfig(distill_temperature=0.0)
    cfg = tiny_run_config(root)
    base = ["train", "--model", cfg.model, "--tokenizer", "minilm", "--task", "rte", "--max-train-samples", "16",
            "--max-steps", "1", "--data-dir", cfg.data_dir, "--peft", "--output", str(tmp_path / "cli")]
    for extra in (["--distill-from", str(root / "teacher")], ["--distill-from", str(root / "teacher"),
                                                              "--distill-weight", "1.5"]):
        assert deft_main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("teacher" in err or "distill_weight" in err)
        assert not (tmp_path / "cli").exists()


def test_copy_of_the_teacher_as_student_has_no_distillation_gradient():
    """A student that answers as its teacher does gets no push from the term (KL at its minimum)."""
    student, _ = build("bert", "lora", trained=True)
    teacher = copy.deepcopy(student).requires_grad_(False)
    inputs = make_inputs("bert", batch=2, length=8)
    term = distillation_term(student(**inputs), teacher(**inputs), temperature=2.0)
    grads = torch.autograd.grad(term, [p for p in student.parameters() if p.requires_grad], allow_unused=True)
    assert float(term.detach()) == pytest.approx(0.0, abs=1e-6)
    assert all(g is None or float(g.abs().max()) < 1e-5 for g in grads)
