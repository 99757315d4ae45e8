"""Lesson 11a: the student's chains, R-JEPA and the rerankers. Exact picks (ties, no score, bad N), masks inside the
30–70 % bounds, labels from the checker, batched sampling and reading equal to one-at-a-time, R-JEPA and the PRM
learning a seeded synthetic task well above chance, the student learning and refusing a mismatched checkpoint, bad
inputs, and the whole lesson end to end at a tiny size (nbdev-test skips it: its defaults train for minutes)."""
import json
import math
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch

from jepa_lab.core import CheckpointError, Run, load_settings
from jepa_lab.decoder import Decoder, DecoderConfig, SamplingConfig
from jepa_lab.jepa import TrainConfig, train_jepa
from jepa_lab.reasoning import ProblemConfig, ReasoningError, generate_problems, gold_chain, prompt_and_target, split_problems
from jepa_lab.rjepa import (RJEPA, RJEPAConfig, Verifier, all_step_spans, benchmark_generation, chain_energies, chain_ids, chain_lines,
                            first_wrong_hits, gold_chain_batch, label_chain, load_or_train_student, nudge, pad_latents,
                            pick, plan_step, read_chains, rerank_accuracy, rjepa_batches, sample_chains, sample_many,
                            sample_rows, span_bounds, step_masks, student_files, train_student_bpe, train_verifier,
                            weighted_vote)

SMALL = ProblemConfig(max_value=20, leaf_range=(1, 9), max_ops=3)


@pytest.fixture(scope="module")
def problems():
    return split_problems(generate_problems(800, SMALL, seed=5))


@pytest.fixture(scope="module")
def tiny_student(problems):
    "An untrained decoder and a BPE: enough for shapes, batching and determinism."
    torch.manual_seed(0)
    bpe = train_student_bpe(problems["train"], 512)
    return Decoder(DecoderConfig(vocab_size=bpe.vocab_size, dim=32, depth=2, heads=2, kv_heads=1, ffn_hidden=64)).eval(), bpe


def test_pick_splits_ties_and_never_picks_an_unscored_chain():
    assert pick([True, False, False], [1.0, 1.0, 0.0]) == 0.5                    # a tie: the expectation, not the first
    assert pick([False, True], [-math.inf, -3.0]) == 1.0                         # unscored loses to any score
    assert pick([True, True], [-math.inf, -math.inf]) == 0.0                     # nothing scored: no answer
    assert pick([True, False, False, True], answers=[4, 5, 5, 4]) == 0.5         # majority tie between 4 and 5
    assert pick([False, True, True], answers=[3, 7, 7]) == 1.0
    assert pick([False, False], answers=[None, None]) == 0.0                     # nothing parsed: no vote
    for bad in (lambda: pick([]), lambda: pick([True], [0.1, 0.2]), lambda: pick([True, False], [float("nan"), 1.0])):
        with pytest.raises(ReasoningError): bad()


def test_rerank_accuracy_orders_the_baselines_and_refuses_n_beyond_the_samples():
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(40):
        correct = list(rng.random(8) < 0.3)
        groups.append({"correct": correct, "answers": [1 if c else int(rng.integers(2, 9)) for c in correct],
                       "perfect": [float(c) for c in correct], "inverse": [-float(c) for c in correct]})
    curve = rerank_accuracy(groups, ns=(1, 4, 8), draws=16, seed=0)
    pass1 = np.mean([np.mean(g["correct"]) for g in groups])
    assert abs(curve["random"][1][0] - pass1) < 1e-9 and abs(curve["random"][8][0] - pass1) < 1e-9
    assert curve["perfect"][8][0] == curve["oracle"][8][0] > curve["random"][8][0]   # a perfect score reaches pass@N
    assert curve["inverse"][8][0] <= curve["random"][8][0]
    assert curve["oracle"][1][0] == pytest.approx(pass1)
    assert curve["perfect+vote"][8][0] == curve["oracle"][8][0]                 # a perfect score's vote picks the right answer
    flat = [dict(g, flat=[0.0] * 8) for g in groups]                              # a constant score votes like the majority
    votes = rerank_accuracy(flat, ns=(8,))
    assert votes["flat+vote"][8][0] == pytest.approx(votes["majority"][8][0])
    assert weighted_vote([True, False, False], [3, 5, 5], [5.0, 0.0, 0.0]) == 1.0  # one confident chain outweighs two
    assert weighted_vote([False], [None], [1.0]) == 0.0
    with pytest.raises(ReasoningError, match="larger than the 8 samples"): rerank_accuracy(groups, ns=(16,))
    with pytest.raises(ReasoningError): rerank_accuracy([])


