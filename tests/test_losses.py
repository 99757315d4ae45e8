"Known answers for the JEPA losses and collapse diagnostics (jepa_lab.losses), plus a small learning test."
import math

import pytest
import torch
import torch.nn.functional as F

from jepa_lab.losses import (COLLAPSE_MIN_RANK_FRACTION, REGRESSION_KINDS, CollapseAlarm, LossInputError,
                             collapse_report, effective_rank, epps_pulley_grid, info_nce_loss, latent_regression_loss,
                             mean_pairwise_cosine, sigreg_loss, sigreg_null_mean, vicreg_loss)

N, D = 256, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (conftest.py)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def whiten(x):
    "Centred (N, D) rows whose sample covariance (1/(N-1)) is exactly the identity."
    x = x.double() - x.double().mean(0)
    u, _, _ = torch.linalg.svd(x, full_matrices=False)
    return (u * math.sqrt(x.size(0) - 1)).float()


# ---------------------------------------------------------------- latent regression

@pytest.mark.parametrize("kind", REGRESSION_KINDS)
def test_regression_is_zero_for_a_perfect_prediction(kind):
    target = torch.randn(3, 5, 16, generator=gen())
    assert latent_regression_loss(F.layer_norm(target, (16,)), target, kind) < 1e-6
    assert latent_regression_loss(target, target, kind, normalize_target=False) < 1e-6
    assert latent_regression_loss(torch.randn(3, 5, 16, generator=gen(1)), target, kind) > 0.1


@pytest.mark.parametrize("kind", REGRESSION_KINDS)
def test_layer_normed_target_makes_the_loss_invariant_to_target_scale(kind):
    pred, target = torch.randn(2, 2, 4, 16, generator=gen())
    base = latent_regression_loss(pred, target, kind)
    for scale, shift in [(10.0, 0.0), (0.1, 0.0), (3.0, -5.0)]:   # variance stays ≫ layer_norm eps 1e-5
        assert torch.allclose(latent_regression_loss(pred, scale * target + shift, kind), base, rtol=1e-3, atol=1e-5)
    if kind != "cosine":   # cosine ignores scale anyway; the others must change without the layer norm
        raw = latent_regression_loss(pred, target, kind, normalize_target=False)
        assert latent_regression_loss(pred, 10 * target, kind, normalize_target=False) > 5 * raw


def test_regression_matches_torch_and_mask_averages_only_predicted_positions():
    pred, target = torch.randn(2, 4, 6, 8, generator=gen())
    assert torch.allclose(latent_regression_loss(pred, target, "smooth_l1", normalize_target=False),
                          F.smooth_l1_loss(pred, target))
    assert torch.allclose(latent_regression_loss(pred, target, "mse", normalize_target=False), F.mse_loss(pred, target))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 1] = mask[2, 4] = mask[3, 0] = True
    per_pos = (pred - target).abs().mean(-1)                                  # (4, 6)
    expected = (per_pos[0, 1] + per_pos[2, 4] + per_pos[3, 0]) / 3
    got = latent_regression_loss(pred, target, "l1", normalize_target=False, mask=mask)
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, per_pos.mean())


# ---------------------------------------------------------------- VICReg

def test_vicreg_constant_batch_pays_the_full_variance_hinge():
    const = torch.full((N, D), 3.0)
    t = vicreg_loss(const, const)
    assert t.variance.item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-6)    # 0.99 per dim, both views averaged
    assert t.loss.item() == pytest.approx(25 * 0.99, abs=1e-4)
    assert t.invariance == 0 and t.covariance == 0


def test_vicreg_variance_is_zero_when_every_dim_has_std_at_least_one():
    z = torch.randn(N, D, generator=gen())
    z = (z - z.mean(0)) / z.std(0) * torch.linspace(1.0, 4.0, D)           # std exactly 1 … 4
    assert vicreg_loss(z, z).variance == 0
    assert vicreg_loss(0.5 * z, 0.5 * z).variance > 0                        # half the dims now under 1


def test_vicreg_covariance_zero_when_whitened_and_d_minus_one_when_duplicated():
    white = whiten(torch.randn(N, D, generator=gen()))
    assert vicreg_loss(white, white).covariance < 1e-8
    col = torch.randn(N, 1, generator=gen(1))
    dup = ((col - col.mean()) / col.std()).expand(N, D)                       # every off-diagonal covariance = 1
    assert vicreg_loss(dup, dup).covariance.item() == pytest.approx(2 * (D - 1), rel=1e-4)   # D(D-1)/D per view


