"Dreaming MoE (jepa_lab.dreams): routing promises, the balance loss in the objective, learning, dreams with provenance, graph files, bad input."
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jepa_lab.core import Run, seed_everything, weights_equal
from jepa_lab.dreams import (DreamError, DreamingMoE, DreamTriplet, MoEConfig, MoETrainConfig, balance_ablation, capacity_keep,
                             dense_moe_forward, dream, dream_explorer, dream_graph, evaluate_moe, expert_capacity, frame_encoder,
                             latest_dream_graph, load_dream_graph, moe_loss, save_dream_graph, train_moe, walk_transitions)

STEPS = 8  # actions per walk


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny ops throughout: one torch thread (see conftest)."


@pytest.fixture(scope="module")
def lab(small_lab):
    "A small lab: a bank of 40 walks (their transitions are the training set) and 15 held-out walks from other worlds."
    lab = small_lab(40, STEPS, test_walks=15)
    assert "random-init" in lab.encoder_name
    bank = lab.bank
    train_set = walk_transitions(lab.latents, lab.walks.actions)
    test_set = walk_transitions(lab.test_latents, lab.test_walks.actions)
    return bank, train_set, test_set


def small_moe(dim=16, **kw):
    seed_everything(0)
    return DreamingMoE(MoEConfig(dim, 8, hidden=16, **kw))


def batch(n=32, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), F.one_hot(torch.randint(0, 8, (n,), generator=g), 8).float()


# ---------------------------------------------------------------- routing

@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_top_k_routing_picks_exactly_k_experts(k):
    model = small_moe(top_k=k)
    for training in (True, False):
        model.train(training)
        out = model(*batch())
        assert ((out.gates > 0).sum(1) == k).all()
        assert torch.allclose(out.gates.sum(1), torch.ones(32))
        assert all(len(set(row)) == k for row in out.chosen.tolist())                 # k distinct experts
        assert torch.equal(out.gates.topk(k, 1).indices.sort(1).values, out.chosen.sort(1).values)


def test_gate_noise_only_while_training():
    model = small_moe()
    z, a = batch()
    model.eval()
    assert torch.equal(model(z, a).probs, model(z, a).probs)
    model.train()
    assert not torch.equal(model(z, a).probs, model(z, a).probs)


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_capacity_is_respected_and_dropped_tokens_pass_through(factor):
    model = small_moe(capacity_factor=factor).eval()
    with torch.no_grad():
        for e in model.experts: e.f[-1].bias.fill_(1.0)                          # every expert changes z
    z, a = batch(64)
    out = model(z, a)
    cap = expert_capacity(64, model.config)
    kept_load = F.one_hot(out.chosen, 4)[out.kept].sum(0)
    assert kept_load.max() <= cap
    if factor < 1: assert (~out.kept).any()                                      # something was dropped and counted
    passed = ~out.kept.any(1)                                                    # every assignment of these tokens dropped
    assert torch.equal(out.z_next[passed], z[passed])                            # copy-last for them
    assert not torch.allclose(out.z_next[~passed], z[~passed])


def test_dispatch_equals_dense_mixture():
    model = small_moe().eval()
    with torch.no_grad():
        for e in model.experts: e.f[-1].weight.normal_(0, 0.3)                     # experts that differ
    z, a = batch(64)
    assert torch.allclose(model(z, a).z_next, dense_moe_forward(model, z, a), atol=1e-5)
    with pytest.raises(DreamError, match="eval"):
        dense_moe_forward(model.train(), z, a)


def test_capacity_priority_first_choices_then_batch_order():
    chosen = torch.tensor([[0, 1], [1, 0], [0, 1]])
    # expert 0 queue: tokens 0, 2 (first choices), then token 1's second choice -> over capacity 2
    assert capacity_keep(chosen, 2, 2).tolist() == [[True, True], [True, False], [True, False]]


# ---------------------------------------------------------------- balance loss

def test_balance_loss_alone_gives_the_router_gradient():
    model = small_moe().train()
    out = model(*batch())
    out.balance.backward()
    assert model.w_gate.weight.grad.abs().sum() > 0 and model.w_noise.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.experts.parameters())