def test_masks_are_one_contiguous_run_within_the_bounds():
    for k in range(1, 12):
        least, most = span_bounds(k)
        assert 1 <= least <= most <= k and (k < 2 or most < k or k == 1)
        assert least >= min(k, math.ceil(0.3 * k - 1e-9)) and most <= max(least, math.floor(0.7 * k + 1e-9))
        assert all(0 <= s and s + m <= k for s, m in all_step_spans(k))
    lines = torch.tensor([1, 2, 3, 5, 8])
    mask = step_masks(lines, torch.Generator().manual_seed(0), 9)
    assert not mask[:, 0].any()
    for row, k in zip(mask, lines.tolist()):
        idx = row.nonzero()[:, 0].tolist()
        assert idx == list(range(idx[0], idx[-1] + 1)) and idx[-1] <= k        # contiguous, inside the chain
        assert span_bounds(k)[0] <= len(idx) <= span_bounds(k)[1]
    with pytest.raises(ReasoningError): span_bounds(0)


def test_labels_follow_the_checker(problems):
    p = next(q for q in problems["test"] if q.difficulty == 3)
    gold = label_chain(p, gold_chain(p))
    assert gold.correct and all(gold.line_correct) and gold.answer == p.answer and gold.first_wrong is None
    lines = chain_lines(gold_chain(p))
    head, _, value = lines[1].rpartition("= ")
    broken = label_chain(p, "\n".join(lines[:1] + [f"{head}= {int(value.rstrip('.')) + 1}."] + lines[2:]))
    assert not broken.correct and broken.first_wrong == 1 and broken.line_correct[0]
    assert gold.answer_correct and not label_chain(p, gold_chain(p).replace(f"Answer: {p.answer}", f"Answer: {p.answer + 1}")).answer_correct
    prose = label_chain(p, "I think the answer is 12.")
    assert not prose.correct and not prose.answer_correct and prose.answer is None and prose.line_correct == [False]
    assert label_chain(p, gold_chain(p).replace(f"Answer: {p.answer}", "Answer: twelve")).answer is None
    assert not label_chain(p, "").correct


def test_chain_ids_give_each_lines_exact_span(tiny_student, problems):
    _, bpe = tiny_student
    p = problems["train"][0]
    lines = chain_lines(gold_chain(p))
    t = chain_ids(bpe, "Problem: x\nSolution:\n", lines, eos=True)
    assert [bpe.decode(t.ids[a:b]) for a, b in t.spans[1:]] == [l + "\n" for l in lines]
    assert t.ids[0] == bpe.special_id("<bos>") and t.ids[-1] == bpe.special_id("<eos>")
    batch = gold_chain_batch(bpe, problems["train"][:4], 256, prompt_loss=False)
    prompt, target = prompt_and_target(problems["train"][0])
    first = chain_ids(bpe, prompt, chain_lines(target), eos=True)
    start = first.spans[0][1]
    assert not batch.loss_mask[0, :start - 1].any() and batch.loss_mask[0, start - 1:len(first.ids) - 1].all()
    assert gold_chain_batch(bpe, problems["train"][:4], 256).loss_mask[0, :len(first.ids) - 1].all()


def test_sampling_is_seeded_and_batching_changes_nothing(tiny_student, problems):
    model, bpe = tiny_student
    greedy = SamplingConfig(temperature=0, max_new_tokens=12)
    ps = problems["test"][:5]
    one_by_one = [sample_chains(model, bpe, p, 2, greedy) for p in ps]
    assert sample_many(model, bpe, ps, 2, greedy, max_rows=4) == one_by_one
    hot = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12, seed=3)
    assert sample_chains(model, bpe, ps[0], 4, hot) == sample_chains(model, bpe, ps[0], 4, hot)
    assert sample_chains(model, bpe, ps[0], 4, hot) != sample_chains(model, bpe, ps[0], 4, replace(hot, seed=4))
    logits = torch.randn(6, 50)
    assert torch.equal(sample_rows(logits, greedy, torch.Generator()), logits.argmax(-1))
    assert torch.equal(sample_rows(logits, replace(hot, top_k=1), torch.Generator()), logits.argmax(-1))
    with pytest.raises(ReasoningError): sample_chains(model, bpe, ps[0], 0, greedy)


