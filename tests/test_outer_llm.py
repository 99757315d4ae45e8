"""Lesson 12b: grid text round-trips and malformed answers score as wrong; the soft prompts change the decoder's logits
and another puzzle's latent changes them again; the saved bridge + adapters reload exactly; missing models name the
command that makes them; a tiny decoder that reads a latent holding the answer beats the same decoder without it."""
import json

import pytest
import torch

from jepa_lab.bridge import embedding_rms, shuffled
from jepa_lab.core import CheckpointError, Run, save_checkpoint
from jepa_lab.decoder import BPE_FILE, DECODER_FILE, MANIFEST_FILE, Decoder, DecoderConfig
from jepa_lab.hrm import HRM, ReasonerConfig, load_puzzles, load_reasoner, predict_segments, reasoner_path
from jepa_lab.outer_llm import (CellBridge, OuterConfig, OuterLLM, OuterLLMError, answer_ids, answers_as_tokens, char_ids,
                                greedy_answers, grid_text, hrm_latents, load_decoder, load_outer,
                                parse_grid, prompt_ids, puzzle_rows, save_outer, score_answers, train_outer)
from jepa_lab.tokenize import ByteBPE

BPE = ByteBPE([])                                                        # bytes + specials: every character one token


@pytest.fixture(scope="module")
def puzzles():
    return load_puzzles("generated:sudoku4", 120, seed=0)


def tiny_decoder(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=BPE.vocab_size, dim=64, depth=2, heads=4, kv_heads=2, ffn_hidden=128, max_len=96)).eval()


def test_grid_text_round_trips_and_prompts_share_one_layout(puzzles):
    assert grid_text(puzzles.inputs[0], 4).count("_") == int((puzzles.inputs[0] == 1).sum())
    for y in puzzles.labels[:40]:                                        # answer text → tokens → text → grid
        text = BPE.decode(answer_ids(BPE, y, 4)[:-1])
        assert torch.equal(parse_grid(text, 4), y) and len(text.split()) == 4
    assert len({len(prompt_ids(BPE, x, 4)) for x in puzzles.inputs}) == 1
    ids, scored = puzzle_rows(BPE, puzzles)
    assert ids.shape[1] == len(prompt_ids(BPE, puzzles.inputs[0], 4)) + 21 and scored.sum(1).eq(21).all()   # " 1234 3412 2143 4321<eos>"
    real = ByteBPE.train(["Puzzle: 1234 3412 __1_ 4___ Solution:"] * 5, 300)   # merges digits and blanks …
    assert len(real.encode(" 1234")) < 5 and len(char_ids(real, " 1234")) == 5  # … but char_ids keeps one per character
    with pytest.raises(OuterLLMError, match="4×4"): grid_text(torch.ones(15), 4)


def test_malformed_answers_are_wrong_never_a_crash(puzzles):
    labels = puzzles.labels[:8]
    bad = ["", "1234 3412 2143", "1234 3412 2143 43210", "1234 3412 2143 4325", "12a4 3412 2143 4321", "no idea",
           "\x00\ufffd", "0000 0000 0000 0000"]
    assert all(parse_grid(t, 4) is None for t in bad)
    assert score_answers(bad, labels, 4) == {"exact": 0.0, "cell": 0.0, "parsed": 0.0}
    good = [grid_text(y, 4) for y in labels]
    assert score_answers(good, labels, 4) == {"exact": 1.0, "cell": 1.0, "parsed": 1.0}
    assert score_answers(["  " + good[0] + "\n"], labels[:1], 4)["exact"] == 1.0   # surrounding whitespace is fine
    assert torch.equal(answers_as_tokens(["junk", good[1]], 4), torch.stack([torch.ones(16, dtype=torch.long), labels[1]]))


def test_soft_prompts_change_the_logits_and_a_shuffled_latent_changes_them_again(puzzles):
    dec, z = tiny_decoder(), torch.randn(6, 16, 8, generator=torch.Generator().manual_seed(0))
    outer = OuterLLM(dec, CellBridge(8, 64, 16, embedding_rms(dec), row=4), rank=4)
    ids = puzzle_rows(BPE, puzzles)[0][:6]
    with torch.no_grad():
        plain, adapted, mine, other = dec(ids), outer.decoder(ids), outer(ids, z), outer(ids, shuffled(z))
    assert torch.equal(plain, adapted)                                   # adapters start as the identity
    assert (mine[:, 19:] - plain).abs().max() > 1e-3 and (mine - other).abs().max() > 1e-3
    soft = outer.prefix(z)
    assert soft.shape == (6, 19, 64) and torch.allclose(soft.pow(2).mean(-1).sqrt(), torch.tensor(embedding_rms(dec)), rtol=1e-3)
    assert dec.tok_embeddings.weight.requires_grad                       # the original decoder is left untouched
    with pytest.raises(OuterLLMError, match="pass z"): outer(ids)
    with pytest.raises(OuterLLMError, match=r"\(B, 16, 8\)"): outer(ids, torch.randn(6, 9, 8))
    with pytest.raises(OuterLLMError, match="NaN"): outer(ids, torch.full((6, 16, 8), float("nan")))
    baseline = OuterLLM(dec, None, rank=4)
    a = dict(outer.decoder.named_parameters()); b = dict(baseline.decoder.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in b if n.endswith(".A"))  # the baseline gets the very same adapters