def test_balance_loss_is_in_the_objective():
    z, a = batch()
    target = torch.randn_like(z)
    grads = {}
    for w in (0.0, 0.5):
        model = small_moe().train()
        torch.manual_seed(1)                                                     # same gate noise in both
        out = model(z, a)
        loss, terms = moe_loss(out, target, w)
        assert torch.isclose(loss, terms["task"] + w * terms["balance"])
        loss.backward()
        grads[w] = model.w_gate.weight.grad.clone()
    model = small_moe().train(); torch.manual_seed(1)
    model(z, a).balance.backward()
    assert torch.allclose(grads[0.5] - grads[0.0], 0.5 * model.w_gate.weight.grad, atol=1e-6)


def test_balance_loss_raises_usage_entropy(lab, tmp_path):
    "From a collapsed router (+2 bias on two experts), the balance loss must lift usage entropy by > 0.3 nats (seeded)."
    bank, train_set, test_set = lab
    rows = balance_ablation(train_set, test_set, MoEConfig(bank.dim), MoETrainConfig(steps=250, batch_size=64),
                            tmp_path, weights=(0.0, 0.05), seeds=(0,), skew=2.0)
    without, with_ = (r["usage_entropy"] for r in rows)
    print(f"usage entropy without {without:.3f}, with {with_:.3f} nats")
    assert without < 1.0                                                          # stays collapsed on two experts (ln 2 = 0.69)
    assert with_ > without + 0.3, (without, with_)


# ---------------------------------------------------------------- learning

def test_moe_beats_copy_last_on_held_out_transitions(lab, tmp_path):
    bank, train_set, test_set = lab
    seed_everything(0)
    model = DreamingMoE(MoEConfig(bank.dim))
    rows = train_moe(model, train_set, MoETrainConfig(steps=300, batch_size=64), Run(tmp_path))
    result = evaluate_moe(model, test_set)
    assert result["mse"] < 0.5 * result["copy_last_mse"], result
    assert rows[-1]["task"] < rows[0]["task"] and "usage_entropy" in rows[0] and "router_entropy" in rows[0]


def test_training_resumes_exactly(lab, tmp_path):
    bank, train_set, _ = lab
    cfg = MoEConfig(bank.dim, hidden=16)
    seed_everything(0); straight = DreamingMoE(cfg)
    train_moe(straight, train_set, MoETrainConfig(steps=20, batch_size=16), Run(tmp_path / "straight"))
    seed_everything(0); resumed = DreamingMoE(cfg)
    train_moe(resumed, train_set, MoETrainConfig(steps=10, batch_size=16), Run(tmp_path / "resumed"))
    seed_everything(123); again = DreamingMoE(cfg)                                # other RNG: the checkpoint restores it
    train_moe(again, train_set, MoETrainConfig(steps=20, batch_size=16), Run(tmp_path / "resumed"))
    assert weights_equal(straight.state_dict(), again.state_dict())


# ---------------------------------------------------------------- dreams and the graph

def test_dream_triplets_carry_provenance(lab):
    bank, train_set, _ = lab
    model = small_moe(bank.dim)
    triplets, dreamed = dream(model, bank, [0, 5, 9], horizon=3, seed=7, run_id="test-run")
    assert len(triplets) == 9 and dreamed.z.shape == (9, bank.dim) and dreamed.a.shape == (9, 8)
    for d in triplets:
        assert None not in vars(d).values()
        assert d.seed == 7 and d.run == "test-run" and d.source in (0, 5, 9) and 0 <= d.step < 3
        assert d.what == bank.scenes[d.what_id] and d.result == bank.scenes[d.result_id] and 0 <= d.expert < 4
    assert [d.what_id for d in triplets[:3]] == [0, 5, 9]                          # step 0 starts at the real source
    by_source = {s: [d for d in triplets if d.source == s] for s in (0, 5, 9)}
    for chain in by_source.values():                                              # each step starts where the last ended
        assert all(a.result_id == b.what_id for a, b in zip(chain, chain[1:]))
    fields = dict(what="w", action="push", result="r", what_id=0, result_id=1, expert=0, gate=1.0, step=0, seed=0, source=0,
                  run="x", distance=0.0)
    with pytest.raises(DreamError, match="expert"):
        DreamTriplet(**{**fields, "expert": None})
    with pytest.raises(DreamError, match="run is None"):
        dream(model, bank, [0], horizon=1, seed=7, run_id=None)


