"World model (lesson 07): latent transitions, rollouts, planning on two rooms, the dialog `reply` action."
import numpy as np
import pytest
import torch
from torch import nn

from jepa_lab.core import load_checkpoint, save_checkpoint, seed_everything
from jepa_lab.world import TwoRooms, TwoRoomsConfig, render_two_rooms, two_rooms_trajectories
from jepa_lab.world_model import (GRUTransition, ImpalaEncoder, LatentTransition, PlannerConfig, PositionOracle,
                                  WorldModel, WorldModelConfig, WorldModelError, evaluate_reply, plan,
                                  render_two_rooms_torch, rollout, run_episodes, step_losses, teacher_forced,
                                  train_reply_transition, two_rooms_batch, rollout_position_error, world_model_losses)


def position_latents(data: dict, embed: torch.Tensor) -> torch.Tensor:
    "Latents of walks: positions (N, T+1, 2) scaled to [0, 1] and mapped by a fixed random embedding (2, D)."
    return torch.from_numpy(data["positions"] / 64.0) @ embed


def fit_transition(z: torch.Tensor, actions: torch.Tensor, steps: int = 400, seed: int = 0) -> LatentTransition:
    "Teacher-forced training of a small LatentTransition on latents (N, T+1, D) and actions (N, T, 2)."
    seed_everything(seed)
    model = LatentTransition(z.shape[-1], 2, hidden=64)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(z), (128,), generator=g)
        loss = step_losses(teacher_forced(model, z[i], actions[i]), z[i, 1:]).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def walks_and_transition():
    embed = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    train = two_rooms_trajectories(4000, 8, seed=0)
    z = position_latents(train, embed).float()
    transition = fit_transition(z, torch.from_numpy(train["actions"]))
    return embed, transition


def test_transition_beats_copy_last_at_k1_and_k4(one_thread, walks_and_transition):
    embed, transition = walks_and_transition
    test = two_rooms_trajectories(500, 8, seed=1)
    z = position_latents(test, embed).float()
    with torch.no_grad():
        pred = rollout(transition, z[:, 0], torch.from_numpy(test["actions"]))
    model_err, copy_err = step_losses(pred, z[:, 1:]), step_losses(z[:, :1].expand(-1, 8, -1), z[:, 1:])
    ratio = (model_err / copy_err).numpy()
    assert ratio[0] < 0.5 and ratio[3] < 0.5, ratio            # at most half copy-last's error at k = 1 and k = 4


class PositionEncoder(nn.Module):
    "The agent's position read off the dot channel (PositionOracle's exact centroid), embedded like the training latents."
    def __init__(self, embed): super().__init__(); self.embed = embed
    def forward(self, obs):
        return ((PositionOracle().encoder(obs)[:, :2].double() / 64.0) @ self.embed.double()).float()


def test_planning_beats_random_actions(one_thread, walks_and_transition):
    embed, transition = walks_and_transition
    model = nn.Module(); model.encoder, model.transition = PositionEncoder(embed), transition
    planner = PlannerConfig(horizon=8, samples=24, iterations=2, elites=6)
    mppi = run_episodes("mppi", model, 16, seed=5, planner=planner)
    random = run_episodes("random", None, 16, seed=5)
    assert mppi["distance"] < random["distance"] - 10, (mppi, random)   # ends at least 10 px nearer the goal
    assert mppi["success"] >= random["success"]


def test_teacher_forced_and_autoregressive_shapes():
    seed_everything(0)
    for transition in (LatentTransition(8, 2, hidden=16), GRUTransition(8, 2, hidden=16)):
        z, a = torch.randn(5, 7, 8), torch.randn(5, 6, 2)
        assert rollout(transition, z[:, 0], a).shape == teacher_forced(transition, z, a).shape == (5, 6, 8)
        assert step_losses(rollout(transition, z[:, 0], a), z[:, 1:]).shape == (6,)
    tf, ar = (WorldModel(WorldModelConfig(latent_dim=8, channels=(4, 4, 4), hidden=16, rollout=r))
              for r in ("teacher_forced", "autoregressive"))
    ar.load_state_dict(tf.state_dict())
    data = two_rooms_trajectories(4, 3, seed=0)
    from jepa_lab.world import render_two_rooms
    obs = torch.from_numpy(render_two_rooms(data["positions"], data["wall_x"], data["door_y"]))
    (l_tf, terms_tf), (l_ar, _) = (world_model_losses(m, obs, torch.from_numpy(data["actions"])) for m in (tf, ar))
    assert l_tf.ndim == l_ar.ndim == 0 and set(terms_tf) == {"prediction", "variance", "covariance", "time_sim", "idm"}
    # one step: teacher forcing and the rollout are the same prediction
    assert torch.allclose(world_model_losses(tf, obs[:, :2], torch.from_numpy(data["actions"][:, :1]))[0],
                          world_model_losses(ar, obs[:, :2], torch.from_numpy(data["actions"][:, :1]))[0])


