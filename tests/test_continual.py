"Continual and streaming learning (jepa_lab.continual): replay and EWC forget less than fine-tuning, the buffer's memory bound, bad input."
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jepa_lab.continual import (EWC, METHODS, STAGES, ContinualConfig, ContinualError, ReplayBuffer, Stage,
                                continual_metrics, continual_run, diagonal_fisher, drift_weights, drifting_stream,
                                per_sample_loss, stage_state, stage_walks, stream_learn, train_stage)
from jepa_lab.core import seed_everything
from jepa_lab.dreams import TransitionSet
from jepa_lab.world import LabConfig, make_lab_state
from jepa_lab.world_model import LatentTransition

D, A = 8, 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny ops throughout: one torch thread (see conftest)."


def toy_stage(k: int, n: int = 400, seed: int = 0) -> TransitionSet:
    "Stage k of a toy world: latents around their own centre, each action moves them by a stage-specific vector."
    g = torch.Generator().manual_seed(1000 * k + seed)
    centre = torch.zeros(D); centre[k % D] = 3.0
    z = centre + torch.randn(n, D, generator=g)
    moves = torch.randn(A, D, generator=torch.Generator().manual_seed(100 + k))        # (A, D): the stage's dynamics
    a = F.one_hot(torch.randint(0, A, (n,), generator=g), A).float()
    return TransitionSet(z, a, z + a @ moves)


@pytest.fixture(scope="module")
def two_stages():
    trains = [toy_stage(k) for k in range(2)]
    tests = [toy_stage(k, 200, seed=1) for k in range(2)]
    copy_last = np.array([F.mse_loss(t.z, t.z_next).item() for t in tests])
    return trains, tests, copy_last


TOY = ContinualConfig(steps_per_stage=250, hidden=32, capacity=100, lr=3e-3, ewc_lambda=10.0)


# ---------------------------------------------------------------- the bar: forgetting

def test_replay_and_ewc_each_forget_less_than_fine_tuning_on_a_two_stage_toy(two_stages):
    trains, tests, copy_last = two_stages
    out = {m: continual_metrics(continual_run(m, trains, tests, TOY, seed=0), copy_last) for m in METHODS}
    print({m: {k: round(v, 3) for k, v in r.items()} for m, r in out.items()})
    assert out["fine-tune"]["forgetting"] > 0.3                          # the toy really forgets when fine-tuned
    for m in ("replay", "EWC", "replay + EWC"):
        assert out[m]["forgetting"] < 0.5 * out["fine-tune"]["forgetting"], m
    assert out["fine-tune"]["plasticity"] < 0.2                          # and it learns each stage when it meets it


