"The lab agent (jepa_lab.agent): perception, tasks, plans, retrieval, the loop and its ablations, traces, bad input."
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from jepa_lab.agent import (ABLATIONS, CHOICES, OUTCOMES, TASK_KINDS, AgentConfig, AgentError, LabAgent, Task,
                            agent_parts, bring_plans, can_lift, carried_out, evaluate_agent, facing_situations,
                            gold_facts, lab_tasks, lift_energies, perceive_frame, plot_trace, retrieval_recall,
                            retrieve_facts, tofy_from_models, trace_panel, world_facts)
from jepa_lab.core import CheckpointError, Run, torch_threads
from jepa_lab.dreams import MoETrainConfig, frame_encoder
from jepa_lab.graph_rag import TripletStore
from jepa_lab.world import LabWorld, make_lab_state, render_lab, room_of

TEST = range(20_000, 20_012)      # held-out worlds of these tests (the lesson uses 10_000 up)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny ops throughout: one torch thread (see conftest)."


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    "An agent that learned on 80 worlds: a dream model trained for 250 steps on the seeded random-init ViT's latents."
    with torch_threads(1):                      # a module fixture runs before the autouse one-thread fixture
        encoder, name = frame_encoder(Path("no-checkpoint-needed"), seed=0, source="random")
        return agent_parts(encoder, name, range(80), Run(tmp_path_factory.mktemp("dream")), MoETrainConfig(steps=250), seed=0)


# ---------------------------------------------------------------- perceive

def test_perceive_reads_every_world_exactly():
    for seed in range(30):
        true, seen = make_lab_state(seed), perceive_frame(LabWorld().reset(seed).image)
        key = lambda s: sorted((o.cell, o.colour, o.shape, o.size) for o in s.objects)
        assert key(seen) == key(true) and seen.agent == true.agent and seen.facing == true.facing and seen.split == true.split
        assert np.array_equal(seen.v_edges, true.v_edges) and np.array_equal(seen.h_edges, true.h_edges)
        assert sorted(world_facts(seen)) == sorted(world_facts(true))


@pytest.mark.parametrize("image,words", [(np.zeros((10, 10, 3), np.uint8), "multiple of grid"),
                                         (np.zeros((64, 64), np.uint8), "(S, S, 3)"),
                                         (np.full((64, 64, 3), 7, np.uint8), "no floor colour")])
def test_perceive_rejects_what_is_not_a_lab_frame(image, words):
    with pytest.raises(AgentError, match=words.replace("(", r"\(").replace(")", r"\)")):
        perceive_frame(image)


# ---------------------------------------------------------------- tasks

def test_tasks_have_exact_answers_from_the_true_world():
    tasks = lab_tasks(range(40))
    assert {t.kind for t in tasks} == set(TASK_KINDS)
    for t in tasks:
        s = make_lab_state(t.world_seed)
        obj = {o.name: o for o in s.objects}.get(t.subject)
        if t.kind == "where": assert t.answer == room_of(s, obj.cell)
        if t.kind == "lift": assert t.answer == ("yes" if obj.size == "small" else "no")   # the world's rule, found by acting
        if t.kind == "bring": assert obj.size == "small" and t.target != room_of(s, obj.cell)
        if t.kind == "more":
            a, b = [r for r in ("north-west room", "north-east room", "south-west room", "south-east room") if r in t.question]
            count = lambda r: sum(room_of(s, o.cell) == r for o in s.objects)
            assert count(t.answer) > count(b if t.answer == a else a)
        assert obj is None or obj.size not in t.question           # the size is for the agent to see
    assert {t.world_seed for t in lab_tasks(TEST)}.isdisjoint(range(40))


def test_task_errors_name_the_problem():
    with pytest.raises(AgentError, match="unknown task kinds"): lab_tasks([0], kinds=("where", "why"))
    with pytest.raises(AgentError, match="Task.kind"): Task(0, "why", "Why?", "because")
    with pytest.raises(AgentError, match="empty"): Task(0, "where", "  ", "north-west room")
    with pytest.raises(AgentError, match="gold facts"): gold_facts(next(t for t in lab_tasks([0]) if t.kind == "lift"))


def test_can_lift_is_what_the_world_does():
    decided = 0
    for seed in range(20):
        s = make_lab_state(seed)
        for i, o in enumerate(s.objects):
            if (lifts := can_lift(s, i)) is None: continue             # boxed in: nowhere to stand
            assert lifts == (o.size == "small"); decided += 1
    assert decided >= 70


# ---------------------------------------------------------------- plan

def test_plans_that_open_doors_carry_out_and_plans_that_ignore_them_mostly_fail():
    tasks = [t for t in lab_tasks(range(60)) if t.kind == "bring"][:50]
    def shortest_works(t, doors):
        s = make_lab_state(t.world_seed); i = [o.name for o in s.objects].index(t.subject)
        plans = bring_plans(s, i, t.target, doors)
        return bool(plans) and carried_out(s, plans[0], i, t.target)
    opening, ignoring = np.mean([shortest_works(t, True) for t in tasks]), np.mean([shortest_works(t, False) for t in tasks])
    assert opening >= 0.9 and ignoring <= 0.5, (opening, ignoring)
    with pytest.raises(AgentError, match="unknown room"): bring_plans(make_lab_state(0), 0, "the kitchen")


