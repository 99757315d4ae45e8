"Multi-rank training on CPU (05a, 06a): 2 gloo ranks spawned once; gradients, EMA teacher and resume checked against one process."
from pathlib import Path

import pytest
import torch

from jepa_lab.core import final_weights
from jepa_lab.distributed import (LOSS_KINDS, SINGLE_PROCESS, DistributedContext, DistributedError, context, encoder_gradients,
                                  gather_features, rank_batch_slice, regression_stream_run, run_on_ranks, unwrap, wrap_ddp)
from jepa_lab.distributed_jepa import jepa_ddp_selfcheck, jepa_step_gradients


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    "One spawn of 2 gloo ranks running every rank-side check of 05a and 06a (starting processes that import torch: the slow part)."
    folder = tmp_path_factory.mktemp("ddp")
    return folder, run_on_ranks(jepa_ddp_selfcheck, 2, str(folder), True)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_two_rank_gradients_equal_one_process_on_the_whole_batch(two_ranks, kind):
    _, ranks = two_ranks
    single = encoder_gradients(kind)                      # this process: no DDP, the concatenated batch
    assert single.norm() > 0.01
    for r in ranks:
        assert (r["grads"][kind, "autograd"] - single).abs().max() < 1e-5


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_gathering_without_gradient_halves_the_gradient(two_ranks, kind):
    _, ranks = two_ranks
    single, bug = encoder_gradients(kind), ranks[0]["grads"][kind, "plain"]
    assert (bug - single).norm() / single.norm() > 0.4                  # a large, not a rounding, difference
    assert torch.allclose(bug, single / 2, atol=1e-5)                   # exactly 1/W of it, W = 2


def test_sigreg_projections_seeded_per_rank_give_wrong_gradients(two_ranks):
    _, ranks = two_ranks
    single = encoder_gradients("sigreg")
    assert (ranks[0]["grads"]["sigreg", "rank_seeded"] - single).norm() / single.norm() > 0.1


def test_ema_teacher_is_identical_on_every_rank(two_ranks):
    folder, ranks = two_ranks
    teachers = [h for r in ranks for h in r["ema"]["teacher"]]
    assert len(set(teachers)) == 1 and len({h for r in ranks for h in r["ema"]["student"]}) == 1
    assert ranks[0]["ema"]["initial_teacher"] != ranks[1]["ema"]["initial_teacher"]   # the ranks started apart
    assert teachers[0] != ranks[0]["ema"]["initial_teacher"]                           # and the teacher moved
    assert len(list((folder / "ema" / "checkpoints").glob("step-*.safetensors"))) == 1  # rank 0 alone wrote


def test_two_ranks_resume_on_one_with_the_same_stream_and_weights(two_ranks, tmp_path):
    folder, ranks = two_ranks
    first_half = ranks[0]["stream"]
    assert sorted(first_half) == list(range(6)) and ranks[1]["stream"] == first_half   # every rank drew the same global batch
    resumed = regression_stream_run(folder / "stream", steps=12)
    straight = regression_stream_run(tmp_path / "straight", steps=12)
    assert sorted(resumed) == list(range(6, 12)) and {**first_half, **resumed} == straight
    a, b = final_weights(folder / "stream"), final_weights(tmp_path / "straight")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_resume_with_another_global_batch_is_refused_and_leaves_the_run_alone(tmp_path):
    regression_stream_run(tmp_path, steps=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    with pytest.raises(DistributedError, match="global batch of 8 .* uses 16"):
        regression_stream_run(tmp_path, steps=6, global_batch=16)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before


def test_one_process_is_unchanged_and_uneven_batches_are_refused():
    assert context() is SINGLE_PROCESS
    x, model = torch.randn(6, 3), torch.nn.Linear(3, 2)
    assert gather_features(x) is x and wrap_ddp(model) is model and unwrap(model) is model and rank_batch_slice((x,))[0] is x
    with pytest.raises(DistributedError, match="does not split into 4 equal slices"):
        rank_batch_slice(x, DistributedContext(rank=1, world_size=4))
    assert rank_batch_slice(x, DistributedContext(rank=2, world_size=3)).equal(x[4:6])


def test_gather_handles_unequal_row_counts_and_returns_each_rank_its_rows_gradient(two_ranks):
    _, ranks = two_ranks                                 # rank r held r + 1 rows of value r + 1; the loss weighs row i by i
    for r in ranks:
        assert r["uneven"]["gathered"][:, 0].tolist() == [1.0, 2.0, 2.0]
    assert ranks[0]["uneven"]["grad"][:, 0].tolist() == [0.0] and ranks[1]["uneven"]["grad"][:, 0].tolist() == [2.0, 4.0]


def test_a_jepa_training_step_on_two_ranks_equals_one_process(two_ranks):
    "Lesson 06's image JEPA: prediction loss per slice (DDP-averaged) + VICReg terms on gathered latents."
    _, ranks = two_ranks
    single = jepa_step_gradients()
    assert single.norm() > 0.1
    for r in ranks:
        assert (r["grads"]["jepa", "autograd"] - single).abs().max() < 1e-5