def test_continual_metrics_on_a_hand_made_matrix():
    R = np.array([[1.0, 9.0, 9.0], [2.0, 1.0, 9.0], [3.0, 1.5, 0.5]])
    m = continual_metrics(R, [2.0, 1.0, 1.0])
    assert m["forgetting"] == pytest.approx(((1.5 - 0.5) + (1.5 - 1.0)) / 2)
    assert m["plasticity"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["final"] == pytest.approx((1.5 + 1.5 + 0.5) / 3)


# ---------------------------------------------------------------- the buffer

def test_buffer_never_exceeds_its_capacity_and_its_memory_is_fixed():
    buf = ReplayBuffer(32, D, A)
    empty_bytes = buf.nbytes
    data = toy_stage(0, 50)
    for i in range(40):                                                   # 2,000 transitions into 32 slots
        buf.push(data)
        assert len(buf) <= 32 and buf.nbytes == empty_bytes
    assert len(buf) == 32 and buf.seen == 2000
    assert empty_bytes == 32 * (2 * D + A + 1) * 4                       # z, z_next, a, priority in float32


def test_stream_learner_keeps_its_memory_bound_and_beats_the_frozen_model():
    pools = [toy_stage(k, 300, seed=2) for k in range(3)]
    chunks, weights = drifting_stream(pools, 20, 16, seed=0)
    assert np.allclose(weights[0], [1, 0, 0]) and np.allclose(weights[-1], [0, 0, 1])
    sizes = []
    class Watched(ReplayBuffer):
        def push(self, data, priority=None):
            super().push(data, priority); sizes.append(len(self))
    seed_everything(0)
    start = LatentTransition(D, A, 32)
    train_stage(start, torch.optim.Adam(start.parameters(), 3e-3), pools[0], TOY)
    frozen = stream_learn(_clone(start), chunks, None)
    buf = Watched(24, D, A)
    online = stream_learn(_clone(start), chunks, buf, steps_per_chunk=10, lr=3e-3)
    assert len(sizes) == 20 and max(sizes) == 24 and buf.seen == 20 * 16
    assert online.mean() < 0.5 * frozen.mean()
    assert online[-5:].mean() < 0.5 * frozen[-5:].mean()                 # it follows the drift


def _clone(model):
    import copy
    return copy.deepcopy(model)


def test_reservoir_keeps_old_stages_and_lowest_eviction_keeps_the_hard_ones():
    old, new = toy_stage(0, 1000), toy_stage(1, 1000)
    buf = ReplayBuffer(100, D, A, seed=0)
    buf.push(old); buf.push(new)
    share_old = (buf.z[:, 0] > 1.5).float().mean().item()                # stage 0 sits at z[0] ≈ 3
    assert 0.35 < share_old < 0.65                                        # uniform over all 2,000 seen
    low = ReplayBuffer(10, D, A, evict="lowest")
    low.push(old, priority=torch.arange(1000.0))
    assert sorted(low.priority.tolist()) == list(np.arange(990.0, 1000.0))


def test_sampling_is_proportional_to_priority_and_updates_set_it():
    buf = ReplayBuffer(4, D, A, alpha=1.0, seed=0)
    buf.push(toy_stage(0, 4), priority=torch.tensor([1.0, 1.0, 1.0, 7.0]))
    idx, batch = buf.sample(20000)
    assert (idx == 3).float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert torch.equal(batch.z, buf.z[idx])
    buf.update(torch.tensor([3]), torch.tensor([1.0]))
    assert (buf.sample(20000)[0] == 3).float().mean().item() == pytest.approx(0.25, abs=0.02)


# ---------------------------------------------------------------- EWC

def test_diagonal_fisher_matches_a_loop_over_samples():
    seed_everything(0)
    model = LatentTransition(D, A, 16)
    with torch.no_grad(): model.f[-1].weight.normal_(0, 0.1)
    data = toy_stage(0, 20)
    fisher = diagonal_fisher(model, data, max_samples=20, kind="empirical")
    loop = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(20):
        model.zero_grad()
        (0.5 * (model(data.z[i:i + 1], data.a[i:i + 1]) - data.z_next[i:i + 1]).pow(2).sum()).backward()
        for k, p in model.named_parameters(): loop[k] += p.grad.pow(2) / 20
    for k in fisher: assert torch.allclose(fisher[k], loop[k], rtol=1e-4, atol=1e-8), k


def test_the_model_fisher_does_not_vanish_where_the_model_fits_its_data():
    seed_everything(0)
    model = LatentTransition(D, A, 16)
    with torch.no_grad(): model.f[-1].weight.normal_(0, 0.1)
    z, a, _ = toy_stage(0, 64)
    with torch.no_grad(): fitted = TransitionSet(z, a, model(z, a))                  # a perfect fit: zero residuals
    empirical = diagonal_fisher(model, fitted, kind="empirical")
    true = diagonal_fisher(model, fitted, kind="model")
    assert max(v.abs().max().item() for v in empirical.values()) < 1e-10         # the empirical Fisher sees nothing
    assert true["f.6.weight"].mean().item() > 1e-3                                 # the model's Fisher still weighs the weights
    with pytest.raises(ContinualError, match="Fisher kind"): diagonal_fisher(model, fitted, kind="hessian")


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    seed_everything(0)
    model = LatentTransition(D, A, 16)
    ewc = EWC(10.0)
    assert ewc.penalty(model).item() == 0.0
    ewc.consolidate(model, toy_stage(0, 50))
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.1)
    assert ewc.penalty(model).item() > 0
    assert EWC(0.0).penalty(model).item() == 0.0


