"Dream trees (jepa_lab.dream_trees): tree shape and budget, provenance, real outcomes, drift, Graph RAG, the explorer, bad input."
import networkx as nx
import numpy as np
import pytest
import torch

from jepa_lab.core import Run, seed_everything
from jepa_lab.dream_learning import dream_provenance
from jepa_lab.dream_trees import (ROOT, DreamTree, DreamTreeError, LabReplay, WordEncoder, ask_tree, disagreement_vs_error,
                                  drift_table, dream_tree, expert_step, measure_drift, plot_dream_tree, situation_entity,
                                  tree_explorer, tree_facts, tree_layout, tree_store)
from jepa_lab.dreams import (DreamError, DreamingMoE, MoEConfig, MoETrainConfig, dream_graph, lab_walks, train_moe,
                             walk_transitions)
from jepa_lab.world import ACTIONS, LabObject, LabWorld, empty_lab_state

STEPS = 8  # actions per walk


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny ops throughout: one torch thread (see conftest)."


@pytest.fixture(scope="module")
def lab(tmp_path_factory, small_lab):
    "40 walks, their bank and replay, an untrained MoE (every expert starts as copy-last) and one trained for 300 steps."
    small = small_lab(40, STEPS)
    walks, bank = small.walks, small.bank
    data = walk_transitions(small.latents, walks.actions)
    seed_everything(0)
    fresh = DreamingMoE(MoEConfig(bank.dim, hidden=16)).eval()
    seed_everything(0)
    trained = DreamingMoE(MoEConfig(bank.dim, hidden=32))
    train_moe(trained, data, MoETrainConfig(steps=300, batch_size=64), Run(tmp_path_factory.mktemp("moe")), desc="test")
    return walks, bank, LabReplay(walks, bank), fresh, trained.eval()


# ---------------------------------------------------------------- shape and budget

@pytest.mark.parametrize("actions,depth,beam", [(["move_east", "push"], 1, 1), (["move_north", "move_west", "drop"], 2, 2),
                                                (["move_south", "open_door"], 3, 3), (None, 2, 1)])
def test_tree_shape_and_branching_budget(lab, actions, depth, beam):
    _, bank, replay, fresh, _ = lab
    tree = dream_tree(fresh, bank, 3, actions=actions, depth=depth, beam=beam, replay=replay)
    A, E = len(actions or ACTIONS), fresh.config.n_experts
    g = tree.graph
    assert g.number_of_nodes() == 1 + A * E * (1 + beam * (depth - 1)) and nx.is_tree(g)
    assert max(d for _, d in g.nodes(data="depth")) == depth
    expanded = [n for n in g if g.out_degree(n)]
    assert all(g.out_degree(n) == A * E for n in expanded)                       # every action x every expert
    for level in range(1, depth):                                                # the beam: the most probable nodes
        nodes = [n for n, d in g.nodes(data="depth") if d == level]
        chosen = [n for n in nodes if g.out_degree(n)]
        assert len(chosen) == beam
        assert min(g.nodes[n]["prob"] for n in chosen) >= max(g.nodes[n]["prob"] for n in nodes if n not in chosen)
    assert tree.expand(ROOT, actions) == list(g.successors(ROOT))                # expanding twice adds nothing
    assert g.number_of_nodes() == 1 + A * E * (1 + beam * (depth - 1))


def test_children_are_each_experts_own_prediction(lab):
    _, bank, _, _, trained = lab
    tree = dream_tree(trained, bank, 7, actions=["move_east", "pick_up"], depth=1)
    z = bank.latents[7][None]
    for i, a in enumerate(["move_east", "pick_up"]):
        one_hot = torch.nn.functional.one_hot(torch.tensor([ACTIONS.index(a)]), len(ACTIONS)).float()
        for e, expert in enumerate(trained.experts):
            with torch.no_grad(): own = expert(z, one_hot)[0]
            node = f"{ROOT}/{a}@{e}"
            assert torch.allclose(tree.latents[node], own, atol=1e-6)
            idx, dist = bank.nearest(own[None])
            assert tree.graph.nodes[node]["bank_index"] == int(idx) and tree.graph.nodes[node]["distance"] == pytest.approx(float(dist))
    step = expert_step(trained, z.expand(2, -1), torch.tensor([ACTIONS.index("move_east"), ACTIONS.index("pick_up")]))
    assert torch.allclose(step.routed - z, (step.gates[..., None] * (step.own - z[:, None])).sum(1), atol=1e-5)


