"RL over dream branches (jepa_lab.dream_rl): branches are 09's arbitration of each expert's dream, REINFORCE beats random choice on held-out worlds, degenerate batches change nothing, provenance is saved, bad input is refused."
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jepa_lab.core import CheckpointError, Run, seed_everything, weights_equal
from jepa_lab.dream_learning import read_provenance, save_learned
from jepa_lab.dream_rl import (CHOOSERS, MASKED, BranchPolicy, BranchRewards, DreamRLError, RLConfig, Situations, branch_provenance,
                               branch_table, choose, real_outcomes, reinforce_step, score_choices, simulate_branches,
                               train_policy, walk_situations)
from jepa_lab.dreams import DreamingMoE, MoEConfig, MoETrainConfig, train_moe, walk_transitions
from jepa_lab.world import ACTIONS

STEPS = 8  # actions per walk


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny ops throughout: one torch thread (see conftest)."


@pytest.fixture(scope="module")
def lab(tmp_path_factory, small_lab):
    "A tiny lab: 60 training walks (bank, MoE data, RL situations), 15 held-out walks of other worlds, a trained MoE, every branch simulated."
    folder = tmp_path_factory.mktemp("dream_rl")
    small = small_lab(60, STEPS, test_walks=15)
    bank, train, test, train_lat, test_lat = small.bank, small.walks, small.test_walks, small.latents, small.test_latents
    seed_everything(0)
    moe = DreamingMoE(MoEConfig(bank.dim))
    train_moe(moe, walk_transitions(train_lat, train.actions), MoETrainConfig(steps=300), Run(folder / "moe"), desc="moe")
    train_sit = walk_situations(train, train_lat, 1, bank.situation_of)
    test_sit = walk_situations(test, test_lat, 1)
    train_br, _ = simulate_branches(moe, train_sit, 1)
    test_br, _ = simulate_branches(moe, test_sit, 1)
    return dict(bank=bank, moe=moe, train=train, test=test, train_sit=train_sit, test_sit=test_sit, train_br=train_br,
                test_br=test_br, real=real_outcomes(test, test_sit, 1))


def toy(B=8, K=6, D=4, seed=0):
    "A policy and a random batch: z_start, z_goal (B, D), rewards (B, K), all branches valid."
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = BranchPolicy(D, K, hidden=8)
    return (policy, torch.optim.Adam(policy.parameters(), lr=1e-2), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g),
            torch.randn(B, K, generator=g), torch.ones(B, K, dtype=torch.bool))


# ---------------------------------------------------------------- situations and branches

def test_situations_are_real_starts_with_changed_goals(lab):
    sit, walks = lab["train_sit"], lab["train"]
    for n in range(0, len(sit), 37):
        i, t = sit.walk[n], sit.t[n]
        assert not np.array_equal(walks.images[i, t], walks.images[i, t + 1])             # the goal differs from the start
        assert sit.actions[n, 0] == walks.actions[i, t]
        assert np.array_equal(lab["bank"].frames[sit.source[n]], walks.images[i, t])       # source: the start's bank situation
    assert (lab["test_sit"].source == -1).all()


def test_branch_reward_is_each_experts_own_dream_scored_by_progress(lab):
    moe, sit, br = lab["moe"], lab["test_sit"], lab["test_br"]
    assert br.rewards.shape == (len(sit), 32) and br.actions.shape == (32, 1)
    for k in (0, 7, 13, 30):
        a, e = int(br.actions[k, 0]), int(br.experts[k])
        with torch.no_grad(): z1 = moe.experts[e](sit.z_start, F.one_hot(torch.full((len(sit),), a), 8).float())
        expected = 1 - (z1 - sit.z_goal).norm(dim=1) / (sit.z_start - sit.z_goal).norm(dim=1)
        assert torch.allclose(br.rewards[:, k], expected, atol=1e-5)
    top2 = moe.top_k(moe.route(sit.z_start[:1].expand(8, -1), torch.eye(8)))[0]            # (8 actions, 2 experts)
    assert br.valid[0].view(8, 4).nonzero()[:, 1].view(8, 2).sort(1).values.tolist() == top2.sort(1).values.tolist()
    assert (br.valid.sum(1) == 16).all()


def test_branch_table_enumerates_sequences_and_experts():
    actions, experts = branch_table(2, 3)
    assert actions.shape == (8 * 8 * 3, 2) and experts.tolist()[:4] == [0, 1, 2, 0]
    assert len({(tuple(a), e) for a, e in zip(actions.tolist(), experts.tolist())}) == 192