# ---------------------------------------------------------------- dream

def test_the_learned_dream_reads_lift_outcomes_better_than_the_prior(parts):
    held = facing_situations(range(20_000, 20_060))
    truth = ["yes" if can_lift(make_lab_state(s), i) else "no" for s, i, _ in held]
    read = [min(e, key=e.get) for s, i, st in held for e in [lift_energies(parts, st, i)[0]]]
    accuracy = np.mean([r == t for r, t in zip(read, truth)])
    prior = np.mean([t == parts.priors["lift"] for t in truth])
    assert accuracy > prior + 0.1, (accuracy, prior)


# ---------------------------------------------------------------- the loop

def test_the_full_agent_beats_every_ablation(parts, tmp_path):
    configs = {name: AgentConfig(**change) for name, change in ABLATIONS.items()}
    rows = evaluate_agent(parts, lab_tasks(TEST), configs, tmp_path)
    full = rows["full agent"]
    for name, row in rows.items():
        if name != "full agent": assert full["mean"] > row["mean"] + 0.05, (name, row["mean"], full["mean"])
    assert full["where"] == 1.0 and full["bring"] >= 0.9, full                 # exact perception, plans that open doors
    assert rows["dream off"]["lift"] == pytest.approx(np.mean([t.answer == parts.priors["lift"] for t in lab_tasks(TEST) if t.kind == "lift"]))


def test_a_trace_records_every_stage_and_remembers_its_dream(parts, tmp_path):
    agent = LabAgent(parts, AgentConfig(), tmp_path)
    task = next(t for t in lab_tasks(TEST) if t.kind == "lift")
    tr = agent(task)
    assert [s.stage for s in tr.stages] == ["perceive", "encode", "retrieve", "dream", "rerank", "decode"]
    assert any("-[" in line and "perceived from the frame" in line for line in tr.stage("retrieve").lines)
    dreams = [f for f in agent.stores[task.world_seed].facts() if f.relation == "when picked up"]
    assert len(dreams) == 1 and dreams[0].head == task.subject and dreams[0].tail == OUTCOMES[tr.answer]
    assert dreams[0].source.startswith("dream (model)") and 0.5 <= dreams[0].confidence <= 1
    assert {"frame", "imagined: as is", "imagined: lifted"} <= set(tr.images)
    agent.close()


def test_trace_picture_and_panel(parts, tmp_path):
    matplotlib.use("Agg")
    agent = LabAgent(parts, AgentConfig(), tmp_path)
    traces = [agent(t) for t in lab_tasks(TEST[:2])]
    agent.close()
    bring = next(t for t in traces if t.task.kind == "bring")
    fig = plot_trace(bring)
    assert len(fig.axes) == len(bring.images) + 1
    panel = trace_panel(traces)
    panel.stage.value = "retrieve"
    assert "-[" in panel.text.value
    panel.episode.value = traces.index(bring)
    panel.stage.value = "perceive"
    assert len(panel.pictures.children) == 1
    with pytest.raises(AgentError, match="at least one trace"): trace_panel([])


def test_retrieval_rankers_beat_chance_on_two_hop_questions(parts, tmp_path):
    tasks = [t for t in lab_tasks(range(20_000, 20_030)) if t.kind == "beside"]
    ppr = retrieval_recall(parts, tasks, "ppr", 8, tmp_path / "ppr")["beside"]
    chance = retrieval_recall(parts, tasks, "random", 8, tmp_path / "random")["beside"]
    assert ppr > chance + 0.2, (ppr, chance)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("field", list(CHOICES))
def test_config_rejects_unknown_stage_options(field):
    with pytest.raises(AgentError, match=f"AgentConfig.{field}="): AgentConfig(**{field: "magic"})


def test_other_bad_input_is_a_clear_error(parts, tmp_path):
    with pytest.raises(AgentError, match="k >= 1"): AgentConfig(k=0)
    with pytest.raises(AgentError, match="parts.tofy"): LabAgent(parts, AgentConfig(decode="llama"), tmp_path)
    with pytest.raises(CheckpointError, match="10a_bridge"): tofy_from_models(tmp_path / "no-models", tmp_path)
    with pytest.raises(AgentError, match="at least one task"): evaluate_agent(parts, [], {"full": AgentConfig()}, tmp_path)
    with pytest.raises(AgentError, match="at least one training world"): agent_parts(None, "", [], Run(tmp_path / "r"))
    with TripletStore(tmp_path / "s.sqlite", relations=["is in"]) as store:
        with pytest.raises(AgentError, match="retriever 'magic'"): retrieve_facts(store, None, "Where?", "magic")
        assert retrieve_facts(store, None, "Where?", "ppr").reason.startswith("the store is empty")
