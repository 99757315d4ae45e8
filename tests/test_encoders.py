"Encoders: text transformer, ViT, selective scan (parallel == sequential, causal), EMA teacher, configs, bad input."
import math

import pytest
import torch
import torch.nn.functional as F

from jepa_lab import encoders
from jepa_lab.encoders import (EncoderConfigError, EncoderInputError, SelectiveScanBlock, SelectiveScanConfig,
                               TeacherMismatchError, TextEncoder, TextEncoderConfig, ViT, ViTConfig, build_encoder,
                               count_parameters, ema_teacher, ema_update, linear_scan, momentum_schedule,
                               random_scan_inputs, reference_attention, rope_tables, selective_scan,
                               text_base_config, vit_b16_config)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def small_text(**kw):
    return TextEncoder(TextEncoderConfig(vocab_size=100, dim=32, depth=2, heads=4, max_len=64, **kw)).eval()


def small_vit():
    return ViT(ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=4)).eval()


def small_block():
    return SelectiveScanBlock(SelectiveScanConfig(dim=16, d_state=8)).eval()


# ---------------------------------------------------------------- shapes

def test_text_encoder_shapes_and_pooled_is_masked_mean():
    enc = small_text()
    ids = torch.randint(0, 100, (3, 11))
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[1, 7:] = True
    out = enc(ids, pad)
    assert out.tokens.shape == (3, 11, 32) and out.pooled.shape == (3, 32)
    assert torch.allclose(out.pooled[1], out.tokens[1, :7].mean(0), atol=1e-6)
    assert torch.allclose(out.pooled[0], out.tokens[0].mean(0), atol=1e-6)


def test_vit_shapes_keep_and_other_grid():
    vit = small_vit()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        full = vit(images)
        order = torch.stack([torch.randperm(16) for _ in range(2)])
        shuffled = vit(images, keep=order)
        part = vit(images, keep=order[:, :5])
    assert full.tokens.shape == (2, 16, 32) and full.pooled.shape == (2, 32) and part.tokens.shape == (2, 5, 32)
    # positions are attached before patches are selected: all patches in another order = the same tokens reordered
    assert torch.allclose(shuffled.tokens, full.tokens.gather(1, order[..., None].expand(-1, -1, 32)), atol=1e-5)
    assert not torch.allclose(part.tokens, full.tokens.gather(1, order[:, :5, None].expand(-1, -1, 32)), atol=1e-3)
    assert vit(torch.rand(1, 3, 16, 40)).tokens.shape == (1, 2 * 5, 32)


def test_scan_block_shapes_and_gradients_reach_every_parameter():
    block = small_block().train()
    x = torch.randn(2, 13, 16, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


# ---------------------------------------------------------------- attention and padding

def test_appended_padding_does_not_change_pooled_output():
    enc = small_text()
    ids = torch.randint(1, 100, (4, 15))
    padded = torch.cat([ids, torch.zeros(4, 9, dtype=torch.long)], 1)
    mask = torch.zeros(4, 24, dtype=torch.bool)
    mask[:, 15:] = True
    with torch.no_grad():
        plain, with_pads, unmasked = enc(ids), enc(padded, mask), enc(padded)
    assert torch.allclose(with_pads.pooled, plain.pooled, atol=1e-5)
    assert torch.allclose(with_pads.tokens[:, :15], plain.tokens, atol=1e-5)
    assert (unmasked.pooled - plain.pooled).abs().max() > 1e-2  # the check can fail: pads without the mask matter


def test_attention_is_sdpa_and_equals_written_out_softmax(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(encoders.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    enc = small_text()
    ids = torch.randint(0, 100, (2, 10))
    enc(ids)
    assert len(calls) == enc.config.depth  # one fused call per block, nothing else computes attention

    layer = enc.blocks[0].attn
    x = torch.randn(2, 10, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 6:] = True
    rope = rope_tables(10, 8)
    q, k, v = layer.project(x, rope)
    manual, weights = reference_attention(q, k, v, pad)
    manual = layer.proj(manual.transpose(1, 2).flatten(2))
    assert torch.allclose(layer(x, rope, pad), manual, atol=1e-5)
    assert weights[0, :, :, 6:].abs().max() == 0


def test_rotary_scores_depend_only_on_offset():
    cos, sin = rope_tables(50, 8)
    q, k = torch.randn(8), torch.randn(8)
    score = lambda m, n: encoders.apply_rope(q, cos[m], sin[m]) @ encoders.apply_rope(k, cos[n], sin[n])
    assert torch.allclose(score(2, 9), score(30, 37), atol=1e-5)
    assert not torch.allclose(score(2, 9), score(2, 10), atol=1e-3)


# ---------------------------------------------------------------- selective scan

def loop_scan(a, b):
    h, out = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 31, 64, 100, 129])
def test_linear_scan_matches_loop_forward_and_gradients(length):
    a = torch.rand(2, length, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, length, 3, dtype=torch.float64)
    h_par, h_seq = linear_scan(a, b), loop_scan(a, b)
    assert torch.allclose(h_par, h_seq, atol=1e-12, rtol=0)
    g_par = torch.autograd.grad((h_par * w).sum(), (a, b))
    g_seq = torch.autograd.grad((h_seq * w).sum(), (a, b))
    for gp, gs in zip(g_par, g_seq):
        assert torch.allclose(gp, gs, atol=1e-12, rtol=0)


def relative_error(x, ref):
    "max |x - ref| / max |ref| (a reference of all zeros must be matched exactly)."
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100, 1000])
def test_parallel_selective_scan_equals_sequential_loop_float64(length):
    "Stated tolerance: float64, outputs and all six gradients within 1e-10 of the loop, relative to their scale."
    inputs = random_scan_inputs(2, length, 6, 4, dtype=torch.float64, seed=length, requires_grad=True)
    weight = torch.randn(2, length, 6, dtype=torch.float64)
    results = {}
    for parallel in (True, False):
        y = selective_scan(*inputs, parallel=parallel)
        results[parallel] = (y, torch.autograd.grad((y * weight).sum(), inputs))
    (y_par, g_par), (y_seq, g_seq) = results[True], results[False]
    assert relative_error(y_par, y_seq) < 1e-10
    for gp, gs in zip(g_par, g_seq):
        assert relative_error(gp, gs) < 1e-10


