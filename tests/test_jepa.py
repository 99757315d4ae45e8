"JEPA lesson (jepa_lab.jepa): mask properties, predictor shapes, learning beats random init, NaN guard, exact resume, benchmark."
import math

import numpy as np
import pytest
import torch

from jepa_lab.core import NonFiniteError, Run, seed_everything
from jepa_lab.encoders import TextEncoderConfig, ViTConfig
from jepa_lab.jepa import (ImageJEPA, JEPAConfig, MaskError, MultiBlockConfig, Predictor, PredictorConfig, SpanConfig,
                           TextJEPA, TrainConfig, block_size, dialog_batch, dialog_tensors, image_batches,
                           mask_positions, multiblock_masks, span_mask, train_jepa)
from jepa_lab.jepa_eval import TfIdf, candidate_set, evaluate_text_jepa, retrieval_metrics
from jepa_lab.jepa_speed import benchmark_jepa_step

CPU = torch.device("cpu")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- masks

def test_span_masks_keep_their_promises():
    lengths = torch.randint(1, 50, (500,), generator=gen(0))
    cfg = SpanConfig(max_spans=3, max_span_len=5, max_masked_ratio=0.3)
    m = span_mask(lengths.tolist(), gen(1), cfg, width=50)
    valid = torch.arange(50)[None] < lengths[:, None]
    hidden = m.sum(1)
    assert not (m & ~valid).any()                                        # padding is never a target
    assert (hidden <= (lengths * 0.3).long()).all() and (hidden < lengths).all()   # budget; one token stays visible
    assert ((hidden >= 1) | (lengths * 0.3 < 1)).all()                   # something to predict whenever the budget allows
    runs = (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0]
    assert runs.max() <= 3
    assert torch.equal(m, span_mask(lengths.tolist(), gen(1), cfg, width=50))
    assert not torch.equal(m, span_mask(lengths.tolist(), gen(2), cfg, width=50))
    idx, pad = mask_positions(m)
    assert torch.equal(idx[~pad].sort().values, m.nonzero()[:, 1].sort().values) and idx.shape[1] == hidden.max()


def test_span_mask_refuses_bad_input():
    with pytest.raises(MaskError, match="max_masked_ratio"): SpanConfig(max_masked_ratio=1.5)
    with pytest.raises(MaskError, match="padded width"): span_mask([5, 12], gen(0), width=10)


@pytest.mark.parametrize("grid,min_keep", [((8, 8), 4), ((14, 14), 10)])
def test_multiblock_masks_have_the_documented_properties(grid, min_keep):
    cfg = MultiBlockConfig(grid=grid, min_keep=min_keep)
    N = grid[0] * grid[1]
    for s in range(60):
        mk = multiblock_masks(6, gen(s), cfg)
        B, M, Nt = mk.targets.shape
        assert (B, M) == (6, 4) and mk.context.shape[0] == 6 and mk.context.shape[1] > min_keep
        assert 0.15 * N - 5 <= Nt <= 0.2 * N + 5                          # scale, up to rounding of h and w
        for b in range(B):
            ctx, tgt = set(mk.context[b].tolist()), set(mk.targets[b].flatten().tolist())
            assert not ctx & tgt                                         # disjoint
            assert mk.context[b].tolist() == sorted(ctx)                 # ascending, no repeats
            for k in range(M):
                r, c = mk.targets[b, k] // grid[1], mk.targets[b, k] % grid[1]
                h, w = int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)
                assert h * w == Nt and h < grid[0] and w < grid[1]       # a full rectangle, smaller than the grid
    a, b = multiblock_masks(4, gen(7), cfg), multiblock_masks(4, gen(7), cfg)
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    c = multiblock_masks(4, gen(8), cfg)
    assert not torch.equal(a.targets, c.targets)


def test_block_size_follows_scale_and_aspect():
    for u in np.linspace(0, 1, 21):
        h, w = block_size(float(u), (0.15, 0.2), (0.75, 1.5), (14, 14))
        area = int(196 * (0.15 + u * 0.05))
        assert abs(h * w - area) <= (h + w) / 2 + 1
        assert 0.75 * w - 1 <= h <= 1.5 * w + 1
    with pytest.raises(MaskError, match="min_keep"):
        multiblock_masks(2, gen(0), MultiBlockConfig(grid=(4, 4), target_scale=(0.1, 0.1), min_keep=4))