def test_an_untrained_transition_is_copy_last():
    z, a = torch.randn(3, 8), torch.randn(3, 4, 2)
    assert torch.equal(rollout(LatentTransition(8, 2), z, a), z[:, None].expand(-1, 4, -1))


@pytest.mark.parametrize("call, words", [
    (lambda m: m(torch.randn(4, 8), torch.randn(4, 3)), "action a must be (B=4, 2)"),
    (lambda m: m(torch.randn(4, 7), torch.randn(4, 2)), "latent z must be (B, 8)"),
    (lambda m: rollout(m, torch.randn(4, 8), torch.randn(4, 0, 2)), "horizon H must be >= 1"),
    (lambda m: rollout(m, torch.randn(4, 8), torch.randn(4, 2)), "actions must be (B=4, H, A)"),
    (lambda m: step_losses(torch.full((2, 3, 8), float("nan")), torch.zeros(2, 3, 8)), "NaN"),
    (lambda m: plan("mppi", m, torch.full((2, 8), float("nan")), torch.zeros(2, 8), PlannerConfig()), "NaN"),
    (lambda m: plan("gradient", m, torch.zeros(2, 8), torch.zeros(2, 8), PlannerConfig()), "choose cem or mppi"),
    (lambda m: PlannerConfig(horizon=0), "horizon must be >= 1"),
    (lambda m: PlannerConfig(samples=4, elites=8), "elites"),
    (lambda m: run_episodes("teleport", None, 2, 0), "policy 'teleport'"),
    (lambda m: ImpalaEncoder(8)(torch.zeros(2, 3, 65, 65)), "observations must be"),
    (lambda m: train_reply_transition(torch.zeros(4, 8), torch.zeros(4, 6)), "must both be (N, D)"),
    (lambda m: WorldModel(WorldModelConfig(predictor="lstm")), "choose mlp or gru"),
])
def test_bad_input_raises_a_clear_error(call, words):
    with pytest.raises(WorldModelError, match=None) as info:
        call(LatentTransition(8, 2, hidden=16))
    assert words in str(info.value), str(info.value)


def test_reply_transition_learns_a_fixed_map(one_thread):
    "Next-turn latents that are a fixed rotation of the context latents: the reply transition beats the identity."
    g = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    z_ctx = torch.randn(600, 16, generator=g)
    z_next = z_ctx @ rotation + 0.1 * torch.randn(600, 16, generator=g)
    reply = train_reply_transition(z_ctx[:500], z_next[:500], steps=300, hidden=64, weight_decay=0.0)
    texts = [f"turn {i}" for i in range(100)]
    ours, identity = evaluate_reply(reply, z_ctx[500:], z_next[500:], texts), evaluate_reply(None, z_ctx[500:], z_next[500:], texts)
    assert ours["cos"] > identity["cos"] + 0.3 and ours["mrr"] > identity["mrr"] + 0.3, (ours, identity)


def test_world_model_checkpoint_round_trip(tmp_path):
    seed_everything(0)
    a, b = (WorldModel(WorldModelConfig(latent_dim=8, channels=(4, 4, 4), hidden=16)) for _ in range(2))
    save_checkpoint(tmp_path / "wm.safetensors", a, step=3, config={"latent_dim": 8})
    assert load_checkpoint(tmp_path / "wm.safetensors", b, restore_rng=False).step == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_device_side_render_matches_the_numpy_renderer():
    "two_rooms_batch renders with torch where the model lives; the frames must equal 02's numpy frames."
    walks = two_rooms_trajectories(40, 17, seed=4)
    host = render_two_rooms(walks["positions"], walks["wall_x"], walks["door_y"])
    ours = render_two_rooms_torch(*(torch.from_numpy(walks[k]) for k in ("positions", "wall_x", "door_y"))).numpy()
    assert ours.shape == host.shape and np.abs(ours - host).max() < 1e-5
    assert np.abs(ours[:, :, 1] - host[:, :, 1]).max() == 0          # walls are exact 0/1 images
    obs, actions = two_rooms_batch(walks, 8, 5, np.random.default_rng(1), torch.device("cpu"))
    assert obs.shape == (8, 6, 2, 65, 65) and actions.shape == (8, 5, 2)
    with pytest.raises(WorldModelError, match="positions must be"):
        render_two_rooms_torch(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3))


