"Learning from dreams (jepa_lab.dream_learning): the ensemble and its disagreement, the filter, goal reaching, learning, provenance, bad input."
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jepa_lab.core import CheckpointError, latest_checkpoint, load_checkpoint
from jepa_lab.dream_learning import (ARMS, DreamLearningError, GoalTasks, branch_dreams, branch_truth, dream_curve, kept_index, dream_lab, dream_provenance, ensemble_predict,
                                     filter_dreams, goal_tasks, reach_rate, read_provenance, save_learned, train_ensemble, with_dreams)
from jepa_lab.dreams import DreamingMoE, DreamTriplet, MoEConfig, MoEOutput, MoETrainConfig, frame_encoder, train_moe
from jepa_lab.core import Run, seed_everything
from jepa_lab.world import ACTIONS


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny ops throughout: one torch thread (see conftest)."


class Fixed(nn.Module):
    "A stand-in ensemble member: z_next = z + shift · a[:, action] (disagrees with a zero shift only on `action`)."
    def __init__(self, shift: float, action: int = 0):
        super().__init__(); self.shift, self.action = shift, action
    def forward(self, z, a):
        z_next = z + self.shift * a[:, self.action:self.action + 1]
        gates = F.one_hot(torch.full((len(z),), 1), 4).float()
        return MoEOutput(z_next, gates, gates, gates.argmax(1, keepdim=True), torch.ones(len(z), 1, dtype=torch.bool), torch.zeros(()))


def toy_bank(n=6, d=5):
    return SimpleNamespace(latents=torch.randn(n, d, generator=torch.Generator().manual_seed(0)), scenes=[f"s{i}" for i in range(n)])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with torch.no_grad():
        encoder, _ = frame_encoder(tmp_path_factory.mktemp("no_models"), seed=0)
        return dream_lab(encoder, n_worlds=60, steps=8, test_worlds=15, seed=0)


# ---------------------------------------------------------------- ensemble and filter

def test_ensemble_mean_and_disagreement():
    z, a = torch.randn(8, 5), F.one_hot(torch.arange(8), 8).float()
    same = ensemble_predict([Fixed(0.0), Fixed(0.0)], z, a)
    assert torch.equal(same.mean, z) and torch.equal(same.disagreement, torch.zeros(8))
    split = ensemble_predict([Fixed(0.0), Fixed(2.0)], z, a)                     # members differ by 2 on action 0 only
    assert torch.allclose(split.mean[0], z[0] + 1.0) and torch.allclose(split.mean[1:], z[1:])
    assert split.disagreement[0] == pytest.approx(1.0) and torch.equal(split.disagreement[1:], torch.zeros(7))
    assert split.experts.shape == (2, 8) and (split.experts == 1).all()


def test_filter_keeps_agreed_dreams_and_drops_disputed():
    bank = toy_bank()
    dreams = branch_dreams([Fixed(0.0), Fixed(3.0)], bank, range(6), horizon=1, seed=0, run_id="t")
    assert len(dreams.disagreement) == 6 * len(ACTIONS)
    disputed = dreams.transitions.a[:, 0] == 1                                   # action 0: the members disagree
    assert (dreams.disagreement[disputed] > 1).all() and (dreams.disagreement[~disputed] == 0).all()
    kept = filter_dreams(dreams, keep=7 / 8)
    assert len(kept.disagreement) == 6 * 7 and (kept.transitions.a[:, 0] == 0).all() and (kept.disagreement == 0).all()
    assert all(r["disagreement"] == 0 for r in kept.provenance)                 # the rows follow the kept dreams
    assert len(filter_dreams(dreams, 1.0).disagreement) == len(dreams.disagreement)