def test_parallel_selective_scan_equals_sequential_loop_float32_long():
    "Stated tolerance for float32 at length 1024: 1e-5 relative on outputs, 1e-4 on gradients."
    inputs = random_scan_inputs(1, 1024, 8, 8, seed=3, requires_grad=True)
    results = {p: selective_scan(*inputs, parallel=p) for p in (True, False)}
    assert relative_error(results[True], results[False]) < 1e-5
    g_par = torch.autograd.grad(results[True].sum(), inputs)
    g_seq = torch.autograd.grad(results[False].sum(), inputs)
    assert max(relative_error(a, b) for a, b in zip(g_par, g_seq)) < 1e-4


def test_block_parallel_equals_sequential_including_parameter_gradients():
    block = small_block().double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    grads = {}
    for parallel in (True, False):
        block.zero_grad()
        y = block(x, parallel=parallel)
        y.square().sum().backward()
        grads[parallel] = (y.detach(), [p.grad.clone() for p in block.parameters()])
    assert relative_error(grads[True][0], grads[False][0]) < 1e-10
    for gp, gs in zip(grads[True][1], grads[False][1]):
        assert relative_error(gp, gs) < 1e-10


def test_scan_block_is_causal():
    block = small_block()
    x = torch.randn(2, 40, 16)
    for t in (0, 17, 38):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
        with torch.no_grad():
            y, y_changed = block(x), block(changed)
        assert torch.allclose(y[:, : t + 1], y_changed[:, : t + 1], atol=1e-6), t
        assert (y[:, t + 1:] - y_changed[:, t + 1:]).abs().max() > 1e-3



def test_scan_block_learns_a_running_sum_beyond_its_convolution(one_thread):
    """Learning check: target_t = 0.15 * sum of x[:, :t+1, 0]. The 4-tap convolution alone can at best predict the
    last four terms; the trained block must beat that oracle's error by 3x (and the best constant by more)."""
    torch.manual_seed(0)
    block, head = SelectiveScanBlock(SelectiveScanConfig(dim=8, d_state=8)), torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*block.parameters(), *head.parameters()], lr=1e-2)
    target_of = lambda x: 0.15 * x[..., 0].cumsum(1)
    loss_of = lambda x: (head(block(x)).squeeze(-1) - target_of(x)).square().mean()
    for _ in range(400):
        loss = loss_of(torch.randn(16, 48, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_val = torch.randn(64, 48, 8, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        final = loss_of(x_val).item()
    window = F.pad(x_val[..., 0], (3, 0)).unfold(1, 4, 1).sum(-1)  # x_{t-3} + ... + x_t
    window_oracle = (0.15 * window - target_of(x_val)).square().mean().item()
    constant = target_of(x_val).var().item()
    assert final < window_oracle / 3 and final < constant / 3, (final, window_oracle, constant)


# ---------------------------------------------------------------- EMA teacher

def perturbed_pair():
    student = small_text()
    teacher = ema_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    return teacher, student


def test_ema_momentum_one_keeps_teacher_zero_copies_student_between_averages():
    teacher, student = perturbed_pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(teacher.state_dict()[k], before[k]) for k in before)
    ema_update(teacher, student, 0.75)
    for k in before:
        assert torch.allclose(teacher.state_dict()[k], 0.75 * before[k] + 0.25 * student.state_dict()[k], atol=1e-6)
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(teacher.state_dict()[k], student.state_dict()[k]) for k in before)


def test_teacher_is_a_frozen_copy_and_gets_no_gradients():
    student = small_text().train()
    teacher = ema_teacher(student)
    assert teacher is not student and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(teacher.parameters(), student.parameters()))
    ids = torch.randint(0, 100, (3, 9))
    (student(ids).pooled - teacher(ids).pooled).square().mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_ema_refuses_bad_momentum_and_mismatched_models():
    teacher, student = perturbed_pair()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            ema_update(teacher, student, bad)
    other = TextEncoder(TextEncoderConfig(vocab_size=100, dim=32, depth=3, heads=4, max_len=64))
    with pytest.raises(TeacherMismatchError, match="blocks.2"):
        ema_update(teacher, other, 0.99)