def test_real_outcomes_replay_the_walk(lab):
    sit, real = lab["test_sit"], lab["real"]
    assert real[torch.arange(len(sit)), torch.as_tensor(sit.actions[:, 0])].all()        # the walk's own action reaches its goal
    assert real.float().mean() < 0.3                                                      # most actions do not


# ---------------------------------------------------------------- learning

def test_rl_beats_random_on_held_out_worlds(lab):
    torch.manual_seed(0)
    policy = BranchPolicy(lab["bank"].dim, 32)
    untrained = copy.deepcopy(policy)
    history, used = train_policy(policy, lab["train_sit"], lab["train_br"], RLConfig(updates=300), seed=0)
    first, last = np.mean([h["reward"] for h in history[:20]]), np.mean([h["reward"] for h in history[-20:]])
    assert last > first + 0.5, (first, last)                                              # the training reward rises
    score = {m: score_choices(choose(m, lab["test_sit"], lab["test_br"], untrained if m == "untrained policy" else policy,
                                     lab["moe"], seed=0), lab["test_br"], lab["real"]) for m in CHOOSERS}
    # measured (seed 0, 51 held-out situations): dream reward -0.06 vs random -0.99, untrained -0.44, router -0.36;
    # real success 0.96 vs 0.12, 0.12, 0.24. The dream reward has a heavy negative tail, so its margins are smaller.
    assert score["trained policy"]["dream_reward"] > score["random"]["dream_reward"] + 0.5, score
    for other in ("random", "untrained policy", "router"):
        assert score["trained policy"]["dream_reward"] > score[other]["dream_reward"] + 0.2, (other, score)
        assert score["trained policy"]["real_success"] > score[other]["real_success"] + 0.5, (other, score)
    assert score["best branch"]["dream_reward"] >= score["trained policy"]["dream_reward"]   # the upper bound bounds


def test_training_is_seeded(lab):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        policy = BranchPolicy(lab["bank"].dim, 32)
        history, _ = train_policy(policy, lab["train_sit"], lab["train_br"], RLConfig(updates=5), seed=3)
        runs.append((policy.state_dict(), [h["reward"] for h in history]))
    assert weights_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


# ---------------------------------------------------------------- degenerate batches

def test_equal_rewards_mean_no_update_and_no_nan():
    policy, opt, zs, zg, _, valid = toy()
    before = copy.deepcopy(policy.state_dict())
    for samples in (1, 4):
        stats = reinforce_step(policy, opt, zs, zg, torch.full((8, 6), 0.7), valid, samples=samples)
        assert stats["updated"] == 0 and not math.isnan(stats["reward"]) and stats["used"] == []
    assert weights_equal(before, policy.state_dict())


def test_equal_rewards_on_valid_branches_only_still_mean_no_update():
    policy, opt, zs, zg, rewards, valid = toy()
    valid[:, 3:] = False
    rewards[:, :3] = 1.5                                                               # the invalid branches' rewards differ: ignored
    before = copy.deepcopy(policy.state_dict())
    assert reinforce_step(policy, opt, zs, zg, rewards, valid)["updated"] == 0
    assert weights_equal(before, policy.state_dict())


def test_a_situation_without_valid_branch_is_skipped_and_counted():
    policy, opt, zs, zg, rewards, valid = toy()
    valid[2] = False
    rewards[2] = math.nan                                                              # its rewards are never read
    stats = reinforce_step(policy, opt, zs, zg, rewards, valid, generator=torch.Generator().manual_seed(0))
    assert stats["skipped"] == 1 and stats["situations"] == 7 and stats["updated"] == 1
    assert 2 not in {b for b, _ in stats["used"]} and all(valid[b, k] for b, k in stats["used"])
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_an_all_invalid_batch_changes_nothing():
    policy, opt, zs, zg, rewards, valid = toy()
    before = copy.deepcopy(policy.state_dict())
    stats = reinforce_step(policy, opt, zs, zg, rewards, torch.zeros_like(valid))
    assert stats["skipped"] == 8 and stats["updated"] == 0 and weights_equal(before, policy.state_dict())