def test_final_ln_normalises_latents_and_every_prediction():
    "final_ln=True: encoder latents and each predicted latent are layer-normed (mean 0, std 1 per row), the GRU included."
    walks = two_rooms_trajectories(4, 17, seed=2)
    obs, actions = two_rooms_batch(walks, 4, 5, np.random.default_rng(0), torch.device("cpu"))
    for predictor in ("mlp", "gru"):
        seed_everything(0)
        model = WorldModel(WorldModelConfig(latent_dim=16, channels=(4, 4, 4), hidden=16, predictor=predictor, final_ln=True))
        with torch.no_grad():
            z = model.encoder(obs)                                                   # (4, 6, 16)
            pred = rollout(model.transition, z[:, 0], actions)                       # (4, 5, 16)
        for x in (z, pred):
            assert x.mean(-1).abs().max() < 1e-5 and (x.std(-1, unbiased=False) - 1).abs().max() < 1e-3
        plain = WorldModel(WorldModelConfig(latent_dim=16, channels=(4, 4, 4), hidden=16, predictor=predictor))
        with torch.no_grad(): assert (plain.encoder(obs).std(-1, unbiased=False) - 1).abs().max() > 0.05



def test_each_window_is_cut_at_its_own_offset():
    "two_rooms_batch: every window is a contiguous piece of one walk (frames and actions aligned), offsets differ."
    walks = two_rooms_trajectories(6, 40, seed=3)
    obs, actions = two_rooms_batch(walks, 32, 5, np.random.default_rng(2), torch.device("cpu"))
    offsets = set()
    for b in range(32):
        match = np.argwhere((walks["actions"][:, :, None] == actions[b, 0].numpy()).all(-1)[..., 0])   # (walk, offset)
        assert len(match) == 1
        i, off = match[0]
        offsets.add(int(off))
        assert np.array_equal(actions[b].numpy(), walks["actions"][i, off:off + 5])
        frames = render_two_rooms(walks["positions"][i:i + 1, off:off + 6], walks["wall_x"][i:i + 1], walks["door_y"][i:i + 1])[0]
        assert np.abs(obs[b].numpy() - frames).max() < 1e-6
    assert len(offsets) > 5                                                          # not one offset for the whole batch


class _FixedLatents(torch.nn.Module):
    "Stands in for the encoder: returns the given latents whatever it is shown."
    def __init__(self, z): super().__init__(); self.z = z
    def forward(self, obs): return self.z


def test_pred_steps_limits_the_prediction_loss_to_the_first_actions():
    walks = two_rooms_trajectories(4, 17, seed=1)
    obs, actions = two_rooms_batch(walks, 4, 6, np.random.default_rng(0), torch.device("cpu"))
    seed_everything(0)
    model = WorldModel(WorldModelConfig(latent_dim=8, channels=(4, 4, 4), hidden=16, pred_steps=2))
    z = torch.randn(4, 7, 8)
    model.encoder = _FixedLatents(z)
    _, terms = world_model_losses(model, obs, actions)
    with torch.no_grad(): expected = (rollout(model.transition, z[:, 0], actions[:, :2]) - z[:, 1:3]).square().mean()
    assert torch.allclose(terms["prediction"], expected)
    model.config = WorldModelConfig(latent_dim=8, pred_steps=0)                      # 0: the whole window
    _, terms = world_model_losses(model, obs, actions)
    with torch.no_grad(): expected = (rollout(model.transition, z[:, 0], actions) - z[:, 1:]).square().mean()
    assert torch.allclose(terms["prediction"], expected)
    model.config = WorldModelConfig(latent_dim=8, pred_steps=7)
    with pytest.raises(WorldModelError, match="pred_steps=7 must be in 0..6"):
        world_model_losses(model, obs, actions)


def test_pooled_variance_counts_the_spread_over_time():
    "vc_pooled: latents identical across the batch but moving in time have no per-step spread, a pooled spread of ~1."
    walks = two_rooms_trajectories(8, 17, seed=1)
    obs, actions = two_rooms_batch(walks, 8, 4, np.random.default_rng(0), torch.device("cpu"))
    z = torch.linspace(-1.7, 1.7, 5)[None, :, None].expand(8, 5, 16).clone()        # (B, T+1, D): varies over t only
    terms = {}
    for pooled in (False, True):
        model = WorldModel(WorldModelConfig(latent_dim=16, channels=(4, 4, 4), hidden=16, vc_pooled=pooled))
        model.encoder = _FixedLatents(z)
        terms[pooled] = world_model_losses(model, obs, actions)[1]["variance"]
    assert terms[False] > 0.95 and terms[True] < 0.1