def test_momentum_schedule_endpoints_and_monotone():
    assert momentum_schedule(0, 500) == 0.996
    assert math.isclose(momentum_schedule(500, 500), 0.9999, abs_tol=1e-12)
    assert momentum_schedule(900, 500) == momentum_schedule(500, 500)
    assert math.isclose(momentum_schedule(500, 500, end=1.0), 1.0, abs_tol=1e-12)
    assert math.isclose(momentum_schedule(250, 500), (0.996 + 0.9999) / 2, abs_tol=1e-12)  # cosine midpoint
    quarter = 0.996 + (0.9999 - 0.996) * (1 - math.cos(math.pi / 4)) / 2  # cosine, not linear (0.25 of the way)
    assert math.isclose(momentum_schedule(125, 500), quarter, abs_tol=1e-12)
    values = [momentum_schedule(s, 500) for s in range(0, 600, 7)]
    assert all(b >= a for a, b in zip(values, values[1:])) and values[1] > values[0]
    for step, total in ((-1, 10), (0, 0)):
        with pytest.raises(ValueError):
            momentum_schedule(step, total)


# ---------------------------------------------------------------- configs

def test_big_config_parameter_counts():
    assert abs(count_parameters(vit_b16_config()) / 86e6 - 1) < 0.05
    assert abs(count_parameters(text_base_config()) / 100e6 - 1) < 0.05


def test_meta_count_equals_real_count():
    for cfg in (TextEncoderConfig(dim=32, depth=1, heads=2), ViTConfig(dim=32, depth=1, heads=2), SelectiveScanConfig(dim=16)):
        assert count_parameters(cfg) == count_parameters(build_encoder(cfg))


# ---------------------------------------------------------------- bad input

def bad_inputs():
    text, vit, block = small_text(), small_vit(), small_block()
    ids = torch.randint(0, 100, (2, 5))
    u, delta, A, B, C, D = random_scan_inputs(2, 10, 6, 4)
    return [
        ("1-D ids", lambda: text(ids[0]), EncoderInputError, "shape (batch, length)"),
        ("float ids", lambda: text(ids.float()), EncoderInputError, "integer tensor"),
        ("too long", lambda: text(torch.zeros(1, 65, dtype=torch.long)), EncoderInputError, "exceeds max_len 64"),
        ("id out of vocab", lambda: text(torch.full((1, 3), 100)), EncoderInputError, "vocab_size is 100"),
        ("negative id", lambda: text(torch.full((1, 3), -1)), EncoderInputError, "vocab_size"),
        ("mask shape", lambda: text(ids, torch.zeros(2, 4, dtype=torch.bool)), EncoderInputError, "pad_mask"),
        ("mask dtype", lambda: text(ids, torch.zeros(2, 5)), EncoderInputError, "pad_mask"),
        ("all padding", lambda: text(ids, torch.ones(2, 5, dtype=torch.bool)), EncoderInputError, "all padding"),
        ("positions", lambda: text(ids, positions=torch.full((2, 5), 64)), EncoderInputError, "positions"),
        ("3-D image", lambda: vit(torch.rand(3, 32, 32)), EncoderInputError, "(batch, channels, height, width)"),
        ("channels last", lambda: vit(torch.rand(1, 32, 32, 3)), EncoderInputError, "channels"),
        ("uint8 image", lambda: vit(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), EncoderInputError, "float tensor"),
        ("not divisible", lambda: vit(torch.rand(1, 3, 30, 32)), EncoderInputError, "not divisible by patch_size 8"),
        ("keep range", lambda: vit(torch.rand(1, 3, 32, 32), keep=torch.tensor([[16]])), EncoderInputError, "keep"),
        ("config patch", lambda: ViTConfig(image_size=30, patch_size=8), EncoderConfigError, "not divisible by patch_size"),
        ("config heads", lambda: TextEncoderConfig(dim=30, heads=4), EncoderConfigError, "heads"),
        ("scan rank", lambda: block(torch.randn(10, 16)), EncoderInputError, "(batch, length, 16)"),
        ("scan width", lambda: block(torch.randn(1, 10, 15)), EncoderInputError, "(batch, length, 16)"),
        ("scan delta", lambda: selective_scan(u, delta[:, :5], A, B, C, D), EncoderInputError, "delta must have shape"),
        ("scan A", lambda: selective_scan(u, delta, A[:3], B, C, D), EncoderInputError, "A must have shape"),
        ("unknown config", lambda: build_encoder({"dim": 8}), EncoderConfigError, "no encoder for dict"),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_input_gets_a_clear_error(case):
    name, call, error, words = bad_inputs()[case]
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value), (name, str(info.value))