def test_branch_dreams_branches_every_action_then_follows_the_mean():
    bank = toy_bank()
    dreams = branch_dreams([Fixed(0.5), Fixed(0.5)], bank, [2, 4], horizon=3, seed=1, run_id="r")
    t = dreams.transitions
    assert len(t.z) == 2 * len(ACTIONS) * 3
    first = t.a[:16].argmax(1)
    assert first.tolist() == list(range(8)) * 2                                  # step 0: every action from each source
    assert torch.equal(t.z[16:32], t.z_next[:16])                                # step 1 starts from step 0's dream
    rows = dreams.provenance
    assert {r["step"] for r in rows} == {0, 1, 2} and {r["source"] for r in rows} == {2, 4}
    assert all(r["run"] == "r" and r["seed"] == 1 and r["members"] == 2 and r["expert"] == [1, 1] for r in rows)


def test_branch_truth_is_the_real_next_frame(lab):
    "Where a walk really took an action from a situation's first frame, the truth is the walk's next latent."
    truth, A = branch_truth(lab), len(ACTIONS)
    assert truth.shape == (len(lab.bank.scenes) * A, lab.bank.dim)
    steps = lab.walks.actions.shape[1]
    first = np.unique(lab.bank.situation_of, return_index=True)[1]
    checked = 0
    for k, f in enumerate(first):
        i, t = divmod(int(f), steps + 1)
        if t < steps:
            a = int(lab.walks.actions[i, t])
            assert torch.allclose(truth[k * A + a], lab.latents[i, t + 1], atol=1e-4); checked += 1
    assert checked > 100


def test_kept_index_takes_the_lowest_disagreement():
    d = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert kept_index(d, 0.6).tolist() == [1, 3, 4] and kept_index(d, 0.01).tolist() == [1]


# ---------------------------------------------------------------- goal reaching

def test_reach_rate_scores_the_chosen_action():
    B, A, D = 6, len(ACTIONS), len(ACTIONS)
    target = torch.tensor([3, 1, 0, 7, 5, 2])
    tasks = GoalTasks(torch.zeros(B, D), F.one_hot(target, A).float(), F.one_hot(target, A).bool())
    assert reach_rate(lambda z, a: z + a, tasks) == 1.0                          # a perfect model picks the goal's action
    assert reach_rate(lambda z, a: z, tasks) == pytest.approx(1 / 6)             # a blind one: ties go to action 0


def test_goal_tasks_are_real_and_solvable(lab):
    tasks = goal_tasks(lab.test_walks, lab.bank)
    changed = sum(int((w[1:] != w[:-1]).any(axis=(1, 2, 3)).sum()) for w in lab.test_walks.images)
    assert len(tasks.z) == changed and tasks.reaches.any(1).all()
    assert tasks.reaches.float().mean() < 0.5                                    # most actions do not reach the goal


# ---------------------------------------------------------------- learning

def test_ensemble_dreams_beat_real_only_on_few_transitions(lab, tmp_path):
    "Seeded tiny run: 50 labelled transitions; a student on real + filtered ensemble dreams has >= 5 % lower held-out MSE."
    train = MoETrainConfig(steps=300, batch_size=64, log_every=100)
    real = lab.labelled(50)
    models = train_ensemble(real, 3, train, tmp_path / "ens", seed=0)
    kept = filter_dreams(branch_dreams(models, lab.bank, range(len(lab.bank.scenes)), 1, 0, "t"), 0.5)
    mse = {}
    for name, data in (("real", real), ("dreams", with_dreams(real, kept))):
        seed_everything(0)
        model = DreamingMoE(MoEConfig(lab.bank.dim))
        train_moe(model, data, train, Run(tmp_path / name))
        with torch.no_grad(): mse[name] = F.mse_loss(model.eval()(lab.test.z, lab.test.a).z_next, lab.test.z_next).item()
    assert mse["dreams"] < 0.95 * mse["real"], mse


# ---------------------------------------------------------------- provenance