def test_generation_benchmark_runs_both_engines(tiny_student, problems, tmp_path):
    pytest.importorskip("llama_cpp")
    model, bpe = tiny_student
    before = torch.get_num_threads()
    out = benchmark_generation(model, bpe, problems["test"][:2], 2, threads=1 if before > 1 else 2, folder=tmp_path)
    assert out["torch_batched_tok_s"] > 0 and out["llama_cpp_sequential_tok_s"] > 0
    assert (tmp_path / "student-f32.gguf").is_file() and torch.get_num_threads() == before   # threads restored


def test_read_chains_batch_equals_one_at_a_time(tiny_student, problems):
    model, bpe = tiny_student
    p = problems["test"][0]
    chains = [gold_chain(p), "Step 1: a = b + c = 3.", ""]
    batch = read_chains(model, bpe, p, chains)
    assert [len(z) for z in batch.latents] == [1 + len(chain_lines(c)) for c in chains]
    for i, c in enumerate(chains):
        alone = read_chains(model, bpe, p, [c])
        assert torch.allclose(alone.latents[0], batch.latents[i], atol=1e-5)
    assert batch.logprob[2] == -math.inf and torch.isfinite(batch.logprob[:2]).all()
    with pytest.raises(ReasoningError, match="empty"): read_chains(model, bpe, p, [])
    with pytest.raises(ReasoningError, match="layer"): read_chains(model, bpe, p, chains, layer=9)


def _synthetic_chains(n: int, k: int, dim: int, rng: np.random.Generator, wrong_line: int | None = None) -> list:
    "Chains whose lines follow a fixed linear dynamics from the problem latent; `wrong_line` is replaced by noise."
    A = np.linalg.qr(np.random.default_rng(123).standard_normal((dim, dim)))[0]
    out = []
    for _ in range(n):
        z = [rng.standard_normal(dim)]
        for _ in range(k): z.append(A @ z[-1] + 0.05 * rng.standard_normal(dim))
        if wrong_line is not None: z[1 + wrong_line] = rng.standard_normal(dim)
        out.append(torch.tensor(np.stack(z), dtype=torch.float32))
    return out


def test_rjepa_energy_learns_to_rank_right_chains_first(tmp_path, one_thread):
    "Seeded tiny run: trained on right chains only, the energy picks the right chain far above a random pick."
    torch.manual_seed(0)
    rng, dim, k = np.random.default_rng(0), 16, 4
    config = RJEPAConfig(dim=32, depth=1, heads=2, max_lines=8, predictor_dim=32, predictor_depth=1)
    model = RJEPA(dim, config)
    data = pad_latents(_synthetic_chains(512, k, dim, rng))
    train_jepa(model, rjepa_batches(data, 64, config, torch.device("cpu"), 0), TrainConfig(steps=800, batch_size=64, lr=2e-3, warmup=20,
               log_every=100, ckpt_every=800), Run(tmp_path / "rjepa"), torch.device("cpu"), desc="r-jepa")
    groups, hits_e, hits_c = [], [], []
    for _ in range(40):
        right = _synthetic_chains(2, k, dim, rng)
        wrong = [z for line in rng.integers(0, k, 6) for z in _synthetic_chains(1, k, dim, rng, int(line))]
        e = chain_energies(model, right + wrong)
        groups.append({"correct": [True] * 2 + [False] * 6, "answers": list(range(8)), "rjepa": [-x.chain for x in e]})
    curve = rerank_accuracy(groups, ns=(8,))
    assert curve["random"][8][0] == pytest.approx(0.25)
    assert curve["rjepa"][8][0] > 0.25 + 0.4, curve                              # the stated margin: +40 points
    wrong = [(line, z) for line in range(k) for z in _synthetic_chains(5, k, dim, rng, line)]   # per-line energy finds the bad line
    energies = chain_energies(model, [z for _, z in wrong])
    top = [int(torch.argmax(e.lines)) for e in energies]
    assert np.mean([t == line for t, (line, _) in zip(top, wrong)]) > 1 / k + 0.3


def test_prm_learns_which_line_is_wrong(tmp_path, one_thread):
    torch.manual_seed(0)
    rng, dim, k = np.random.default_rng(0), 16, 4
    chains, labels = [], []
    for i in range(1200):
        line = None if i % 3 == 0 else int(rng.integers(0, k))
        chains += _synthetic_chains(1, k, dim, rng, line)
        labels.append([1.0] + [float(j != line) for j in range(k)])
    data = pad_latents(chains)
    prm = train_verifier(Verifier(dim, RJEPAConfig(dim=32, depth=1, heads=2, max_lines=8), "prm"), data,
                         torch.tensor(labels), 1000, Run(tmp_path / "prm"), batch_size=64, lr=2e-3)
    test = [(line, z) for line in range(k) for z in _synthetic_chains(5, k, dim, rng, line)] + [(None, z) for z in _synthetic_chains(20, k, dim, rng)]
    scores = prm.score([z for _, z in test])
    right, wrong = scores[[l is None for l, _ in test]], scores[[l is not None for l, _ in test]]
    assert (right[:, None] > wrong[None, :]).float().mean() > 0.75                # AUROC of the chain score (chance 0.5)
    assert prm.score([torch.zeros(1, dim)])[0] == -math.inf                        # no line: no score
    with pytest.raises(ReasoningError): Verifier(dim, kind="value")