def test_targets_reach_every_edge():
    "Unlike the reference's randint(0, H - h), a target block can touch the last row and column."
    seen = torch.zeros(64, dtype=torch.bool)
    for s in range(30): seen[multiblock_masks(8, gen(s)).targets.flatten()] = True
    assert seen.all()


# ---------------------------------------------------------------- predictor and models

def test_predictor_shapes_and_padding():
    p = Predictor(PredictorConfig(dim_in=24, dim=16, depth=1, heads=2, positions=33, grid=None))
    ctx, cpos, tpos = torch.randn(2, 7, 24), torch.arange(7).expand(2, 7), torch.tensor([[7, 32], [8, 32]])
    cpad = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    out = p(ctx, cpos, tpos, cpad)
    assert out.shape == (2, 2, 24)
    changed = ctx.clone(); changed[0, 5:] = 100.0                          # only padded latents change
    assert torch.allclose(out, p(changed, cpos, tpos, cpad), atol=1e-5)
    with pytest.raises(IndexError, match="positions"): p(ctx, cpos, torch.tensor([[40], [1]]))


def test_jepa_forward_shapes():
    img = ImageJEPA(ViTConfig(dim=32, depth=1, heads=2), JEPAConfig(predictor_dim=16, predictor_depth=1))
    mk = multiblock_masks(3, gen(0))
    out = img(torch.rand(3, 3, 64, 64), mk)
    assert out.loss.ndim == 0 and out.student.shape == out.target.shape == (3, 32) and {"prediction", "variance"} <= set(out.terms)
    txt = TextJEPA(TextEncoderConfig(vocab_size=300, dim=32, depth=1, heads=2, max_len=16), JEPAConfig(predictor_dim=16))
    ids, pad = torch.randint(0, 300, (4, 16)), torch.zeros(4, 16, dtype=torch.bool)
    out = txt(ids, pad, ids, pad, span_mask([16] * 4, gen(0), width=16))
    assert out.target.shape == (4, 32) and {"next_turn", "spans"} <= set(out.terms)
    assert txt.predict_next(ids, pad).shape == (4, 32)


def test_retrieval_metrics_and_tfidf_known_answers():
    r = retrieval_metrics(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.2, 0.2], [0.0, 0.5, 0.4]]), torch.tensor([0, 1, 2]))
    assert r["top1"] == pytest.approx(1 / 3) and r["mrr"] == pytest.approx((1 + 0.5 + 0.5) / 3) and r["top5"] == 1.0
    assert candidate_set(["a", "b", "a"])[1].tolist() == [0, 1, 0]
    tf = TfIdf(["the cat", "the dog"])
    v = tf(["cat the", "bird"])
    assert v[0, tf.vocab["cat"]] > v[0, tf.vocab["the"]] > 0 and not v[1].any()


# ---------------------------------------------------------------- learning beats random init

@pytest.mark.usefixtures("one_thread")
def test_tiny_text_jepa_beats_its_random_init(tmp_path):
    "500 seeded steps of the lesson's tiny text JEPA: held-out MRR beats the random-init network's best reading by 0.02."
    from jepa_lab.data import load_dialog_pairs
    from jepa_lab.tokenize import ByteBPE
    dialog = load_dialog_pairs(seed=0)
    bpe = ByteBPE.train([t for c, r in zip(dialog["train"]["context"], dialog["train"]["response"]) for t in [*c, r]], 1024)
    train, test = dialog_tensors(dialog["train"], bpe, 32), dialog_tensors(dialog["test"], bpe, 32)
    cfg = TextEncoderConfig(vocab_size=bpe.vocab_size, dim=64, depth=2, heads=4, max_len=32)
    seed_everything(0)
    init, model = TextJEPA(cfg, JEPAConfig()), TextJEPA(cfg, JEPAConfig())
    model.load_state_dict(init.state_dict())
    batches = lambda step: dialog_batch(train, 32, None, SpanConfig(), CPU, gen(step))
    train_jepa(model, batches, TrainConfig(steps=500, batch_size=32, lr=3e-4, ckpt_every=500, log_every=50), Run(tmp_path), CPU)
    baseline = max(evaluate_text_jepa(init, test, query=q)["mrr"] for q in ("predictor", "encoder"))
    trained = evaluate_text_jepa(model, test)
    assert trained["mrr"] > baseline + 0.02, (trained["mrr"], baseline)
    assert trained["cos"] > trained["cos_others"]
    rows = Run(tmp_path).metrics()
    assert all(k in rows[-1] for k in ("student_rank", "target_rank", "student_std", "target_std"))


