"jepa_lab.graph_rag: PPR vs networkx, the SQLite store under concurrency and crashes, retrieval quality, GAT, simulation."
import subprocess
import sys
import textwrap

import networkx as nx
import numpy as np
import pytest
import torch

from jepa_lab.data import load_wordnet_graph, wordnet_available
from jepa_lab.graph_rag import (EmptyGraphError, EntityLinker, LinearExperts, TripletError, TripletStore,
                                UnknownEntityError, UnknownRelationError, bfs_rank, evaluate_rankers, gat_vs_mlp,
                                GATLayer, graph_questions, graph_rag, k_hop, networkx_ppr, personalized_pagerank,
                                ppr_rank, random_digraph, seed_vector, simulate_situations, split_questions, top_facts,
                                undirected_ppr)

TOY = [("dog", "is_a", "canine"), ("canine", "is_a", "carnivore"), ("tail", "part_of", "dog"), ("cat", "is_a", "feline")]


@pytest.fixture
def store(tmp_path):
    s = TripletStore(tmp_path / "toy.sqlite", relations=["is_a", "part_of"])
    s.ingest(TOY, source=[f"toy.tsv:{i + 1}" for i in range(len(TOY))], run="test")
    yield s
    s.close()


def _bag_of_letters(texts):
    "A deterministic stand-in encoder: letter counts (N, 26)."
    out = torch.zeros(len(texts), 26)
    for i, t in enumerate(texts):
        for c in t.lower():
            if "a" <= c <= "z": out[i, ord(c) - 97] += 1
    return out


# --- personalised PageRank ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m,dangling", [(12, 20, 0.3), (50, 150, 0.2), (300, 3000, 0.0), (100, 100, 0.5)])
def test_ppr_equals_networkx(n, m, dangling):
    A = random_digraph(n, m, seed=n + m, dangling=dangling)
    assert (np.asarray(A.sum(1)).ravel() == 0).any() or dangling == 0      # the graph really has dangling nodes
    for seeds in [{0: 1.0}, {1: 2.0, 3: 0.5}, {i: 1.0 for i in range(n)}]:
        p = np.zeros(n); p[list(seeds)] = list(seeds.values())
        ours = personalized_pagerank(A, p, alpha=0.5)
        assert np.abs(ours - networkx_ppr(A, seeds, alpha=0.5)).max() < 1e-6
        assert abs(ours.sum() - 1) < 1e-9
    ours85 = personalized_pagerank(A, np.eye(1, n, 2)[0], alpha=0.85, tol=1e-10)
    assert np.abs(ours85 - networkx_ppr(A, {2: 1.0}, alpha=0.85, tol=1e-10)).max() < 1e-6


def test_batched_ppr_equals_single():
    A = random_digraph(200, 1000, seed=1, dangling=0.1)
    P = np.random.default_rng(0).random((200, 7)) * (np.random.default_rng(1).random((200, 7)) < 0.05)
    P[0] = 1.0                                                              # no empty column
    batch = personalized_pagerank(A, P)
    for b in range(7):
        assert np.abs(batch[:, b] - personalized_pagerank(A, P[:, b])).max() < 1e-9


@pytest.mark.parametrize("n,m", [(20, 30), (300, 3000)])
def test_undirected_chebyshev_ppr_equals_networkx_and_power_iteration(n, m):
    directed = random_digraph(n, m, seed=m)
    A = (directed + directed.T).tocsr()
    A = A[A.getnnz(1) > 0][:, A.getnnz(1) > 0].tocsr()
    n = A.shape[0]
    P = np.zeros((n, 3)); P[0, 0] = 1; P[[2, 7], 1] = [1, 3]; P[:, 2] = 1
    batch = undirected_ppr(A, P, alpha=0.5)
    for b, seeds in enumerate([{0: 1}, {2: 1, 7: 3}, {i: 1 for i in range(n)}]):
        single = undirected_ppr(A, P[:, b], alpha=0.5)
        assert np.abs(single - networkx_ppr(A, seeds, alpha=0.5)).max() < 1e-6
        assert np.abs(single - personalized_pagerank(A, P[:, b], alpha=0.5)).max() < 1e-7
        assert np.abs(batch[:, b] - single).max() < 1e-9
    with pytest.raises(ValueError, match="no edges"):
        undirected_ppr(sp_with_isolated_node(), np.ones(3))


def sp_with_isolated_node():
    import scipy.sparse as sp
    return sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=float))


# --- the store --------------------------------------------------------------------------------------------

def test_idempotent_reingest_keeps_first_provenance(store):
    v = store.version()
    assert store.ingest(TOY, source="again") == 0 and store.count() == 4 and store.version() == v
    assert [f.source for f in store.facts()] == [f"toy.tsv:{i}" for i in range(1, 5)]
    assert store.ingest(TOY + [("wolf", "is_a", "canine")], source="more") == 1 and store.version() == v + 1