def test_rollout_position_error_of_copy_last_is_staying_put():
    "An untrained residual transition is copy-last: its rollout decodes where the walk started, so its error is the walk's own displacement."
    seed_everything(0)
    model = WorldModel(WorldModelConfig(latent_dim=32, hidden=16))          # LatentTransition starts as exactly copy-last
    walks = two_rooms_trajectories(3, 20, seed=5)
    drift = rollout_position_error(model, walks, ks=(1, 5, 20), n=3)
    assert drift["k"] == [1, 5, 20] and drift["stay_px"][-1] > 3                 # the walks do move away
    assert np.abs(drift["rollout_px"] - drift["stay_px"]).max() <= drift["encoder_px"]       # within the decoder's own error
    with pytest.raises(WorldModelError, match="20 actions; ks reach 30"):
        rollout_position_error(model, walks, ks=(1, 30), n=1)
    with pytest.raises(WorldModelError, match="n=4: choose 1..3"):
        rollout_position_error(model, walks, ks=(1,), n=4)


def test_eb_jepa_arch_shares_the_layernorm_and_saves_it_once(tmp_path):
    "arch='eb_jepa': the predictor normalises with the encoder's own LayerNorm, the GRU reads the raw action, IDM is 2 x 256."
    seed_everything(0)
    config = WorldModelConfig(latent_dim=16, channels=(4, 4, 4), blocks=1, predictor="gru", final_ln=True, arch="eb_jepa")
    a, b = WorldModel(config), WorldModel(config)
    assert a.transition._shared[0] is a.encoder.norm and not any(k.startswith("transition.norm") for k in a.state_dict())
    assert a.transition.inner.cell.input_size == 2
    assert [m.out_features for m in a.idm.net if isinstance(m, nn.Linear)] == [256, 256, 2]
    with torch.no_grad(): a.encoder.norm.weight.mul_(0.5)                         # move the shared weights off their init
    save_checkpoint(tmp_path / "eb.safetensors", a, step=1)
    load_checkpoint(tmp_path / "eb.safetensors", b, restore_rng=False)
    z, act = torch.randn(3, 16), torch.randn(3, 2)
    with torch.no_grad(): assert torch.equal(a.transition(z, act), b.transition(z, act))
    with pytest.raises(WorldModelError, match="set final_ln=True"):
        WorldModel(WorldModelConfig(latent_dim=16, arch="eb_jepa"))
    with pytest.raises(WorldModelError, match="arch 'big'"):
        WorldModel(WorldModelConfig(latent_dim=16, arch="big"))


class Shift(nn.Module):
    "z' = z + a in 2-d: a perfect model of walking with no walls."
    latent_dim, action_dim = 2, 2
    def forward(self, z, a): return z + a


@pytest.mark.parametrize("kind", ["mppi", "cem"])
def test_eb_jepa_style_planners_head_for_the_goal(kind):
    z0, goal = torch.zeros(6, 2), torch.tensor([[30.0, 0.0], [0, 30], [-30, 0], [0, -30], [20, 20], [-20, 20]])
    g = torch.Generator().manual_seed(0)
    plans = plan(kind, Shift(), z0, goal, PlannerConfig(horizon=12, samples=64, iterations=10, elites=8, style="eb_jepa"), generator=g)
    miss = (plans.sum(1) - goal).norm(dim=1)                               # where the plan ends, from the goal 28-30 away
    first = plans[:, 0]
    cosine = (first * goal).sum(1) / (first.norm(dim=1) * goal.norm(dim=1))
    assert (miss < 8).all() and (cosine > 0.5).all(), (miss, cosine)      # it gets there, and sets off the right way


def test_eb_jepa_mppi_executes_an_unclipped_elite_and_starts_cold():
    z0, goal = torch.zeros(4, 2), torch.full((4, 2), 200.0)                # far away: long steps pay
    config = PlannerConfig(horizon=10, samples=64, iterations=4, elites=8, style="eb_jepa")
    eb = plan("mppi", Shift(), z0, goal, config, generator=torch.Generator().manual_seed(1))
    assert eb.norm(dim=-1).max() > 2.45 + 0.5                              # eb_jepa's MPPI does not clip
    lab = plan("mppi", Shift(), z0, goal, PlannerConfig(10, 64, 4, 8), generator=torch.Generator().manual_seed(1))
    assert lab.norm(dim=-1).max() <= 2.45 + 1e-5                           # the lab's style does
    warm = torch.full((4, 10, 2), -2.0)                                    # a bad warm start is ignored (cold start) ...
    again = plan("mppi", Shift(), z0, goal, config, mean=warm, generator=torch.Generator().manual_seed(1))
    assert torch.equal(eb, again)
    with pytest.raises(WorldModelError, match="style"):
        PlannerConfig(style="fancy")