# ---------------------------------------------------------------- NaN guard and exact resume

def tiny_image(seed=0):
    seed_everything(seed)
    return ImageJEPA(ViTConfig(dim=32, depth=1, heads=2), JEPAConfig(predictor_dim=16, predictor_depth=1))


def test_nan_gradient_stops_the_run_before_the_weights(tmp_path):
    model = tiny_image()
    frames = torch.rand(16, 3, 64, 64)
    poison = {"on": False}
    model.student.patch_embed.weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)
    nb = image_batches(frames, 4, MultiBlockConfig(), CPU)
    def next_batch(step):
        poison["on"] = step == 5
        return nb(step)
    with pytest.raises(NonFiniteError, match="grad_norm first at step 5"):
        train_jepa(model, next_batch, TrainConfig(steps=10, batch_size=4, ckpt_every=4, log_every=1), Run(tmp_path), CPU)
    assert all(torch.isfinite(p).all() for p in model.parameters())      # the optimizer never took the bad step
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.safetensors")) == ["step-00000004.safetensors"]


def test_deferred_nan_check_names_the_first_bad_step_and_writes_no_poisoned_checkpoint(tmp_path):
    "The GPU mode: no per-step sync; the run stops at the next log/checkpoint step, naming the first bad step."
    model = tiny_image()
    frames = torch.rand(16, 3, 64, 64)
    poison = {"on": False}
    model.student.patch_embed.weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)
    nb = image_batches(frames, 4, MultiBlockConfig(), CPU)
    steps_run = []
    def next_batch(step):
        steps_run.append(step)
        poison["on"] = step == 5
        return nb(step)
    train = TrainConfig(steps=12, batch_size=4, ckpt_every=4, log_every=4, nan_check="deferred")
    with pytest.raises(NonFiniteError, match="first at step 5"):
        train_jepa(model, next_batch, train, Run(tmp_path), CPU)
    assert steps_run[-1] == 6       # eager: the loss's input check meets the NaN weights at step 6 (compiled: step 7)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.safetensors")) == ["step-00000004.safetensors"]
    with pytest.raises(ValueError, match="nan_check"):
        TrainConfig(nan_check="sometimes")


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    frames = torch.rand(24, 3, 64, 64, generator=gen(3))
    train = TrainConfig(steps=9, batch_size=4, ckpt_every=3, log_every=1, warmup=2)
    def run(folder, stop_at=None):
        model = tiny_image()
        nb = image_batches(frames, 4, MultiBlockConfig(), CPU, seed=1)
        def next_batch(step):
            if step == stop_at: raise Interrupt
            return nb(step)
        train_jepa(model, next_batch, train, Run(folder), CPU)
        return model
    straight = run(tmp_path / "straight")
    with pytest.raises(Interrupt): run(tmp_path / "killed", stop_at=5)     # checkpoint at step 3 survives
    torch.manual_seed(123)                                                 # a different RNG state: resume must restore it
    resumed = run(tmp_path / "killed")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("teacher.") for k in a)                        # the EMA teacher is part of the checkpoint


# ---------------------------------------------------------------- benchmark

@pytest.mark.parametrize("kind", ["image", "text"])
def test_benchmark_runs_on_cpu_tiny(kind):
    r = benchmark_jepa_step(kind, "tiny", steps=1, warmup=1, peak_tflops=1.0)
    assert r["gflop_per_step"] > 0 and r["samples_per_s"] > 0 and math.isfinite(r["mfu"]) and r["device"] == "cpu"