# ---------------------------------------------------------------- provenance

def test_every_edge_carries_provenance(lab):
    _, bank, replay, _, trained = lab
    tree = dream_tree(trained, bank, 11, actions=["move_north", "push", "drop"], depth=2, beam=2, replay=replay,
                      run_id="run-x", seed=5)
    for u, v, d in tree.graph.edges(data=True):
        for key in ("action", "expert", "gate", "prob", "step", "seed", "source", "run", "distance", "what_id", "result_id"):
            assert d.get(key) is not None, (u, v, key)
        assert d["source"] == 11 and d["run"] == "run-x" and d["seed"] == 5 and d["step"] == tree.graph.nodes[u]["depth"]
        assert (d["gate"] > 0) == d["chosen"]
    for node in [n for n in tree.graph if tree.graph.out_degree(n)]:          # per action: top-2 gates, probabilities sum 1
        for a in ("move_north", "push", "drop"):
            edges = [tree.graph.edges[node, k] for k in tree.graph.successors(node) if tree.graph.edges[node, k]["action"] == a]
            assert sum(e["chosen"] for e in edges) == trained.config.top_k
            assert sum(e["prob"] for e in edges) == pytest.approx(1, abs=1e-5)
            assert sum(e["gate"] for e in edges) == pytest.approx(1, abs=1e-5)
    triplets = tree.triplets()
    rows = dream_provenance(triplets)
    assert len(rows) == tree.graph.number_of_edges() and all(r["run"] == "run-x" and r["source"] == 11 for r in rows)
    assert dream_graph(triplets).number_of_edges() == len(triplets)


# ---------------------------------------------------------------- the real outcome

def test_real_outcome_of_a_known_move_in_an_empty_room(lab):
    _, bank, replay, _, _ = lab
    room = empty_lab_state(agent=(2, 2), facing="east", objects=[LabObject("cube", "blue", "small", (6, 6))])
    frames, texts = replay.outcome(room, ["move_east", "move_east", "push", "move_south"])
    world = LabWorld(size=bank.frames.shape[1])
    for k, cell in enumerate([(2, 3), (2, 4), (2, 4), (3, 4)]):
        expect = room.copy(); expect.agent = cell; expect.facing = "south" if k == 3 else "east"
        world.set_state(expect)
        assert np.array_equal(frames[k], world.render()), k
    assert texts[0] == "the agent moves east" and "nothing" in texts[2]


def test_tree_real_outcomes_replay_the_world(lab):
    walks, bank, replay, fresh, _ = lab
    j = 9
    i, t = replay.where(j)
    assert bank.situation_of[i * (STEPS + 1) + t] == j                          # the first frame of situation j
    world = LabWorld(size=bank.frames.shape[1])
    world.reset(int(walks.seeds[i]))
    for a in walks.actions[i, :t]: world.step(int(a))
    assert np.array_equal(world.render(), bank.frames[j])
    tree = dream_tree(fresh, bank, j, actions=["move_east", "move_north"], depth=2, beam=1, replay=replay)
    deep = [n for n, d in tree.graph.nodes(data="depth") if d == 2][0]
    path = tree.graph.nodes[deep]["path"]
    for a in path: obs = world.step(a)
    assert np.array_equal(tree.real(deep)["frame"], obs.image) and tree.real(deep)["scene"] == obs.text


