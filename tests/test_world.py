"World (lesson 02): the lab world's rules and determinism; two rooms on the eb_jepa/PLDM protocol."
from dataclasses import replace

import numpy as np
import pytest

from jepa_lab.world import (ACTIONS, CLOSED_DOOR, OPEN_DOOR, WALL, LabConfig, LabObject, LabWorld, LabWorldError,
                            Triplet, TwoRooms, TwoRoomsConfig, TwoRoomsError, blocked_moves, contact_moves, empty_lab_state,
                            lab_trajectories, make_lab_state, render_two_rooms, render_walls, sample_frames,
                            solid_wall, two_rooms_trajectories, two_rooms_trajectories_naive)

CUBE = LabObject("cube", "red", "big", (1, 2))
BALL = LabObject("ball", "blue", "small", (1, 2))


# ---------------------------------------------------------------------------------------------
# lab world


def test_same_seed_same_world_different_seed_different_world():
    a, b, c = (lab_trajectories(3, 10, seed=s, policy="random") for s in (7, 7, 8))
    assert (a["images"] == b["images"]).all() and a["texts"] == b["texts"] and a["triplets"] == b["triplets"]
    assert (a["actions"] == b["actions"]).all()
    assert (a["images"] != c["images"]).any() and a["texts"] != c["texts"]
    w1, w2 = LabWorld(), LabWorld()
    assert (w1.reset(3).image == w2.reset(3).image).all() and w1.reset(3).text == w2.reset(3).text
    assert (w1.reset(3).image != w1.reset(4).image).any()


def test_scripted_trajectories_are_deterministic_too():
    a, b = (lab_trajectories(2, 20, seed=1, policy="scripted") for _ in range(2))
    assert (a["images"] == b["images"]).all() and a["texts"] == b["texts"]


def test_dataset_shapes_and_types():
    d = lab_trajectories(2, 5, seed=0, size=32)
    assert d["images"].shape == (2, 6, 32, 32, 3) and d["images"].dtype == np.uint8
    assert d["actions"].shape == (2, 5) and d["actions"].max() < len(ACTIONS)
    assert [len(t) for t in d["texts"]] == [6, 6] and [len(t) for t in d["triplets"]] == [5, 5]
    assert all(isinstance(t, Triplet) for trips in d["triplets"] for t in trips)
    frames = sample_frames(20, seed=1)
    assert frames.shape == (20, 64, 64, 3) and frames.dtype == np.uint8
    assert len({f.tobytes() for f in frames}) >= 18                      # (almost) no frame repeated


def test_observation_after_reset_and_step():
    world = LabWorld()
    obs = world.reset(0)
    assert obs.image.shape == (64, 64, 3) and obs.image.dtype == np.uint8 and obs.triplet is None and obs.text
    obs = world.step("move_north")
    assert isinstance(obs.triplet, Triplet) and obs.triplet.action == "move north"


def test_push_moves_the_object_and_the_agent_follows():
    world = LabWorld()
    before = world.set_state(empty_lab_state(agent=(1, 1), facing="east", objects=[CUBE]))
    obs = world.step("push")
    assert world.state.objects[0].cell == (1, 3) and world.state.agent == (1, 2)
    assert obs.triplet == Triplet("the big red cube", "push east", "the big red cube moves east")
    assert obs.text == "the agent pushes the big red cube east"
    assert (obs.image != before.image).any()


def test_push_against_a_wall_does_not_move_the_object():
    s = empty_lab_state(agent=(1, 1), facing="east", objects=[CUBE])
    s.v_edges[1, 2] = WALL                                                 # wall east of the cube
    world = LabWorld()
    world.set_state(s)
    obs = world.step("push")
    assert world.state.objects[0].cell == (1, 2) and world.state.agent == (1, 1)
    assert obs.triplet.result == "the big red cube does not move"


def test_pick_up_then_drop_relocates_the_object():
    world = LabWorld()
    world.set_state(empty_lab_state(agent=(1, 1), facing="east", objects=[BALL]))
    assert world.step("pick_up").triplet.result == "the agent holds the small blue ball"
    assert world.state.objects[0].cell is None and world.state.held == 0
    for a in ["move_south", "move_south", "move_south", "move_east"]: world.step(a)
    obs = world.step("drop")                                               # facing east from (4, 2)
    assert world.state.objects[0].cell == (4, 3) and world.state.held is None
    assert obs.triplet == Triplet("the small blue ball", "drop", "the small blue ball lies in the south-west room")


