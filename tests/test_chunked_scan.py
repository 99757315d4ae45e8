"Lesson 04a: the chunked SSD scan equals the loop (outputs, final state, gradients), names bad inputs, and its block is causal and learns."
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jepa_lab.chunked_scan import (SSDBlock, SSDConfig, ScanInputError, benchmark_ssd, random_ssd_inputs, segsum, ssd_chunked,
                                   ssd_scan, ssd_sequential, state_passing)
from jepa_lab.encoders import EncoderConfigError, EncoderInputError


@pytest.fixture(autouse=True)
def seeded(one_thread):
    torch.manual_seed(0)


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(fn, inputs, state, **kwargs):
    "[y, final state, ∂loss/∂(x, Δ, A, B, C, D, initial state)] for a loss that weights positions differently."
    y, final = fn(*inputs, initial_state=state, **kwargs)
    weights = torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)[:, None, None]
    loss = (y * weights).square().sum() + final.square().sum()
    return [y, final, *torch.autograd.grad(loss, [*inputs, state])]


def inputs_and_state(length, heads=3, head_dim=4, d_state=5, dtype=torch.float64, seed=0):
    inputs = random_ssd_inputs(2, length, heads, head_dim, d_state, dtype=dtype, seed=seed, requires_grad=True)
    return inputs, torch.randn(2, heads, head_dim, d_state, dtype=dtype, requires_grad=True)


# ---------------------------------------------------------------- chunked == sequential

@pytest.mark.parametrize("length,chunk", [(1, 16), (7, 3), (16, 16), (100, 16), (129, 7), (333, 5)])
def test_chunked_matches_loop_in_float64(length, chunk):
    inputs, state = inputs_and_state(length, seed=length)
    ref = outputs_and_grads(ssd_sequential, inputs, state)
    got = outputs_and_grads(ssd_chunked, inputs, state, chunk=chunk)
    names = ["y", "final state", "dx", "dΔ", "dA", "dB", "dC", "dD", "d initial state"]
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape and rel_err(g, r) < 1e-12, (name, length, chunk, rel_err(g, r))


def test_chunked_matches_loop_in_float32_at_a_ragged_length():
    inputs, state = inputs_and_state(300, heads=4, head_dim=16, d_state=16, dtype=torch.float32, seed=1)
    ref = outputs_and_grads(ssd_sequential, inputs, state)
    got = outputs_and_grads(ssd_chunked, inputs, state, chunk=16)     # 300 = 18 · 16 + 12: a padded last chunk
    assert rel_err(got[0], ref[0]) < 1e-5 and rel_err(got[1], ref[1]) < 1e-5
    assert max(rel_err(g, r) for g, r in zip(got[2:], ref[2:])) < 1e-4


def test_chunk_sizes_agree_and_without_D_or_state():
    x, dt, A, B, C, D = random_ssd_inputs(2, 200, 2, 4, 3, dtype=torch.float64, seed=5)
    outs = [ssd_chunked(x, dt, A, B, C, chunk=chunk) for chunk in (1, 7, 64, 500)]
    ref = ssd_sequential(x, dt, A, B, C)
    for y, final in outs:
        assert torch.allclose(y, ref[0], atol=1e-12) and torch.allclose(final, ref[1], atol=1e-12)