def test_copy_last_experts_hit_exactly_where_the_real_step_is_a_no_op(lab):
    "An untrained MoE's experts all copy the latent: each child reads back as its source, right iff the real action changed nothing."
    _, bank, replay, fresh, _ = lab
    for j in (0, 4, 13):
        tree = dream_tree(fresh, bank, j, depth=1, replay=replay)
        for n, d in tree.graph.nodes(data=True):
            if n == ROOT: continue
            assert d["bank_index"] == j and d["distance"] < 1e-6
            if d["real_distance"] < 1e-6: assert d["hit"] == (not d["real_changed"]), (j, n)
            assert d["latent_error"] == pytest.approx(float((bank.latents[j] - tree.real(n)["latent"]).pow(2).mean().sqrt()), abs=1e-5)
        assert {a for a in ACTIONS if tree.real(f"{ROOT}/{a}@0")["changed"]} == set(replay.changing_actions(j))


# ---------------------------------------------------------------- drift

def test_drift_a_trained_moe_beats_copy_last_and_copy_last_experts_equal_it(lab):
    _, bank, replay, fresh, trained = lab
    sources = range(0, 120, 2)
    drift = measure_drift(trained, bank, replay, sources, 2, seed=0)
    assert drift.real.shape == (60, 3, bank.dim) and drift.own.shape == (4, 60, 3, bank.dim) and drift.spread.shape == (60, 2)
    assert torch.equal(drift.routed[:, 0], drift.real[:, 0]) and torch.equal(drift.real_index[:, 0], torch.as_tensor(drift.sources))
    err = {(r["dreamer"], r["step"]): r for r in drift_table(drift, bank)}
    assert err["MoE", 1]["error"] < 0.6 * err["copy-last", 1]["error"]          # learning: it dreams real change
    assert err["MoE", 1]["hit_changed"] > err["copy-last", 1]["hit_changed"] + 0.3
    warn = disagreement_vs_error(drift, bank)
    assert len(warn) == 2 and all(-1 <= r["spearman"] <= 1 for r in warn)
    still = measure_drift(fresh, bank, replay, sources, 2, seed=0)                # every expert copies: all dreamers equal
    rows = {(r["dreamer"], r["step"]): r["error"] for r in drift_table(still, bank)}
    assert rows["MoE", 2] == pytest.approx(rows["copy-last", 2]) == pytest.approx(rows["expert 3", 2])
    assert torch.all(still.spread == 0)


# ---------------------------------------------------------------- Graph RAG and the picture

def test_tree_store_keeps_every_claim_with_provenance_and_is_idempotent(lab, tmp_path):
    _, bank, replay, _, trained = lab
    tree = dream_tree(trained, bank, 6, actions=["move_west", "drop"], depth=2, beam=1, replay=replay, run_id="r1")
    triples, sources, confidence = tree_facts(tree)
    assert len(triples) == tree.graph.number_of_edges() + len(tree.reals) - 1
    assert sum(s.startswith("real: LabWorld replay") for s in sources) == len(tree.reals) - 1
    store = tree_store(tree, tmp_path)
    n = store.count()
    assert n == len(set(triples)) and all(f.run == "r1" for f in store.facts())
    store.close()
    with tree_store(tree, tmp_path) as again: assert again.count() == n         # ingest again: nothing doubled
    found = ask_tree(tree, "what does drop do in s6?", tmp_path, k=5)
    assert situation_entity(bank, 6) in found.seeds
    assert found.facts[0].fact.relation.startswith("drop") and len(found.facts) <= 5
    assert all(sf.fact.source.startswith(("dream: expert", "real: LabWorld")) for sf in found.facts)


def test_word_encoder_links_situation_ids(lab):
    _, bank, _, _, _ = lab
    enc = WordEncoder([situation_entity(bank, j) for j in range(len(bank.scenes))])
    sims = torch.nn.functional.normalize(enc(["s17"]), dim=-1) @ torch.nn.functional.normalize(
        enc([situation_entity(bank, j) for j in range(len(bank.scenes))]), dim=-1).T
    assert int(sims.argmax()) == 17
    with pytest.raises(DreamTreeError, match="word"): WordEncoder(["", "!!"])