def test_big_objects_cannot_be_lifted_and_hands_hold_one_thing():
    world = LabWorld()
    world.set_state(empty_lab_state(agent=(1, 1), facing="east", objects=[CUBE]))
    assert world.step("pick_up").triplet.result == "the big red cube is too heavy to lift"
    assert world.state.held is None and world.state.objects[0].cell == (1, 2)
    two = [BALL, LabObject("ball", "green", "small", (2, 1))]
    world.set_state(empty_lab_state(agent=(1, 1), facing="east", objects=two))
    world.step("pick_up")
    world.step("move_south")                                               # bump into the green ball: face south
    assert world.step("pick_up").triplet.result == "the agent still holds the small blue ball"


def test_walls_block_movement():
    s = empty_lab_state(agent=(2, 3), facing="north")
    s.v_edges[2, 3] = WALL
    world = LabWorld()
    world.set_state(s)
    obs = world.step("move_east")
    assert world.state.agent == (2, 3) and world.state.facing == "east"
    assert obs.triplet.result == "the agent is blocked by a wall"
    world.set_state(empty_lab_state(agent=(0, 0), facing="north"))
    world.step("move_north")                                               # the grid's border
    world.step("move_west")
    assert world.state.agent == (0, 0)


def test_closed_door_blocks_until_opened():
    s = empty_lab_state(agent=(2, 3), facing="east")
    s.v_edges[:, 3] = WALL
    s.v_edges[2, 3] = CLOSED_DOOR
    world = LabWorld()
    world.set_state(s)
    for _ in range(3):
        assert world.step("move_east").triplet.result == "the agent is blocked by a closed door"
        assert world.state.agent == (2, 3)
    assert world.step("open_door").triplet == Triplet("the door", "open", "the door opens")
    assert world.state.v_edges[2, 3] == OPEN_DOOR
    assert world.step("open_door").triplet.result == "the door is already open"
    obs = world.step("move_east")
    assert world.state.agent == (2, 4) and obs.triplet.result == "the agent enters the north-east room"


def test_rooms_are_connected_in_every_generated_world():
    for seed in range(100):
        s = make_lab_state(seed)
        seen, todo = {s.agent}, [s.agent]
        while todo:
            r, c = todo.pop()
            for (dr, dc), code in (((0, 1), s.v_edges[r, c] if c < s.grid - 1 else WALL),
                                   ((1, 0), s.h_edges[r, c] if r < s.grid - 1 else WALL),
                                   ((0, -1), s.v_edges[r, c - 1] if c > 0 else WALL),
                                   ((-1, 0), s.h_edges[r - 1, c] if r > 0 else WALL)):
                nxt = (r + dr, c + dc)
                if code != WALL and nxt not in seen: seen.add(nxt); todo.append(nxt)
        assert len(seen) == s.grid ** 2, seed


def test_scripted_policy_fetches_objects_far_more_often_than_random():
    def picked(policy):
        d = lab_trajectories(30, 30, seed=2, policy=policy, size=8)
        return np.mean([any(t.result.startswith("the agent holds") for t in trips) for trips in d["triplets"]])
    scripted, random = picked("scripted"), picked("random")
    assert scripted >= 0.9 and scripted >= random + 0.4, (scripted, random)


@pytest.mark.parametrize("bad", ["jump", "move north", 8, -1, 2.0, None, True])
def test_unknown_actions_are_refused_with_the_list_of_actions(bad):
    world = LabWorld()
    world.reset(0)
    before = world.state.copy()
    with pytest.raises(LabWorldError, match="move_north"):
        world.step(bad)
    assert world.state.agent == before.agent and world.state.facing == before.facing


def test_bad_setup_is_refused():
    with pytest.raises(LabWorldError, match="reset"):
        LabWorld().step("push")
    with pytest.raises(LabWorldError, match="integer seed"):
        LabWorld().reset(None)
    with pytest.raises(LabWorldError, match="policy"):
        lab_trajectories(1, 1, policy="greedy")
    with pytest.raises(LabWorldError, match="grid"):
        LabWorld(LabConfig(grid=10)).set_state(empty_lab_state(grid=8))


# ---------------------------------------------------------------------------------------------
# two rooms