def test_eb_jepa_arch_scales_each_frame_like_its_normalizer():
    config = WorldModelConfig(latent_dim=8, final_ln=True, predictor="gru", arch="eb_jepa")
    enc = WorldModel(config).encoder.eval()
    data = two_rooms_trajectories(4, 2, seed=3)
    obs = torch.from_numpy(render_two_rooms(data["positions"], data["wall_x"], data["door_y"])).reshape(-1, 2, 65, 65)
    dim = obs.clone(); dim[:, 0] *= 0.5                                    # a fainter dot: min-max scaling undoes it
    with torch.no_grad():
        assert torch.allclose(enc(obs), enc(dim), atol=1e-4)
        lab = WorldModel(WorldModelConfig(latent_dim=8)).encoder.eval()
        assert not torch.allclose(lab(obs), lab(dim), atol=1e-4)


def test_position_oracle_reads_frames_exactly_and_plans_to_the_goal(one_thread):
    env = TwoRooms(); obs = env.reset(200, seed=7)
    z = PositionOracle().encoder(torch.from_numpy(obs))
    assert np.abs(z[:, :2].double().numpy() - env.positions).max() < 1e-3              # the agent's position
    assert (z[:, 2].numpy() == env.wall_x).all() and (z[:, 3].numpy() == env.door_y).all()   # the layout
    oracle = PositionOracle()
    step = oracle.transition(torch.tensor([[25.0, 40.0, 30.0, 20.0]]), torch.tensor([[10.0, 0.0]]))
    assert torch.allclose(step, torch.tensor([[28.7, 40.0, 30.0, 20.0]]))              # the environment's contact rule
    small = PlannerConfig(horizon=32, samples=32, iterations=3, style="eb_jepa")
    done = run_episodes("mppi", oracle, 12, seed=100, planner=small)
    random = run_episodes("random", None, 12, seed=100)
    assert done["success"] >= 0.5 and random["success"] == 0, (done, random)          # a perfect model finds the door


def test_eb_jepa_recipe_clips_encoder_and_predictor_apart_and_leaves_the_idm_free():
    from jepa_lab.world_model import optimizer_and_clip_groups
    eb = WorldModel(WorldModelConfig(latent_dim=8, final_ln=True, predictor="gru", arch="eb_jepa"))
    opt, groups = optimizer_and_clip_groups(eb, 1e-3)
    ids = lambda m: {id(p) for p in m.parameters()}
    assert [{id(p) for p in g} for g in groups] == [ids(eb.encoder), ids(eb.transition)]
    assert not ids(eb.idm) & set().union(*({id(p) for p in g} for g in groups))       # the IDM is never clipped
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and all(g["weight_decay"] == 1e-5 for g in opt.param_groups)
    lab = WorldModel(WorldModelConfig(latent_dim=8))
    opt, groups = optimizer_and_clip_groups(lab, 1e-3)
    assert len(groups) == 1 and {id(p) for p in groups[0]} == ids(lab)                # one clip over everything
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_benchmark_planning_times_all_episodes_together_against_one_at_a_time(one_thread):
    from jepa_lab.world_model import benchmark_planning

    class Recorder(nn.Module):                                             # notes the batch of every imagined step
        def __init__(self, inner):
            super().__init__(); self.inner, self.batches = inner, set()
            self.latent_dim, self.action_dim = inner.latent_dim, inner.action_dim
        def forward(self, z, a): self.batches.add(len(z)); return self.inner(z, a)

    model = WorldModel(WorldModelConfig(latent_dim=8, hidden=16))
    model.transition = Recorder(model.transition)
    r = benchmark_planning(model, episodes=3, planner=PlannerConfig(horizon=4, samples=8, iterations=2),
                           env_config=TwoRoomsConfig(max_steps=3))
    assert model.transition.batches == {3 * 8, 8}                          # 3 episodes x 8 samples together; 8 alone
    assert r["episodes"] == 3 and r["together_s_per_episode"] > 0 and r["alone_s_per_episode"] > 0
    assert r["speedup"] == pytest.approx(r["alone_s_per_episode"] / r["together_s_per_episode"])
    with pytest.raises(WorldModelError, match="episodes must be >= 1"):
        benchmark_planning(episodes=0)