def test_student_learns_saves_and_refuses_a_mismatched_file(problems, tmp_path, one_thread, capsys):
    from jepa_lab.rjepa import StudentConfig
    config = DecoderConfig(vocab_size=512, dim=32, depth=2, heads=2, kv_heads=1, ffn_hidden=64)
    train = StudentConfig(steps=80, batch_size=16, lr=3e-3, warmup=10, log_every=10, ckpt_every=80)
    run = Run(tmp_path / "run")
    model, bpe, source = load_or_train_student(tmp_path / "models", problems["train"][:300], config, train, run, seed=0)
    losses = [r["loss"] for r in run.metrics()]
    assert source == "trained" and losses[-1] < 0.6 * losses[0], losses           # it learns
    assert all(p.is_file() for p in student_files(tmp_path / "models", 0))
    again, _, source = load_or_train_student(tmp_path / "models", problems["train"][:300], config, train, Run(tmp_path / "r2"), seed=0)
    assert source == "loaded" and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(CheckpointError, match="delete it"):
        load_or_train_student(tmp_path / "models", problems["train"][:200], config, train, Run(tmp_path / "r3"), seed=0)


def test_bad_inputs_get_clear_errors(tiny_student, problems):
    model, bpe = tiny_student
    p = problems["test"][0]
    z = read_chains(model, bpe, p, [gold_chain(p)]).latents[0]
    rjepa = RJEPA(z.shape[1], RJEPAConfig(dim=32, depth=1, heads=2, max_lines=4, predictor_dim=32, predictor_depth=1))
    with pytest.raises(ReasoningError, match="inner line"): plan_step(rjepa, model, bpe, p, 0, ["x"])
    with pytest.raises(ReasoningError, match="candidate"): plan_step(rjepa, model, bpe, p, 1, [])
    long = torch.zeros(6, z.shape[1])                                             # a runaway chain: more lines than positions
    assert chain_energies(rjepa, [long, z[:3]])[0].chain == math.inf              # no score, and the others still scored
    with pytest.raises(ReasoningError, match="max_lines"): rjepa.student(long[None], torch.zeros(1, 6, dtype=torch.bool))
    assert chain_energies(rjepa, [z[:1]])[0].chain == math.inf                     # no line: no score
    with pytest.raises(ReasoningError, match="not a line"):
        nudge(model, bpe, p, label_chain(p, gold_chain(p)), 7, 2, SamplingConfig(max_new_tokens=4))
    with pytest.raises(ReasoningError): pad_latents([])
    assert first_wrong_hits([], []) == {"chains": 0}
    orm = Verifier(z.shape[1], RJEPAConfig(dim=32, depth=1, heads=2, max_lines=8), "orm")
    empty = pad_latents([z, z[:1]])                                              # a chain with no line: finite, not NaN
    assert torch.isfinite(orm(empty.latents, empty.pad)).all() and orm.score([z, z[:1]])[1] == -math.inf
    assert orm.score([torch.zeros(12, z.shape[1]), z])[0] == -math.inf


def test_the_lesson_runs_end_to_end_at_a_tiny_size(jepa_lab, cli_env, tmp_path):
    cli_env["JEPA_LAB_MODELS_PATH"] = str(tmp_path / "models")
    cmd = [jepa_lab, "run", "11a_rjepa", "-p", "student_steps", "60", "-p", "rjepa_steps", "30", "-p", "verifier_steps", "30",
           "-p", "test_limit", "12", "-p", "n_problems", "1500", "-p", "n_samples", "4", "-p", "nudge_limit", "4"]
    out = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next((tmp_path / "runs").glob("11a_rjepa-*/summary.json")).read_text())
    assert summary["test_problems"] == 12 and 0 <= summary["oracle_at_4"] <= 1 and summary["rerank_cost"] > 0
    assert (tmp_path / "models" / "student-seed0.safetensors").is_file()