def reference_walls(wall_x, door_y, cfg=TwoRoomsConfig()):
    "eb_jepa two_rooms/env.py `_render_walls`, transcribed with numpy (one layout)."
    grid_x, grid_y = np.meshgrid(np.arange(cfg.img_size), np.arange(cfg.img_size), indexing="xy")
    half = cfg.wall_width // 2
    wall = (grid_x >= wall_x - half) & (grid_x <= wall_x + half)
    door = (door_y - cfg.door_space <= grid_y) & (grid_y <= door_y + cfg.door_space)
    res = (wall & ~door).astype(np.float32)
    b = cfg.border_wall_loc
    res[:, b - 1] = 1; res[:, -b] = 1; res[b - 1, :] = 1; res[-b, :] = 1
    return res


def test_observations_shape_dtype_and_reference_rendering():
    env = TwoRooms()
    obs = env.reset(16, seed=0)
    assert obs.shape == (16, 2, 65, 65) and obs.dtype == np.float32
    assert obs.min() >= 0 and obs.max() <= 1
    for i in range(16):
        assert (obs[i, 1] == reference_walls(env.wall_x[i], env.door_y[i])).all()
        x, y = env.positions[i]
        yy, xx = np.mgrid[0:65, 0:65]
        dot = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.3 ** 2))
        assert np.abs(obs[i, 0] - dot).max() < 1e-6
    assert set(env.wall_x) <= set(range(20, 45)) and set(env.door_y) <= set(range(10, 55))


def test_reset_is_deterministic_by_seed():
    a, b, c = TwoRooms(), TwoRooms(), TwoRooms()
    assert (a.reset(8, seed=1) == b.reset(8, seed=1)).all() and (a.goals == b.goals).all()
    c.reset(8, seed=2)
    assert not np.allclose(a.positions, c.positions)


def test_lab_rule_clips_actions_to_2_45():
    env = TwoRooms(TwoRoomsConfig(env_rule="lab"))
    env.reset(3, seed=0)
    env.wall_x[:] = 44; env.door_y[:] = 30                                 # wall far to the right
    env.positions = np.array([[20.0, 30.0], [20.0, 30.0], [20.0, 30.0]])
    env.step(np.array([[10.0, -10.0], [-3.0, 1.0], [0.5, 0.25]]))
    assert np.allclose(env.positions, [[22.45, 27.55], [17.55, 31.0], [20.5, 30.25]])


def test_agent_never_crosses_the_wall_except_through_the_door():
    env, rng = TwoRooms(), np.random.default_rng(0)
    env.reset(1_000, seed=5)
    crossings = 0
    for _ in range(200):
        before = env.positions.copy()
        env.step(rng.uniform(-3, 3, (env.n, 2)))
        after = env.positions
        assert not solid_wall(after, env.wall_x, env.door_y).any()
        assert ((after > 4) & (after < 60)).all()
        crossed = np.sign(before[:, 0] - env.wall_x) * np.sign(after[:, 0] - env.wall_x) < 0
        step = after - before
        y_at_wall = before[:, 1] + (env.wall_x - before[:, 0]) / np.where(crossed, step[:, 0], 1) * step[:, 1]
        assert (np.abs(y_at_wall - env.door_y)[crossed] <= 4).all()
        moved = (step != 0).any(1)
        t = np.linspace(0, 1, 50)[None, :, None]                           # the whole segment stays out of the wall
        seg = before[moved, None] + t * step[moved, None]
        wx, dy = np.repeat(env.wall_x[moved], 50), np.repeat(env.door_y[moved], 50)
        assert not solid_wall(seg.reshape(-1, 2), wx, dy).any()
        crossings += crossed.sum()
    assert crossings > 100                                                 # the property was exercised


def test_blocked_moves_agrees_with_dense_sampling_even_for_long_steps():
    rng = np.random.default_rng(1)
    n = 20_000
    wall_x, door_y = rng.integers(20, 45, n), rng.integers(10, 55, n)
    p0 = rng.uniform(5, 59, (n, 2))
    keep = ~solid_wall(p0, wall_x, door_y)
    p0, wall_x, door_y = p0[keep], wall_x[keep], door_y[keep]
    p1 = p0 + rng.uniform(-15, 15, p0.shape)                               # long steps cannot tunnel
    t = np.linspace(0, 1, 2_000)[None, :, None]
    brute = np.empty(len(p0), bool)
    for i in range(0, len(p0), 1_000):                                     # 2,000 points per segment, in chunks
        part = slice(i, i + 1_000)
        pts = (p0[part, None] + t * (p1[part] - p0[part])[:, None]).reshape(-1, 2)
        wx, dy = np.repeat(wall_x[part], 2_000), np.repeat(door_y[part], 2_000)
        inside = solid_wall(pts, wx, dy) | ((pts <= 4) | (pts >= 60)).any(1)
        brute[part] = inside.reshape(-1, 2_000).any(1)
    fast = blocked_moves(p0, p1, wall_x, door_y)
    assert 0.2 < fast.mean() < 0.9 and (fast == brute).all()