def test_dream_graph_round_trip_and_safe_files(lab, tmp_path):
    bank, _, _ = lab
    triplets, _ = dream(small_moe(bank.dim), bank, range(6), horizon=2, seed=1, run_id="r")
    graph = dream_graph(triplets)
    assert graph.number_of_edges() == len(triplets)
    path = save_dream_graph(graph, tmp_path / "g.json")
    again = load_dream_graph(path)
    assert dict(again.nodes(data=True)) == dict(graph.nodes(data=True))
    assert sorted(again.edges(keys=True, data=True), key=str) == sorted(graph.edges(keys=True, data=True), key=str)
    assert all(d["source"] in range(6) for _, _, d in again.edges(data=True))
    before = path.read_bytes()
    graph.add_edge("s0", "s1", action=object())                                   # not JSON: the save fails ...
    with pytest.raises(TypeError):
        save_dream_graph(graph, path)
    assert path.read_bytes() == before                                            # ... and the old file is intact
    (tmp_path / "bad.json").write_text(before.decode()[:100])
    with pytest.raises(DreamError, match="not valid JSON"):
        load_dream_graph(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"nodes": []}))
    with pytest.raises(DreamError, match="not a jepa-lab dream graph"):
        load_dream_graph(tmp_path / "other.json")
    with pytest.raises(DreamError, match="does not exist"):
        load_dream_graph(tmp_path / "missing.json")
    with pytest.raises(DreamError, match="run lesson 08"):
        latest_dream_graph(tmp_path)
    newest = save_dream_graph(again, tmp_path / "08_dreams-20990101-000000" / "dream_graph.json")
    assert latest_dream_graph(tmp_path) == newest
    import os
    os.utime(newest, (1, 1))                                                      # older than the course's one below
    in_course = save_dream_graph(again, tmp_path / "course-20990101-000000" / "08_dreams" / "dream_graph.json")
    assert latest_dream_graph(tmp_path) == in_course                              # `jepa-lab course` names runs without time


def test_explorer_steps_headless(lab):
    bank, _, _ = lab
    panel = dream_explorer(small_moe(bank.dim), bank, "r", sources=[3, 4])
    for name in ("move_north", "pick_up"):
        panel.action.value = name
        panel.step_button.click()
    assert [d.action for d in panel.state["triplets"]] == ["move_north", "pick_up"]
    assert panel.state["triplets"][0].what_id == 3
    panel.start.value = 4                                                         # a new start restarts the dream
    assert panel.state["triplets"] == [] and panel.state["here"] == 4


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_clear_errors(lab):
    bank, _, _ = lab
    with pytest.raises(DreamError, match="top_k=5"):
        MoEConfig(16, n_experts=4, top_k=5)
    with pytest.raises(DreamError, match="at least one expert"):
        MoEConfig(16, n_experts=0, top_k=1)
    with pytest.raises(DreamError, match="capacity_factor"):
        MoEConfig(16, capacity_factor=0)
    model = small_moe()
    z, a = batch()
    with pytest.raises(DreamError, match=r"\(B, 16\)"):
        model(torch.randn(32, 15), a)
    with pytest.raises(DreamError, match="actions"):
        model(z, a[:, :7])
    z[3, 2] = float("nan")
    with pytest.raises(DreamError, match="NaN"):
        model(z, a)
    with pytest.raises(DreamError, match="latents must be"):
        bank.nearest(torch.zeros(2, bank.dim + 1))
    with pytest.raises(DreamError, match="horizon"):
        dream(small_moe(bank.dim), bank, [0], horizon=0, seed=0, run_id="r")
    with pytest.raises(DreamError, match="bank indices"):
        dream(small_moe(bank.dim), bank, [len(bank.scenes)], horizon=1, seed=0, run_id="r")
    with pytest.raises(DreamError, match="actions must be"):
        walk_transitions(torch.zeros(2, 5, 4), np.zeros((2, 5), np.int64))


def test_frame_encoder_names_an_unknown_source(tmp_path):
    with pytest.raises(DreamError, match="encoder 'pretrained'"): frame_encoder(tmp_path, seed=0, source="pretrained")