def test_saved_bridge_and_adapters_reload_exactly_and_hold_nothing_else(tmp_path, puzzles):
    dec, z = tiny_decoder(), torch.randn(4, 16, 8)
    outer = OuterLLM(dec, CellBridge(8, 64, 16, embedding_rms(dec), row=4), rank=4)
    with torch.no_grad():
        for p in outer.trainable().parameters(): p.add_(0.1 * torch.randn_like(p))
    save_outer(tmp_path / "o.safetensors", outer, step=1)
    again = load_outer(tmp_path / "o.safetensors", OuterLLM(dec, CellBridge(8, 64, 16, row=4), rank=4))
    ids = puzzle_rows(BPE, puzzles)[0][:4]
    with torch.no_grad(): assert torch.equal(outer(ids, z), again(ids, z))
    names = list(outer.trainable().state_dict())
    assert all(n.startswith("bridge__") or n.endswith(("__A", "__B")) for n in names) and "bridge__embed_rms" in names
    with pytest.raises(CheckpointError, match="does not match"): load_outer(tmp_path / "o.safetensors", OuterLLM(dec, None, rank=4))


def test_missing_models_name_the_command_that_makes_them(tmp_path):
    with pytest.raises(CheckpointError, match="jepa-lab run 10_decoder"): load_decoder(tmp_path)
    with pytest.raises(CheckpointError, match="jepa-lab run 12_hrm"): load_reasoner(reasoner_path(tmp_path, "sudoku4", 0))
    dec = tiny_decoder()                                                 # a complete tiny decoder in tmp_path loads
    save_checkpoint(tmp_path / DECODER_FILE, dec, step=0, rng=False)
    BPE.save(tmp_path / BPE_FILE)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"config": vars(dec.config)}))
    loaded, bpe = load_decoder(tmp_path)
    assert bpe == BPE and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), dec.state_dict().values()))


def test_hrm_latents_are_the_state_the_head_reads(puzzles):
    torch.manual_seed(0)
    hrm = HRM(ReasonerConfig(vocab_size=6, seq_len=16, dim=16, heads=2, layers=1))
    z, answer = hrm_latents(hrm, puzzles.inputs[:20], segments=2, batch_size=7)
    assert z.shape == (20, 16, 16) and torch.equal(answer, hrm.head(z).argmax(-1))
    assert torch.equal(answer, predict_segments(hrm, puzzles.inputs[:20], 2).answers[-1])


def pretrained_tiny_decoder(ids: torch.Tensor, steps: int = 100) -> Decoder:
    "A tiny decoder trained in full on puzzle rows (prompt + answer): it knows the format, as lesson 10's knows English."
    dec, g = tiny_decoder(), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(dec.parameters(), 3e-3)
    for _ in range(steps):
        i = torch.randint(0, len(ids), (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(dec(ids[i, :-1]).flatten(0, 1), ids[i, 1:].flatten())
        opt.zero_grad(); loss.backward(); opt.step()
    return dec.eval()


def test_a_decoder_that_reads_a_latent_holding_the_answer_beats_the_same_decoder_without_it(tmp_path, one_thread):
    """An oracle 'reasoner' whose per-cell latent is the cell's solution digit (one-hot, plus noise): on 100 held-out
    puzzles the latent-reading decoder must state far more whole grids than the same adapters trained without it, and
    another puzzle's latent must wreck it. (Four decoder seeds gave exact 0.70-0.90 vs 0.37-0.51, cells ≥ 0.95 vs shuffled ≤ 0.48.)"""
    puzzles = load_puzzles("generated:sudoku4", 300, seed=0)
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.one_hot(puzzles.labels - 2, 8).float() + 0.3 * torch.randn(300, 16, 8, generator=g)
    ids, scored = puzzle_rows(BPE, puzzles)
    n_prompt, train, test = int((~scored[0]).sum()), slice(0, 200), slice(200, 300)
    dec = pretrained_tiny_decoder(ids[train])
    config, scores = OuterConfig(steps=500, batch_size=16, lr=3e-3, warmup=10), {}
    for name, latents in [("latent", z), ("none", None)]:
        torch.manual_seed(0)
        bridge = None if latents is None else CellBridge(8, 64, 16, embedding_rms(dec), row=4)
        model = train_outer(OuterLLM(dec, bridge, rank=8), ids[train], scored[train], None if latents is None else z[train],
                            config, Run(tmp_path / name))
        texts = greedy_answers(model, BPE, ids[test, :n_prompt], None if latents is None else z[test])
        scores[name] = score_answers(texts, puzzles.labels[test], 4)
        if latents is not None:
            texts = greedy_answers(model, BPE, ids[test, :n_prompt], shuffled(z[test]))
            scores["shuffled"] = score_answers(texts, puzzles.labels[test], 4)
    print(scores)
    assert scores["latent"]["cell"] > 0.9 and scores["latent"]["exact"] > scores["none"]["exact"] + 0.15
    assert scores["latent"]["cell"] > scores["shuffled"]["cell"] + 0.3
    with pytest.raises(OuterLLMError, match="exactly when"): train_outer(OuterLLM(dec, None), ids, scored, z, config, Run(tmp_path / "x"))