def test_blocked_moves_on_hand_made_segments():
    wall_x, door_y = np.array([30]), np.array([20])                        # wall x in [29, 31], door y in [16, 24]
    cases = {((25, 40), (35, 40)): True,                                   # straight through the wall
             ((25, 20), (35, 20)): False,                                  # straight through the door
             ((25, 16), (35, 16)): False,                                  # along the door's edge (inclusive)
             ((25, 15.9), (35, 15.9)): True,
             ((30, 20), (30, 26)): True,                                   # from the doorway up into the wall
             ((30, 17), (30, 23)): False,                                  # along the doorway
             ((26, 22), (34, 26)): True,                                   # enters the door, leaves through the wall
             ((28.9, 40), (28.9, 10)): False,                              # beside the wall, never touching it
             ((29, 40), (29, 39)): True,                                   # on the wall's face
             ((10, 10), (10, 10)): False,                                  # no move
             ((10, 10), (4, 10)): True, ((56, 56), (60, 56)): True,        # ends on the border
             ((10, 10), (4.01, 10)): False}
    for (p0, p1), expected in cases.items():
        got = blocked_moves(np.array([p0], float), np.array([p1], float), wall_x, door_y)[0]
        assert got == expected, (p0, p1)


def test_start_and_goal_are_in_different_rooms():
    env = TwoRooms()
    for seed in range(5):
        env.reset(1_000, seed=seed)
        half = 1
        start_left = env.positions[:, 0] < env.wall_x - half
        goal_left = env.goals[:, 0] < env.wall_x - half
        assert (start_left != goal_left).all()
        assert not ((np.abs(env.positions[:, 0] - env.wall_x) <= half) | (np.abs(env.goals[:, 0] - env.wall_x) <= half)).any()
        assert 0.35 < start_left.mean() < 0.65                             # both directions occur
        assert not env.success().any()