def test_provenance_round_trip_and_refusals(tmp_path):
    d = DreamTriplet("a", "push", "b", 0, 1, expert=2, gate=0.7, step=1, seed=5, source=3, run="r", distance=0.1)
    model = DreamingMoE(MoEConfig(4, hidden=8))
    path = save_learned(tmp_path / "m.safetensors", model, dream_provenance([d, d], member=0), step=7, config={"arm": "x"})
    rows = read_provenance(path)
    assert rows == [{"expert": 2, "step": 1, "seed": 5, "source": 3, "run": "r", "member": 0}] * 2
    ck = load_checkpoint(path, DreamingMoE(MoEConfig(4, hidden=8)), restore_rng=False)
    assert ck.step == 7 and ck.config["arm"] == "x"
    before = path.read_bytes()
    with pytest.raises(DreamLearningError, match="lacks seed"):
        save_learned(path, model, [{"expert": 1, "step": 0, "source": 0, "run": "r"}], step=8)
    assert path.read_bytes() == before                                           # a refused save leaves the old file
    with pytest.raises(DreamLearningError, match="DreamTriplet"): dream_provenance([{"expert": 1}])
    from jepa_lab.core import save_checkpoint
    plain = save_checkpoint(tmp_path / "plain.safetensors", model, step=1)
    with pytest.raises(CheckpointError, match="no dream provenance"): read_provenance(plain)
    with pytest.raises(CheckpointError, match="does not exist"): read_provenance(tmp_path / "missing.safetensors")


def test_dream_curve_rows_and_every_checkpoint_names_its_dreams(lab, tmp_path):
    "A tiny curve: one row per arm and the ensemble; each dream-trained model's saved and training checkpoints hold its dreams."
    tasks = goal_tasks(lab.test_walks, lab.bank)
    rows = dream_curve(lab, tasks, [16], [0], tmp_path, members=2, keep=0.5, train=MoETrainConfig(steps=10, batch_size=16, log_every=5))
    assert [r["arm"] for r in rows] == [*ARMS, "ensemble of 2 (reference)"]
    n_dreams = len(lab.bank.scenes) * len(ACTIONS)
    assert {r["arm"]: r["dreams"] for r in rows if r["arm"] in ARMS} == {
        "real only": 0, "+ one model's dreams": n_dreams, "+ ensemble dreams": n_dreams, "+ ensemble dreams, filtered": n_dreams // 2}
    here = tmp_path / "n16-seed0"
    for arm, slug in ARMS.items():
        training = latest_checkpoint(here / slug / "checkpoints")
        if arm == "real only":
            with pytest.raises(CheckpointError, match="no dream provenance"): read_provenance(training)
            assert not (here / f"{slug}.safetensors").exists()
            continue
        saved = read_provenance(here / f"{slug}.safetensors")
        assert len(saved) == next(r["dreams"] for r in rows if r["arm"] == arm) and read_provenance(training) == saved
        assert {len(r["expert"]) for r in saved} == {1 if arm == "+ one model's dreams" else 2}


# ---------------------------------------------------------------- bad input

def test_bad_input_is_refused_with_a_reason(lab, tmp_path):
    bank = toy_bank()
    members = [Fixed(0.0)]
    with pytest.raises(DreamLearningError, match="horizon"): branch_dreams(members, bank, [0], 0, 0, "r")
    with pytest.raises(DreamLearningError, match="bank indices"): branch_dreams(members, bank, [6], 1, 0, "r")
    with pytest.raises(DreamLearningError, match="at least one source"): branch_dreams(members, bank, [], 1, 0, "r")
    dreams = branch_dreams(members, bank, [0], 1, 0, "r")
    for keep in (0, -0.5, 1.5):
        with pytest.raises(DreamLearningError, match="keep"): filter_dreams(dreams, keep)
    with pytest.raises(DreamLearningError, match="at least one model"): ensemble_predict([], torch.zeros(1, 5), torch.zeros(1, 8))
    with pytest.raises(DreamLearningError, match="at least one member"): train_ensemble(lab.labelled(10), 0, MoETrainConfig(), tmp_path)
    for n in (0, 10_000):
        with pytest.raises(DreamLearningError, match="labelled transitions"): lab.labelled(n)