def test_vicreg_invariance_is_zero_for_identical_views_and_mse_otherwise():
    a, b = torch.randn(2, N, D, generator=gen())
    assert vicreg_loss(a, a).invariance == 0
    assert torch.allclose(vicreg_loss(a, b).invariance, F.mse_loss(a, b))


def test_vicreg_matches_the_official_forward():
    "A line-by-line transcription of VICReg.forward in facebookresearch/vicreg main_vicreg.py (one process)."
    x, y = torch.randn(2, 64, 16, generator=gen()) * torch.linspace(0.2, 2, 16)

    def off_diagonal(m):
        n, _ = m.shape
        return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x, cov_y = (x.T @ x) / (64 - 1), (y.T @ y) / (64 - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(16) + off_diagonal(cov_y).pow_(2).sum().div(16)
    official = 25.0 * repr_loss + 25.0 * std_loss + 1.0 * cov_loss
    ours = vicreg_loss(*torch.randn(2, 64, 16, generator=gen()) * torch.linspace(0.2, 2, 16))
    assert torch.allclose(ours.loss, official, rtol=1e-5)
    assert torch.allclose(ours.variance, std_loss) and torch.allclose(ours.covariance, cov_loss, rtol=1e-5)


# ---------------------------------------------------------------- InfoNCE

@pytest.mark.parametrize("tau,dim,tol", [(1.0, 32, 0.05), (0.07, 4096, 0.05)])
def test_infonce_of_random_features_is_log_b_in_expectation(tau, dim, tol):
    """Mean over 20 seeds of random pairs: log B + σ²/2, σ = 1/(τ√D) the logits' std (σ²/2 ≤ 0.025 here).

    Tolerance 0.05 nats: the per-seed std measured in the lesson is about 0.02–0.03, so the mean of 20 is ±0.006."""
    B = 64
    g = gen()
    losses = torch.stack([info_nce_loss(torch.randn(B, dim, generator=g), torch.randn(B, dim, generator=g), tau).loss
                          for _ in range(20)])
    assert abs(losses.mean().item() - math.log(B)) < tol
    accuracy = info_nce_loss(torch.randn(B, dim, generator=g), torch.randn(B, dim, generator=g), tau).accuracy
    assert accuracy < 0.2                                                      # chance is 1/64


def test_infonce_is_zero_for_aligned_well_separated_pairs_and_accuracy_counts_matches():
    B = 32
    eye = torch.eye(B)                                                         # orthonormal: cos 1 vs 0, logits 14.3 vs 0
    res = info_nce_loss(eye, 5 * eye)                                          # scale is normalised away
    assert res.loss < 1e-4 and res.accuracy == 1
    shifted = info_nce_loss(eye, eye.roll(1, dims=0))                          # every partner is someone else's
    assert shifted.accuracy == 0 and shifted.loss > 10


# ---------------------------------------------------------------- SIGReg

def test_sigreg_grid_matches_the_reference_constants():
    t, phi, w = epps_pulley_grid()
    assert len(t) == 17 and t[0] == 0 and t[-1] == 3
    dt = 3 / 16
    assert torch.allclose(w / phi, torch.tensor([dt] + [2 * dt] * 15 + [dt], dtype=w.dtype))


def test_sigreg_matches_the_complex_form_on_the_symmetric_grid():
    "Independent check: N·∫_{-3}^{3} |ECF − φ|² e^{-t²/2} dt by torch.trapezoid with complex exp on 33 knots."
    z = torch.randn(N, D, generator=gen()) * 1.3 + 0.2
    ours = sigreg_loss(z, gen(7), num_slices=16)
    A = torch.randn(D, 16, generator=gen(7))
    x = (z @ (A / A.norm(dim=0))).double()                                      # (N, M)
    t = torch.linspace(-3, 3, 33, dtype=torch.float64)
    ecf = torch.exp(1j * x.unsqueeze(-1) * t).mean(0)                          # (M, 33)
    integrand = (ecf - torch.exp(-t**2 / 2)).abs().square() * torch.exp(-t**2 / 2)
    reference = (torch.trapezoid(integrand, t, dim=-1) * N).mean()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-4)