def test_a_state_carries_from_one_call_to_the_next():
    x, dt, A, B, C, D = random_ssd_inputs(2, 300, 4, 8, 8, dtype=torch.float64, seed=3)
    whole, whole_state = ssd_chunked(x, dt, A, B, C, D)
    first, mid = ssd_chunked(x[:, :137], dt[:, :137], A, B[:, :137], C[:, :137], D)
    second, end = ssd_chunked(x[:, 137:], dt[:, 137:], A, B[:, 137:], C[:, 137:], D, initial_state=mid, chunk=9)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-12) and torch.allclose(end, whole_state, atol=1e-12)
    cold, _ = ssd_chunked(x[:, 137:], dt[:, 137:], A, B[:, 137:], C[:, 137:], D)
    assert (cold - whole[:, 137:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunks,block", [(1, 8), (5, 8), (8, 8), (9, 8), (64, 8), (100, 2)])
def test_state_passing_is_the_chunk_recurrence(chunks, block):
    log_decay = -torch.rand(2, 3, chunks, dtype=torch.float64) * 3
    states, initial = torch.randn(2, 3, chunks, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    entering, final = state_passing(log_decay, states, initial, block)
    H, expected = initial, []
    for k in range(chunks):
        expected.append(H)
        H = log_decay[:, :, k, None].exp() * H + states[:, :, k]
    assert torch.allclose(entering, torch.stack(expected, 2), atol=1e-12) and torch.allclose(final, H, atol=1e-12)


def test_segsum_is_the_masked_segment_sum():
    a = -torch.rand(4, 12, dtype=torch.float64)
    s = segsum(a)
    for i in range(12):
        for j in range(12):
            if j <= i: assert abs(s[2, i, j] - a[2, j + 1:i + 1].sum()) < 1e-14
            else: assert s[2, i, j] == float("-inf")
    a32 = -torch.rand(64, dtype=torch.float64) * 4                     # decays down to about e^−128 over the chunk
    truth = segsum(a32).exp()
    err = ((segsum(a32.float()).exp().double() - truth).abs() / truth.clamp_min(1e-30))[truth > 1e-6].max()
    assert err < 1e-5


def test_scan_dispatches_to_both_paths():
    x, dt, A, B, C, D = random_ssd_inputs(2, 40, 4, 8, 8)
    y_seq, s_seq = ssd_scan(x, dt, A, B, C, D, parallel=False)
    y_par, s_par = ssd_scan(x, dt, A, B, C, D, chunk=8)
    assert torch.equal(y_seq, ssd_sequential(x, dt, A, B, C, D)[0])
    assert torch.allclose(y_par, y_seq, atol=1e-5) and torch.allclose(s_par, s_seq, atol=1e-5)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name,change", [
    ("x", lambda a: {"x": a["x"][0]}),
    ("dt", lambda a: {"dt": a["dt"][..., :3]}),
    ("A", lambda a: {"A": torch.rand(32, 8)}),
    ("A", lambda a: {"A": a["A"][:2]}),
    ("B", lambda a: {"B": a["B"][:, :49]}),
    ("C", lambda a: {"C": a["C"][..., :7]}),
    ("D", lambda a: {"D": a["D"][:2]}),
    ("initial_state", lambda a: {"initial_state": torch.zeros(2, 4, 8, 9)}),
    ("chunk", lambda a: {"chunk": 0}),
    ("chunk", lambda a: {"chunk": 2.5}),
])
def test_bad_inputs_name_the_argument(name, change):
    x, dt, A, B, C, D = random_ssd_inputs(2, 50, 4, 8, 8)
    args = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D}
    with pytest.raises(ScanInputError, match=rf"^ssd_scan: {name} must") as e:
        ssd_scan(**(args | change(args)))
    assert isinstance(e.value, ValueError)
    if name != "chunk" and name != "x": assert "got" in str(e.value) and "=" in str(e.value)   # the expected shape, then the actual


def test_per_channel_A_gets_a_hint():
    x, dt, A, B, C, D = random_ssd_inputs(2, 10, 4, 8, 8)
    with pytest.raises(ScanInputError, match="lesson 04"):
        ssd_scan(x, dt, torch.rand(32, 8), B, C, D)


# ---------------------------------------------------------------- block

def test_block_is_causal_and_returns_its_state():
    block = SSDBlock(SSDConfig(dim=32, heads=2, d_state=8, chunk=8)).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        y, state = block(x, return_state=True)
        y_seq, state_seq = block(x, return_state=True, parallel=False)
        changed = x.clone()
        changed[:, 23:] = torch.randn(2, 17, 32)
        y_changed = block(changed)
    assert y.shape == x.shape and state.shape == (2, 2, 32, 8) and torch.is_tensor(block(x))
    assert torch.allclose(y, y_seq, atol=1e-5) and torch.allclose(state, state_seq, atol=1e-5)
    assert torch.allclose(y_changed[:, :23], y[:, :23], atol=1e-6)
    assert (y_changed[:, 23:] - y[:, 23:]).abs().max() > 1e-2