def test_success_iff_within_4_5_px():
    env = TwoRooms()
    env.reset(6, seed=0)
    offsets = np.array([0.0, 4.49, 4.5, 4.51, 10.0, 3.0])
    angle = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    env.positions = env.goals + offsets[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    assert env.success().tolist() == [True, True, False, False, False, True]
    env.reset(500, seed=1)
    rng = np.random.default_rng(0)
    env.positions = env.goals + rng.normal(0, 4, env.goals.shape)
    assert (env.success() == (np.linalg.norm(env.positions - env.goals, axis=1) < 4.5)).all()
    assert 0.1 < env.success().mean() < 0.9


def test_done_after_200_steps_and_no_step_beyond():
    env = TwoRooms()
    env.reset(2, seed=0)
    for t in range(200):
        _, done = env.step(np.zeros((2, 2)))
        assert done.shape == (2,) and done.all() == (t == 199)
    with pytest.raises(TwoRoomsError, match="reset"):
        env.step(np.zeros((2, 2)))


@pytest.mark.parametrize("bad", [np.zeros(2), np.zeros((3, 2)), np.zeros((2, 3)), np.zeros((2, 2, 1)),
                                 np.array([[0.0, np.nan], [0.0, 0.0]]), [["a", "b"], ["c", "d"]]])
def test_wrong_actions_are_refused_and_nothing_moves(bad):
    env = TwoRooms()
    env.reset(2, seed=0)
    before = env.positions.copy()
    with pytest.raises(TwoRoomsError, match="actions"):
        env.step(bad)
    assert (env.positions == before).all() and env.t == 0


def test_two_rooms_needs_reset_and_valid_sizes():
    with pytest.raises(TwoRoomsError, match="reset"):
        TwoRooms().step(np.zeros((1, 2)))
    with pytest.raises(TwoRoomsError, match="n >= 1"):
        TwoRooms().reset(0)
    with pytest.raises(TwoRoomsError, match="steps >= 1"):
        two_rooms_trajectories(4, steps=0)
    with pytest.raises(TwoRoomsError, match="render_two_rooms"):
        two_rooms_trajectories(100_000, steps=17, render=True)             # 61 GB: refused before allocating
    with pytest.raises(TwoRoomsError, match="positions"):
        render_two_rooms(np.zeros((3, 2)), np.array([30, 30]), np.array([20, 20]))


@pytest.mark.parametrize("seed,n", [(0, 5), (3, 40), (9, 200)])
def test_vectorised_generator_equals_the_naive_loop(seed, n):
    fast = two_rooms_trajectories(n, 17, seed=seed, render=True)
    slow = two_rooms_trajectories_naive(n, 17, seed=seed, render=True)
    assert (fast["wall_x"] == slow["wall_x"]).all() and (fast["door_y"] == slow["door_y"]).all()
    assert np.allclose(fast["positions"], slow["positions"], atol=1e-5, rtol=0)
    assert np.allclose(fast["actions"], slow["actions"], atol=1e-6, rtol=0)
    assert np.abs(fast["observations"] - slow["observations"]).max() < 1e-6
    blocked = (np.diff(fast["positions"], axis=1) == 0).all(-1)
    assert fast["positions"].shape == (n, 18, 2) and fast["actions"].shape == (n, 17, 2)
    assert n < 10 or blocked.any()                                         # the wall rule was exercised


def test_random_walks_follow_the_reference_statistics():
    d = two_rooms_trajectories(20_000, 17, seed=0)
    lengths = np.linalg.norm(d["actions"], axis=-1)
    assert lengths.min() >= 0.2 - 1e-6 and lengths.max() <= 1.8 + 1e-6 and abs(lengths.mean() - 1.0) < 0.02
    p = d["positions"].astype(np.float64).reshape(-1, 2)
    assert not solid_wall(p, np.repeat(d["wall_x"], 18), np.repeat(d["door_y"], 18)).any()
    side = np.sign(d["positions"][..., 0] - d["wall_x"][:, None])
    crossed = (side[:, :1] * side < 0).any(1).mean()
    none = two_rooms_trajectories(20_000, 17, seed=0, config=TwoRoomsConfig(cross_wall_rate=0.0))
    side0 = np.sign(none["positions"][..., 0] - none["wall_x"][:, None])
    assert crossed > (side0[:, :1] * side0 < 0).any(1).mean() + 0.1
    assert (render_walls(d["wall_x"][:3], d["door_y"][:3]) == np.stack([reference_walls(w, y) for w, y in
                                                                         zip(d["wall_x"][:3], d["door_y"][:3])])).all()


def test_eb_jepa_rule_does_not_clip_and_stops_steps_at_the_wall():
    env = TwoRooms()                                                       # eb_jepa's DotWall rule is the default
    env.reset(4, seed=0)
    env.wall_x[:] = 30; env.door_y[:] = 20                                 # wall x in [29, 31], door y in [16, 24]
    env.positions = np.array([[10.0, 40.0], [25.0, 40.0], [25.0, 20.0], [30.0, 20.0]])
    env.step(np.array([[6.0, -5.0], [10.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    p = env.positions
    assert np.allclose(p[0], [16.0, 35.0])                                 # a free step of norm 7.8: not clipped
    assert 28.0 < p[1, 0] < 29.0 and abs(p[1, 1] - 40.0) < 2.5            # into the wall: stops at its face, pushed back
    assert np.allclose(p[2], [35.0, 20.0])                                 # through the door
    assert 19.0 < p[3, 1] < 24.0                                           # up out of the doorway: stops at its top edge


def test_contact_moves_without_noise_on_hand_made_steps():
    wall_x, door_y = np.array([30.0]), np.array([20.0])
    cases = {((25, 40), (10, 0)): (28.7, 40.0), ((25, 20), (10, 0)): (35.0, 20.0), ((30, 20), (0, 10)): (30.0, 24.0),
             ((30, 20), (0, -10)): (30.0, 16.0), ((10, 10), (-10, 0)): (4.3, 10.0), ((10, 10), (0, -10)): (10.0, 4.3),
             ((40, 40), (-10, 0)): (31.3, 40.0), ((10, 10), (3, 4)): (13.0, 14.0)}
    for (p0, a), expected in cases.items():
        got = contact_moves(np.array([p0], float), np.array([a], float), wall_x, door_y)[0]
        assert np.allclose(got, expected), (p0, a, got)


def test_env_rule_is_checked_and_the_contact_noise_is_seeded():
    with pytest.raises(TwoRoomsError, match="env_rule"):
        TwoRooms(TwoRoomsConfig(env_rule="bounce"))
    runs = []
    for _ in range(2):
        env = TwoRooms(); env.reset(50, seed=3)
        for _ in range(30): env.step(np.full((50, 2), 2.0))                 # many steps into walls: noise matters
        runs.append(env.positions.copy())
    assert np.array_equal(runs[0], runs[1])