def test_snapshot_rebuilt_after_change(store):
    snap = store.snapshot()
    assert store.snapshot() is snap
    store.ingest([("wolf", "is_a", "canine")], source="new")
    new = store.snapshot()
    assert new is not snap and "wolf" in new.index and "wolf" not in snap.index
    assert new.adjacency[new.index["wolf"], new.index["canine"]] == 1 == new.adjacency[new.index["canine"], new.index["wolf"]]
    store.ingest([("wolf", "is_a", "canine")], source="dup")          # nothing new: the cached snapshot stays
    assert store.snapshot() is new


@pytest.mark.parametrize("bad,error,words", [
    ([("dog", "is_a")], TripletError, "3"), ([("dog", "is_a", "canine", "x")], TripletError, "4 fields"),
    ([("dog", "", "canine")], TripletError, "relation is empty"), ([("dog", "is_a", "  ")], TripletError, "tail is empty"),
    ([(None, "is_a", "canine")], TripletError, "head must be a str"), ([b"dog is_a canine"], TripletError, "tuple"),
    ([("dog", "is_aa", "canine")], UnknownRelationError, "is_aa"), ([42], TripletError, "tuple")])
def test_bad_triplets_are_refused_and_nothing_is_written(store, bad, error, words):
    before = store.facts()
    with pytest.raises(error, match=words):
        store.ingest([("fox", "is_a", "canine")] + bad, source="bad")    # the good row before it is not written either
    assert store.facts() == before


def test_bad_provenance_is_refused(store):
    with pytest.raises(TripletError, match="confidence"): store.ingest([("fox", "is_a", "canine")], source="s", confidence=1.5)
    with pytest.raises(TripletError, match="source"): store.ingest([("fox", "is_a", "canine")], source="")
    with pytest.raises(TripletError, match="2 items for 1"): store.ingest([("fox", "is_a", "canine")], source=["a", "b"])
    assert store.count() == 4


def test_empty_graph_and_unknown_entities(tmp_path, store):
    empty = TripletStore(tmp_path / "empty.sqlite", relations=["is_a"])
    with pytest.raises(EmptyGraphError): seed_vector(empty.snapshot(), ["dog"])
    with pytest.raises(EmptyGraphError): personalized_pagerank(empty.snapshot().adjacency, np.zeros(0))
    with pytest.raises(EmptyGraphError): EntityLinker(empty.snapshot(), _bag_of_letters)
    with pytest.raises(UnknownEntityError, match="wolf"): ppr_rank(store.snapshot(), ["wolf"])
    with pytest.raises(UnknownEntityError, match="wolf"): bfs_rank(store.snapshot(), "wolf")
    linker = EntityLinker(store.snapshot(), _bag_of_letters)
    nothing = graph_rag(store, linker, "xyzzy qqq", min_similarity=0.99)
    assert nothing.facts == [] and nothing.entities == [] and "min_similarity" in nothing.reason
    empty.close()


# --- processes: two writers, a crash --------------------------------------------------------------------

WRITER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from jepa_lab.graph_rag import TripletStore
    store = TripletStore(sys.argv[1], relations=["r"])
    lo, go = int(sys.argv[2]), Path(sys.argv[3])
    print("ready", flush=True)
    while not go.exists(): time.sleep(0.01)          # both start writing at the same moment
    start = time.time()
    store.ingest([(f"e{i}", "r", f"e{i + 1}") for i in range(lo, lo + 3000)], source=f"writer{lo}", batch_size=20)
    print(start, time.time(), flush=True)
''')


def test_two_processes_ingesting_at_once_lose_nothing(tmp_path):
    db, go = tmp_path / "both.sqlite", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(lo), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for lo in (0, 1500)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (start_a, end_a), (start_b, end_b) = [map(float, out.split()) for out, _ in outs]
    assert max(start_a, start_b) < min(end_a, end_b), "the two ingests did not overlap in time: the test proved nothing"
    with TripletStore(db) as s:
        facts = s.facts()
        assert s.count() == 4500 and sorted(f.head for f in facts) == sorted(f"e{i}" for i in range(4500))
        assert {f.source for f in facts} == {"writer0", "writer1500"}


CRASHER = textwrap.dedent('''
    import os, sys
    from jepa_lab.graph_rag import TripletStore
    store = TripletStore(sys.argv[1], relations=["r"])
    insert, calls = store._insert_rows, []
    def insert_then_die(rows):
        n = insert(rows); calls.append(n)
        if len(calls) == 4: os._exit(3)        # inside the 4th batch's transaction: rows written, not committed
        return n
    store._insert_rows = insert_then_die
    store.ingest([(f"h{i}", "r", f"t{i}") for i in range(1000)], source="crasher", batch_size=100)