def test_invalid_branches_are_never_sampled_or_chosen():
    policy, opt, zs, zg, rewards, valid = toy(B=64)
    valid[:, ::2] = False
    valid[5] = False
    stats = reinforce_step(policy, opt, zs, zg, rewards, valid, samples=8, generator=torch.Generator().manual_seed(1))
    assert all(k % 2 == 1 for _, k in stats["used"])
    assert (policy(zs, zg, valid)[valid.logical_not()] == MASKED).all()
    sit = Situations(zs, zg, np.zeros(64, int), np.zeros(64, int), np.zeros((64, 1), int), np.zeros(64, int))
    br = BranchRewards(rewards, valid, torch.zeros(6, 1, dtype=torch.long), torch.arange(6))
    for m in ("trained policy", "random", "best branch"):
        picks = choose(m, sit, br, policy)
        assert picks[5] == -1 and (picks[torch.arange(64) != 5] % 2 == 1).all()


def test_training_survives_situations_without_valid_branches(lab):
    br = lab["train_br"]
    valid = br.valid.clone()
    valid[::3] = False                                                                 # a third of the situations: nothing valid
    torch.manual_seed(0)
    policy = BranchPolicy(lab["bank"].dim, 32)
    history, used = train_policy(policy, lab["train_sit"], BranchRewards(br.rewards, valid, br.actions, br.experts),
                                 RLConfig(updates=20), seed=0)
    assert sum(h["skipped"] for h in history) > 0 and all(n % 3 for n, _ in used)
    assert all(torch.isfinite(p).all() for p in policy.parameters())


# ---------------------------------------------------------------- bad input

def test_nan_reward_on_a_valid_branch_is_a_clear_error():
    policy, opt, zs, zg, rewards, valid = toy()
    rewards[1, 2] = math.nan
    before = copy.deepcopy(policy.state_dict())
    with pytest.raises(DreamRLError, match="NaN or inf reward"):
        reinforce_step(policy, opt, zs, zg, rewards, valid)
    assert weights_equal(before, policy.state_dict())


@pytest.mark.parametrize("bad, match", [("z", r"z_start and z_goal"), ("rewards", r"rewards must be"), ("valid", r"valid must be"),
                                        ("mask_dtype", r"bool"), ("samples", r"samples")])
def test_wrong_shapes_are_clear_errors(bad, match):
    policy, opt, zs, zg, rewards, valid = toy()
    kw = dict(z_start=zs, z_goal=zg, rewards=rewards, valid=valid, samples=4)
    if bad == "z": kw["z_goal"] = zg[:, :3]
    if bad == "rewards": kw["rewards"] = rewards[:, :5]
    if bad == "valid": kw["valid"] = valid[:7]
    if bad == "mask_dtype": kw["valid"] = valid.float()
    if bad == "samples": kw["samples"] = 0
    with pytest.raises(DreamRLError, match=match):
        reinforce_step(policy, opt, **kw)


def test_other_bad_inputs(lab):
    with pytest.raises(DreamRLError, match="horizon"):
        walk_situations(lab["test"], lab["test_sit"].z_start.new_zeros(15, STEPS + 1, 64), horizon=STEPS + 1)
    with pytest.raises(DreamRLError, match="unknown method"):
        choose("oracle", lab["test_sit"], lab["test_br"])
    with pytest.raises(DreamRLError, match="do not match"):
        train_policy(BranchPolicy(64, 32), lab["train_sit"], lab["test_br"], RLConfig(updates=1), seed=0)
    assert issubclass(DreamRLError, ValueError)


# ---------------------------------------------------------------- provenance

def test_saved_policy_names_the_dreams_it_learned_from(lab, tmp_path):
    torch.manual_seed(0)
    policy = BranchPolicy(lab["bank"].dim, 32)
    history, used = train_policy(policy, lab["train_sit"], lab["train_br"], RLConfig(updates=10, batch_size=8), seed=4)
    rows = branch_provenance(lab["train_sit"], lab["train_br"], used, 4, "run-x")
    path = save_learned(tmp_path / "policy.safetensors", policy, rows, step=10)
    back = read_provenance(path)
    assert back == rows and len(back) == len(used)
    assert sum(r["uses"] for r in back) == sum(h["situations"] * 4 for h in history if h["updated"])
    sit, br = lab["train_sit"], lab["train_br"]
    for r in back:
        assert r["seed"] == 4 and r["run"] == "run-x" and r["step"] == 0
        assert r["source"] == sit.source[r["situation"]]
        k = [k for (n, k) in used if n == r["situation"] and int(br.experts[k]) == r["expert"] and ACTIONS[int(br.actions[k, 0])] == r["action"]]
        assert len(k) == 1 and br.valid[r["situation"], k[0]]
    with pytest.raises(CheckpointError):
        read_provenance(tmp_path / "missing.safetensors")