# ---------------------------------------------------------------- the staged lab

def test_stages_repaint_objects_and_keep_the_layout():
    for k, stage in enumerate(STAGES):
        state = stage_state(7, stage)
        base = make_lab_state(7, stage.config)
        assert np.array_equal(state.v_edges, base.v_edges) and state.agent == base.agent
        assert all(o.colour in stage.colours and o.shape in stage.shapes for o in state.objects)
        assert len({(o.colour, o.shape) for o in state.objects}) == len(state.objects)
    walks = stage_walks(STAGES[2], 2, 3, seed=0)
    assert walks.images.shape == (2, 4, 64, 64, 3) and walks.actions.shape == (2, 3) and len(walks.scenes[0]) == 4
    assert not set(STAGES[0].colours) & set(STAGES[1].colours)           # B's kinds are new


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("capacity", [0, -3, 2.5, True, None])
def test_bad_capacity(capacity):
    with pytest.raises(ContinualError, match="capacity"): ReplayBuffer(capacity, D, A)


def test_bad_transitions_are_refused_and_leave_the_buffer_untouched():
    buf = ReplayBuffer(8, D, A)
    buf.push(toy_stage(0, 3))
    before = buf.z.clone()
    z, a, z_next = toy_stage(0, 3)
    with pytest.raises(ContinualError, match="must be z"): buf.push(TransitionSet(z[:, :4], a, z_next[:, :4]))
    with pytest.raises(ContinualError, match="must be z"): buf.push(TransitionSet(z, a[:2], z_next))
    with pytest.raises(ContinualError, match="NaN"): buf.push(TransitionSet(z, a, z_next.clone().fill_(float("nan"))))
    assert len(buf) == 3 and torch.equal(buf.z, before)
    with pytest.raises(ContinualError, match="priority must be"): buf.push(toy_stage(0, 3), priority=torch.ones(2))
    with pytest.raises(ContinualError, match="priority must be"): buf.push(toy_stage(0, 3), priority=torch.tensor([1.0, float("nan"), 1.0]))
    assert len(buf) == 3 and torch.equal(buf.z, before)
    with pytest.raises(ContinualError, match="empty"): ReplayBuffer(4, D, A).sample(2)
    with pytest.raises(ContinualError, match="n >= 1"): buf.sample(0)
    with pytest.raises(ContinualError, match="non-finite"): buf.update(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(ContinualError, match="evict"): ReplayBuffer(4, D, A, evict="oldest")


def test_bad_settings_name_the_problem(two_stages):
    trains, tests, _ = two_stages
    with pytest.raises(ContinualError, match="unknown method"): continual_run("distill", trains, tests, TOY)
    with pytest.raises(ContinualError, match="one train and one test"): continual_run("replay", trains, tests[:1], TOY)
    with pytest.raises(ContinualError, match="lambda"): EWC(-1.0)
    with pytest.raises(ContinualError, match="ewc_lambda"): ContinualConfig(ewc_lambda=float("nan"))
    with pytest.raises(ContinualError, match="sizes"): ContinualConfig(capacity=0)
    with pytest.raises(ContinualError, match="unknown colours"): Stage("X", ("red", "pink"), ("cube",))
    with pytest.raises(ContinualError, match="cannot fill"): Stage("X", ("red",), ("cube",), LabConfig(n_objects=4))
    with pytest.raises(ContinualError, match="ran out"): drifting_stream([toy_stage(0, 10), toy_stage(1, 10)], 10, 8)
    with pytest.raises(ContinualError, match="R must be"): continual_metrics(np.ones((2, 3)), [1.0, 1.0])
    assert drift_weights(3, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert per_sample_loss(LatentTransition(D, A, 8), trains[0]).shape == (400,)