''')


def test_crash_mid_batch_leaves_the_committed_batches(tmp_path):
    db = tmp_path / "crash.sqlite"
    assert subprocess.run([sys.executable, "-c", CRASHER, str(db)], timeout=120).returncode == 3
    with TripletStore(db) as s:
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert s.count() == 300 and s.version() == 3                   # exactly the three committed batches
        assert [f.head for f in s.facts()] == [f"h{i}" for i in range(300)]
        assert s.ingest([(f"h{i}", "r", f"t{i}") for i in range(1000)], source="again") == 700   # it carries on


# --- retrieval ----------------------------------------------------------------------------------------------

def test_bfs_k_hop_and_provenance(store):
    snap = store.snapshot()
    assert bfs_rank(snap, "carnivore") == ["canine", "dog", "tail"]       # by hops, ties by name; cat is unreachable
    assert k_hop(snap, "dog", 1) == ["dog", "canine", "tail"]
    scores = personalized_pagerank(snap.adjacency, seed_vector(snap, ["dog"]))
    facts = top_facts(store, scores, 3)
    assert {sf.fact.source for sf in facts} == {"toy.tsv:1", "toy.tsv:2", "toy.tsv:3"}
    assert all(sf.fact.run == "test" and sf.fact.confidence == 1.0 for sf in facts)
    found = graph_rag(store, EntityLinker(snap, _bag_of_letters), "dog", k=2, min_similarity=0.9)
    assert found.seeds and "dog" in found.seeds and all(sf.fact.source.startswith("toy.tsv:") for sf in found.facts)


@pytest.mark.skipif(not wordnet_available(), reason="WordNet 3.0 (Debian wordnet-base + wordnet-sense-index) not installed")
def test_ppr_beats_bfs_on_wordnet_dev_split(tmp_path):
    with TripletStore(tmp_path / "wn.sqlite") as s:
        s.ingest_graph(load_wordnet_graph(around="bird.n.01", hops=3))
        snap = s.snapshot()
        dev, test = split_questions(graph_questions(snap), 300, seed=0)
        assert len(dev) > 100 and not set(dev) & set(test)
        table = evaluate_rankers(dev, {"ppr": lambda q: ppr_rank(snap, q.subject, 10),
                                       "bfs": lambda q: bfs_rank(snap, q.subject, 10)})
        # measured (seed 0): PPR 0.855 vs BFS 0.814 Recall@5 on 135 dev questions; the margin is stated at 0.03
        assert table["ppr"]["recall@5"] > table["bfs"]["recall@5"] + 0.03, table
        assert table["ppr"]["hits@10"] >= table["bfs"]["hits@10"], table


# --- graph attention and simulation ---------------------------------------------------------------------

def test_gat_output_ignores_non_neighbours():
    torch.manual_seed(0)
    layer = GATLayer(6, 5, heads=3).eval()
    edges = torch.tensor([[1, 2, 4, 0], [0, 0, 3, 4]])                 # in-neighbours of 0: 1, 2
    x = torch.randn(5, 6)
    base = layer(x, edges)
    for far in (3, 4):
        moved = x.clone(); moved[far] = torch.randn(6) * 10
        assert torch.equal(layer(moved, edges)[0], base[0])
    moved = x.clone(); moved[1] += 3.0
    assert not torch.allclose(layer(moved, edges)[0], base[0])


def test_gat_beats_edge_blind_mlp():
    acc = gat_vs_mlp(seed=0, steps=150)
    assert acc["gat"] > acc["mlp"] + 0.15 and acc["gat"] > 0.85, acc


def test_simulation_is_batched_arbitrated_and_traceable():
    torch.manual_seed(0)
    model = LinearExperts(8, 3, experts=3).eval()
    z0, actions, goal = torch.randn(4, 8), torch.randn(4, 5, 3), torch.randn(8)
    calls = []
    def rollout(z, a):
        calls.append(len(z)); return model(z, a)
    score = lambda traj: -(traj[:, -1] - goal).norm(dim=-1)
    with torch.no_grad():
        sim = simulate_situations(z0, actions, rollout, score, ["a", "b", "c", "d"], [["fa"], ["fb"], ["fc"], ["fd"]])
        alone = [simulate_situations(z0[k:k + 1], actions[k:k + 1], model, score, ["x"]) for k in range(4)]
    assert calls == [4] * 5                                             # one batched call per step, never per situation
    assert torch.allclose(sim.trajectories, torch.cat([r.trajectories for r in alone]), atol=1e-6)
    assert torch.equal(sim.experts, torch.cat([r.experts for r in alone]))
    assert sim.best == int(torch.argmax(sim.scores)) and sim.trajectories.shape == (4, 6, 8)
    report = sim.report()
    assert [r["chosen"] for r in report].count(True) == 1 and report[sim.best]["facts"] == [["fa"], ["fb"], ["fc"], ["fd"]][sim.best]
    assert all(len(r["experts"]) == 5 and set(r["experts"]) <= {0, 1, 2} for r in report)
    with pytest.raises(ValueError, match="K situation"):
        simulate_situations(z0, actions, model, score, ["only one"])
