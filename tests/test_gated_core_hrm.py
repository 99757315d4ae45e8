"""Lesson 12a on lesson 12's HRM: `load_or_train_hrm` refuses a model whose puzzles differ and trains one when it is
missing; the uncertainty helper agrees with `predict_segments` and ranks worse answers as less sure; int8 answers agree
with float ones; adapters on the HRM lower a cipher task's loss and come off bit-exactly. A tiny HRM trained here."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jepa_lab.core import CheckpointError, Run, save_checkpoint, torch_threads, weights_equal
from jepa_lab.gated_core import (AnswerUncertainty, abstention_curve, add_adapters, answer_uncertainty, auroc,
                                 cipher_permutations, compact_int8, final_segment_loss, fit_adapters, load_int8,
                                 load_or_train_hrm, reasoner_adapter_names, remove_adapters, state_bytes)
from jepa_lab.hrm import (HRM, ReasonerConfig, ReasonerTrain, augment_train, halting_choice, load_puzzles, predict_segments,
                          puzzle_manifest, reasoner_path, save_reasoner, split_puzzles, train_reasoner)

SEGMENTS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A tiny HRM (dim 32, one block per module) trained 150 steps on 4×4 sudoku, and its split."
    with torch_threads(1):
        puzzles = load_puzzles("generated:sudoku4", 600, seed=0)
        split = split_puzzles(puzzles, 0.2, 0)
        train = augment_train(split["train"], 4, seed=0)
        torch.manual_seed(0)
        model = HRM(ReasonerConfig(puzzles.vocab_size, 16, dim=32, layers=1))
        train_reasoner(model, train.inputs, train.labels, ReasonerTrain(steps=150, segments=SEGMENTS, warmup=20, ckpt_every=10**6,
                       log_every=10**6), Run(tmp_path_factory.mktemp("hrm-run")), seed=0)
    return model.eval(), split


def tiny_hrm_file(models, n: int, split_seed: int = 0):
    "A random tiny HRM saved as lesson 12 saves its model, with the manifest of `n` puzzles from `split_seed`."
    puzzles = load_puzzles("generated:sudoku4", n, seed=split_seed)
    torch.manual_seed(1)
    model = HRM(ReasonerConfig(6, 16, dim=16, layers=1))
    manifest = dict(task="sudoku4", seed=0, results={}, segments=SEGMENTS,
                    puzzles=puzzle_manifest(puzzles, "generated:sudoku4", split_seed, args=dict(count=n, min_guesses=0)))
    save_reasoner(reasoner_path(models, "sudoku4", 0), model, manifest)
    return model


def test_load_or_train_hrm_rebuilds_the_split_and_refuses_other_puzzles(tmp_path, one_thread):
    saved = tiny_hrm_file(tmp_path / "models", 60)
    model, manifest, split = load_or_train_hrm(tmp_path / "models", "sudoku4", 0, 60, 0, Run(tmp_path / "run"))
    assert weights_equal(model.state_dict(), saved.state_dict()) and manifest["segments"] == SEGMENTS
    again = split_puzzles(load_puzzles("generated:sudoku4", 60, seed=0), 0.2, 0)
    assert all(torch.equal(split[k].inputs, again[k].inputs) and torch.equal(split[k].labels, again[k].labels) for k in ("train", "test"))
    assert not set(split["train"].keys) & set(split["test"].keys)
    for n, split_seed in ((80, 0), (60, 1)):
        with pytest.raises(CheckpointError, match=r"data_hash .*\(-p n_puzzles 60 -p split_seed 0\)"):
            load_or_train_hrm(tmp_path / "models", "sudoku4", 0, n, split_seed, Run(tmp_path / "run"))


def test_load_or_train_hrm_trains_a_small_one_when_missing_and_says_so(tmp_path, capsys, one_thread):
    run = Run(tmp_path / "run")
    model, manifest, split = load_or_train_hrm(tmp_path / "models", "sudoku4", 0, 60, 0, run, train_steps=5)
    assert "is missing: training a small HRM" in capsys.readouterr().out
    assert isinstance(model, HRM) and "fallback" in manifest["trained_by"] and manifest["segments"] == 4
    assert manifest["puzzles"]["count"] == 60 and split["test"].n_puzzles == 12
    assert not (tmp_path / "models").exists()                                      # never written into models/
    assert (run.path / "hrm-sudoku4-seed0.safetensors").is_file()


def test_answer_uncertainty_agrees_with_predict_segments(trained, one_thread):
    model, split = trained
    test = split["test"]
    u = answer_uncertainty(model, test.inputs, SEGMENTS, batch_size=50)                # several batches
    p = predict_segments(model, test.inputs, SEGMENTS)
    N, L = test.inputs.shape
    assert isinstance(u, AnswerUncertainty) and u.answers.shape == (SEGMENTS, N, L)
    assert u.halt_prob.shape == u.entropy.shape == u.low_confidence.shape == (SEGMENTS, N)
    assert torch.equal(u.answers, p.answers) and torch.allclose(u.halt_prob, p.halt_prob)
    assert (u.entropy >= 0).all() and (u.entropy <= math.log(test.vocab_size) + 1e-5).all()
    assert (u.low_confidence >= 0).all() and (u.low_confidence <= 1 - 1 / test.vocab_size + 1e-6).all()
    halted, stop = u.at_stop(), halting_choice(p.halt_prob)
    assert torch.equal(halted["segments"], stop + 1)
    assert torch.equal(halted["answers"], p.answers[stop, torch.arange(N)])
    assert torch.allclose(halted["halt"], 1 - p.halt_prob[stop, torch.arange(N)])
    # the scores carry signal: answers with more wrong cells than the median are the less sure ones
    wrong_cells = (halted["answers"] != test.labels).sum(1).numpy()
    worse = wrong_cells > np.median(wrong_cells)
    assert auroc(halted["entropy"].numpy(), worse) > 0.65 and auroc(halted["low_confidence"].numpy(), worse) > 0.55
    curve = abstention_curve(wrong_cells == 0, halted["entropy"].numpy(), [0.0, 0.5])
    assert curve[0] == (wrong_cells == 0).mean()


def test_int8_hrm_answers_agree_with_the_float_ones_and_round_trip(trained, tmp_path, one_thread):
    model, split = trained
    small = compact_int8(model)
    x = split["test"].inputs
    a, b = predict_segments(model, x, SEGMENTS).answers, predict_segments(small, x, SEGMENTS).answers
    assert (a == b).float().mean() >= 0.99
    assert state_bytes(small) < 0.4 * state_bytes(model)
    path = save_checkpoint(tmp_path / "hrm-int8.safetensors", small, step=0, rng=False)
    back = load_int8(path, compact_int8(HRM(model.config)))
    assert torch.equal(predict_segments(back, x, SEGMENTS).answers, b)


def test_cipher_permutations_are_distinct_derangements_of_the_digits():
    vocab = ("<pad>", ".", "1", "2", "3", "4")
    perms = cipher_permutations(vocab, 9, seed=0)                                   # all !4 = 9 of them
    assert len({tuple(p.tolist()) for p in perms}) == 9
    for p in perms:
        assert p[:2].tolist() == [0, 1] and sorted(p[2:].tolist()) == [2, 3, 4, 5] and (p[2:] != torch.arange(2, 6)).all()
    with pytest.raises(ValueError, match="only 9 ciphers"): cipher_permutations(vocab, 10, seed=0)


def test_adapters_on_the_hrm_lower_the_cipher_loss_and_come_off_bit_exactly(trained, one_thread):
    model, split = trained
    assert reasoner_adapter_names(model) == ["head"] + [f"{m}.blocks.0.mlp.{i}" for m in "LH" for i in (0, 2)]
    perm = cipher_permutations(split["test"].vocab, 1, seed=3)[0]
    xs, ys = split["train"].inputs[:32], perm[split["train"].labels[:32]]
    xq, yq = split["test"].inputs, perm[split["test"].labels]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(): support0, query0 = final_segment_loss(model, xs, ys, SEGMENTS).item(), final_segment_loss(model, xq, yq, SEGMENTS).item()
    for names in (["head"], reasoner_adapter_names(model)):
        add_adapters(model, 4, names)
        losses = fit_adapters(model, lambda m: final_segment_loss(m, xs, ys, SEGMENTS), steps=30, lr=2e-2)
        with torch.no_grad(): query = final_segment_loss(model, xq, yq, SEGMENTS).item()
        assert losses[0] == pytest.approx(support0, rel=1e-5)                       # identity at the start
        assert losses[-1] < 0.5 * support0 and query < 0.7 * query0, (names, losses[-1], support0, query, query0)
        remove_adapters(model)
        assert weights_equal(before, model.state_dict())
        assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in names)