def test_sigreg_small_for_gaussian_large_for_collapsed():
    null = sigreg_null_mean()
    assert null == pytest.approx(1.052, abs=1e-3)
    g = gen(1)
    gauss = sigreg_loss(torch.randn(N, D, generator=gen()), g).item()
    rank1 = torch.randn(N, 1, generator=gen(2)) * F.normalize(torch.randn(1, D, generator=gen(3)), dim=-1) * math.sqrt(D)
    assert abs(gauss - null) < 0.5
    for collapsed in (torch.zeros(N, D), torch.ones(N, D), rank1):
        assert sigreg_loss(collapsed, g).item() > 20 * null


def test_sigreg_for_true_gaussians_stays_at_the_null_mean_while_t_over_n_goes_to_zero():
    "E[T] = Σ w (1 − φ²) for every N, so T/N (the squared ECF distance) falls like 1/N; a non-Gaussian's T grows."
    g, sg = gen(), gen(1)
    null = sigreg_null_mean()
    sizes = [64, 256, 1024, 4096]
    gauss = [sum(sigreg_loss(torch.randn(n, D, generator=g), sg, 64).item() for _ in range(8)) / 8 for n in sizes]
    assert all(abs(v - null) < 0.3 for v in gauss)
    per_sample = [v / n for v, n in zip(gauss, sizes)]
    assert all(b < 0.4 * a for a, b in zip(per_sample, per_sample[1:])) and per_sample[-1] < 1e-3
    scale = lambda n: torch.where(torch.rand(n, 1, generator=g) < 0.5, 0.5, math.sqrt(1.75))
    mix = [sigreg_loss(scale(n) * torch.randn(n, D, generator=g), sg, 64).item() for n in sizes]
    assert mix[-1] > 10 * mix[0] and mix[-1] > 5 * null


def test_sigreg_draws_fresh_directions_from_the_generator():
    z = torch.randn(N, 1, generator=gen()) * torch.randn(1, D, generator=gen(1))
    g = gen(5)
    first, second = sigreg_loss(z, g), sigreg_loss(z, g)
    assert first != second                                                     # the generator advanced
    assert sigreg_loss(z, gen(5)) == first                                     # same seed, same directions


# ---------------------------------------------------------------- diagnostics