def test_plot_and_layout(lab):
    import matplotlib.pyplot as plt
    _, bank, replay, fresh, _ = lab
    tree = dream_tree(fresh, bank, 2, actions=["move_east", "push"], depth=2, beam=1, replay=replay)
    rows = tree_layout(tree)
    assert [len(r) for r in rows.values()] == [1, 2 * (4 + 1), 2 * (4 + 1)]     # each sibling group: real + 4 experts
    fig, ax = plt.subplots()
    plot_dream_tree(tree, ax)
    assert len(ax.artists) == sum(len(r) for r in rows.values())
    plt.close(fig)


# ---------------------------------------------------------------- the explorer

def test_explorer_expands_and_queries_headless(lab, tmp_path):
    _, bank, replay, _, trained = lab
    panel = tree_explorer(trained, bank, replay, "r", sources=[3, 8], actions=["move_east", "push"], folder=tmp_path)
    assert len(panel.child_menu.options) == 2 * 4 and panel.state["node"] == ROOT
    child = panel.child_menu.options[5][1]
    panel.child_menu.value = child
    panel.go_button.click()
    tree = panel.state["tree"]
    assert panel.state["node"] == child and tree.graph.out_degree(child) == 8   # dreamed on arrival
    panel.query.value = f"s{tree.graph.nodes[child]['bank_index']} push"
    found = panel.state["retrieval"]
    assert found.facts and found.facts[0].fact.relation.startswith("push")
    panel.up_button.click()
    assert panel.state["node"] == ROOT
    panel.query.value = "   "                                                    # an empty question: a message, no crash
    panel.ask_button.click()
    panel.situation.value = 8                                                    # another situation restarts the tree
    assert panel.state["tree"].source == 8 and panel.state["node"] == ROOT


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_clear_errors(lab, tmp_path):
    walks, bank, replay, fresh, _ = lab
    for j in (-1, len(bank.scenes), "3", True, 2.0):
        with pytest.raises(DreamTreeError, match="unknown situation"): dream_tree(fresh, bank, j)
    with pytest.raises(DreamTreeError, match="depth"): dream_tree(fresh, bank, 0, depth=0)
    with pytest.raises(DreamTreeError, match="beam"): dream_tree(fresh, bank, 0, beam=0)
    with pytest.raises(DreamTreeError, match="unknown action"): dream_tree(fresh, bank, 0, actions=["fly"])
    with pytest.raises(DreamTreeError, match="no actions"): dream_tree(fresh, bank, 0, actions=[])
    tree = DreamTree(fresh, bank, 0)
    with pytest.raises(DreamTreeError, match="no node"): tree.expand("root/fly@9")
    assert tree.real(ROOT) is None                                               # no replay: no real outcome, said so
    with pytest.raises(DreamTreeError, match="latents"): DreamTree(DreamingMoE(MoEConfig(bank.dim + 1)), bank, 0)
    with pytest.raises(DreamTreeError, match="same walks"): LabReplay(lab_walks(3, STEPS, seed=1), bank)
    with pytest.raises(DreamTreeError, match="horizon"): measure_drift(fresh, bank, replay, [0, 1], 0, seed=0)
    with pytest.raises(DreamTreeError, match="empty"): ask_tree(tree, " ", tmp_path)
    with pytest.raises(DreamTreeError, match="unknown situation"): tree_explorer(fresh, bank, replay, "r", sources=[10**6])
    drift = measure_drift(fresh, bank, replay, [0, 1, 2], 1, seed=0)
    with pytest.raises(DreamTreeError, match="spread"): disagreement_vs_error(drift, bank, "variance")
    assert issubclass(DreamTreeError, DreamError) and issubclass(DreamTreeError, ValueError)
    assert list(tmp_path.iterdir()) == []                                       # nothing written by the failures