def test_block_and_config_reject_bad_input():
    block = SSDBlock(SSDConfig(dim=16))
    for bad in [torch.randn(5, 16), torch.randn(2, 5, 8), torch.randint(0, 3, (2, 5, 16)), torch.randn(2, 0, 16)]:
        with pytest.raises(EncoderInputError, match="SSDBlock expects"):
            block(bad)
    assert SSDConfig(dim=64, heads=4).head_dim == 32 and SSDConfig(dim=64, heads=4, head_dim=8).d_inner == 32
    for kwargs in [dict(dim=64, heads=3), dict(chunk=0), dict(dt_min=0.5, dt_max=0.1), dict(d_state=0)]:
        with pytest.raises(EncoderConfigError):
            SSDConfig(**kwargs)


def test_benchmark_reports_both_models(capsys):
    r = benchmark_ssd(length=64, repeats=1)
    out = capsys.readouterr().out
    assert "chunked SSD" in out and "Blelloch scan" in out
    assert r["rel_err_y"] < 1e-5 and r["rel_err_grad"] < 1e-4 and r["fwd_speedup"] > 0 and r["mamba1"]["length"] == 64
    assert r["mamba1"]["d_inner"] == r["heads"] * r["head_dim"]


# ---------------------------------------------------------------- learning

def latest_write_batch(batch, generator, length=64, values=8, p_write=0.1):
    "Ids (0 blank, 1 + v = write v) and, at each position, the value of the latest write so far."
    write = torch.rand(batch, length, generator=generator) < p_write
    write[:, 0] = True
    vals = torch.randint(0, values, (batch, length), generator=generator)
    latest = torch.where(write, torch.arange(length), 0).cummax(1).values
    return torch.where(write, vals + 1, 0), vals.gather(1, latest)


class SSDRecall(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.embed, self.block = nn.Embedding(9, dim), SSDBlock(SSDConfig(dim=dim))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, 8)

    def forward(self, ids): return self.head(self.norm(self.block(self.embed(ids))))


class BagOfTokens(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.embed = nn.Embedding(9, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, 8))

    def forward(self, ids):
        e = self.embed(ids)
        return self.mlp(torch.cat([e.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None], e], -1))


def recall_accuracy(model, steps=150):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        ids, target = latest_write_batch(32, g)
        loss = F.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        opt.zero_grad(); loss.backward(); opt.step()
    ids, target = latest_write_batch(512, torch.Generator().manual_seed(10_000))
    with torch.no_grad(): return (model(ids).argmax(-1) == target).float().mean().item()


def test_ssd_learns_latest_write_recall_that_a_bag_of_tokens_cannot():
    torch.manual_seed(0)
    ssd = recall_accuracy(SSDRecall())
    torch.manual_seed(0)
    bag = recall_accuracy(BagOfTokens())
    assert ssd > 0.9 and ssd > bag + 0.25, (ssd, bag)                 # measured: 0.977 vs 0.545, chance 0.125


def test_ssd_block_padding_in_front_changes_nothing():
    "Padded steps (keep False) at the front: the real steps' outputs and the final state equal those of the unpadded input."
    torch.manual_seed(0)
    block = SSDBlock(SSDConfig(dim=16, heads=2, d_state=4, chunk=4)).eval()
    with torch.no_grad(): block.conv.bias.fill_(1.0)                    # a trained conv has a bias: padding would read it
    x = torch.randn(1, 9, 16)
    padded = torch.cat([torch.zeros(1, 3, 16), x], 1)
    keep = torch.tensor([[False] * 3 + [True] * 9])
    y, s = block(x, return_state=True)
    yp, sp = block(padded, return_state=True, keep=keep)
    assert torch.allclose(yp[:, 3:], y, atol=1e-6) and torch.allclose(sp, s, atol=1e-6) and yp[:, :3].abs().max() == 0
    y_unmasked, _ = block(padded, return_state=True)                    # without the mask the padding leaks in
    assert not torch.allclose(y_unmasked[:, 3:], y, atol=1e-4)
    with pytest.raises(EncoderInputError, match="keep"):
        block(x, keep=torch.ones(1, 9))