def test_effective_rank_is_d_for_whitened_and_one_for_rank_one():
    white = whiten(torch.randn(N, D, generator=gen()))
    assert effective_rank(white) == pytest.approx(D, rel=1e-3)
    rank1 = torch.randn(N, 1, generator=gen(1)) @ torch.randn(1, D, generator=gen(2))
    assert effective_rank(rank1) == pytest.approx(1, abs=1e-3)
    assert effective_rank(torch.ones(N, D)) == pytest.approx(1, abs=1e-3)      # a point: uncentred, as in RankMe
    half = torch.cat([white[:, :D // 2], torch.zeros(N, D // 2)], 1)
    assert effective_rank(half) == pytest.approx(D / 2, rel=1e-3)


def test_collapse_report_and_alarm():
    z = torch.randn(N, D, generator=gen())
    rep = collapse_report(z)
    assert rep["dim"] == D and rep["n"] == N and rep["rank_fraction"] > 0.85
    assert rep["std_min"] <= rep["std_mean"] and abs(rep["std_mean"] - 1) < 0.05 and abs(rep["mean_cosine"]) < 0.02
    u = F.normalize(z, dim=-1)
    brute = ((u @ u.T).sum() - N) / (N * (N - 1))
    assert mean_pairwise_cosine(z) == pytest.approx(brute.item(), abs=1e-5)
    alarm = CollapseAlarm()
    assert alarm(z) == []
    point = torch.ones(N, D) + 1e-4 * torch.randn(N, D, generator=gen(1))
    reasons = alarm(point)
    assert len(reasons) == 2 and "effective rank" in reasons[0] and "std" in reasons[1]
    small = 0.01 * z                                                           # full rank but tiny: only the std alarm
    assert [r for r in alarm(small) if "std" in r] and not [r for r in alarm(small) if "rank" in r]
    assert CollapseAlarm(min_std=0.001)(small) == []
    assert COLLAPSE_MIN_RANK_FRACTION == alarm.min_rank_fraction


# ---------------------------------------------------------------- gradients and bad input

LOSSES = {
    "regression": (lambda p, t: latent_regression_loss(p, t, mask=torch.rand(4, 6, generator=gen()) < 0.5), [(4, 6, 16)] * 2),
    "regression_cosine": (lambda p, t: latent_regression_loss(p, t, "cosine"), [(4, 6, 16)] * 2),
    "vicreg": (lambda a, b: vicreg_loss(a, b).loss, [(N, D)] * 2),
    "infonce": (lambda a, b: info_nce_loss(a, b).loss, [(N, D)] * 2),
    "sigreg": (lambda z: sigreg_loss(z, gen()), [(N, D)]),
}


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_passes_finite_nonzero_gradients(name):
    fn, shapes = LOSSES[name]
    g = gen(3)
    xs = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]
    fn(*xs).backward()
    for x in xs:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


nan = torch.full((8, 4), float("nan"))
good = torch.randn(8, 4, generator=gen())
BAD = [
    ("views of different shapes", lambda: vicreg_loss(good, good[:, :2]), "same shape"),
    ("infonce views of different shapes", lambda: info_nce_loss(good, good[:5]), "same shape"),
    ("regression shapes", lambda: latent_regression_loss(good, good[:, :3]), "same shape"),
    ("vicreg batch of one", lambda: vicreg_loss(good[:1], good[:1]), "batch of 1"),
    ("sigreg batch of one", lambda: sigreg_loss(good[:1]), "batch of 1"),
    ("infonce batch of one", lambda: info_nce_loss(good[:1], good[:1]), "batch of 1"),
    ("nan in vicreg", lambda: vicreg_loss(good, nan), "NaN"),
    ("nan in sigreg", lambda: sigreg_loss(nan), "NaN"),
    ("nan in infonce", lambda: info_nce_loss(nan, good), "NaN"),
    ("nan in regression", lambda: latent_regression_loss(good, nan), "NaN"),
    ("nan in diagnostics", lambda: collapse_report(nan), "NaN"),
    ("3-D input to vicreg", lambda: vicreg_loss(good[None], good[None]), "(N, D)"),
    ("unknown regression kind", lambda: latent_regression_loss(good, good, "huber"), "huber"),
    ("float mask", lambda: latent_regression_loss(good, good, mask=torch.ones(8)), "boolean"),
    ("mask of wrong shape", lambda: latent_regression_loss(good, good, mask=torch.ones(4, dtype=torch.bool)), "shape"),
    ("empty mask", lambda: latent_regression_loss(good, good, mask=torch.zeros(8, dtype=torch.bool)), "no position"),
    ("even knots", lambda: sigreg_loss(good, knots=16), "odd"),
    ("no slices", lambda: sigreg_loss(good, num_slices=0), "num_slices"),
    ("zero temperature", lambda: info_nce_loss(good, good, temperature=0), "temperature"),
]


@pytest.mark.parametrize("what,call,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_clear_error(what, call, words):
    with pytest.raises(LossInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


# ---------------------------------------------------------------- learning

def train(kind, steps=200, seed=0):
    "Two noisy views of random data through a tiny MLP; returns the held-out effective rank after training."
    torch.manual_seed(seed)
    data, held_out = torch.randn(2048, 16), torch.randn(256, 16)
    noise = torch.linspace(0.05, 0.5, 16)
    enc = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    g = gen(seed)
    for _ in range(steps):
        x = data[torch.randint(0, 2048, (128,))]
        z = enc(torch.stack([x + noise * torch.randn_like(x), x + noise * torch.randn_like(x)]))
        loss = F.mse_loss(z[0], z[1])
        if kind == "vicreg": loss = vicreg_loss(z[0], z[1]).loss
        if kind == "sigreg": loss = 0.95 * loss + 0.05 * sigreg_loss(z, g, 64)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): return collapse_report(enc(held_out))


def test_regularisers_prevent_the_collapse_that_invariance_alone_reaches():
    "Baseline: invariance alone. Margin: regularised rank > 0.6·D and > 4× the collapsed rank; alarm only on the baseline."
    collapsed = train("invariance")
    alarm = CollapseAlarm()
    assert collapsed["effective_rank"] < COLLAPSE_MIN_RANK_FRACTION * 16 and alarm.reasons(collapsed)
    for kind in ("vicreg", "sigreg"):
        rep = train(kind)
        assert rep["effective_rank"] > 0.6 * 16 and rep["effective_rank"] > 4 * collapsed["effective_rank"], (kind, rep)
        assert alarm.reasons(rep) == [], (kind, rep)
