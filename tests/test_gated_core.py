"""Lesson 12a: adapters (only A and B learn, identity at init, removal restores, a measured gain), the gated core
(no apply without approval, exact apply and revert, one audit line per step, reopen, SIGKILL mid-apply, a corrupt
snapshot, a stale proposal, the review panel), AUROC against brute force, abstention, and int8 against torch."""
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jepa_lab.core import CheckpointError, save_checkpoint, weights_equal
from jepa_lab.gated_core import (ApprovalError, GatedCore, GatedCoreError, Int8Linear, LowRankAdapter, abstain_accuracy,
                                 adapter_parameters, add_adapters, auroc, compact_int8, fit_adapters, load_int8,
                                 proposal_panel, quantize_per_channel, remove_adapters, state_bytes)

ARCH = "nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))"
X = torch.randn(64, 8, generator=torch.Generator().manual_seed(9))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return eval(ARCH)


def evaluate(m) -> dict:
    with torch.no_grad(): return {"mean_out": round(float(m(X).mean()), 6)}


def scale_by(f: float):
    def update(m):
        with torch.no_grad():
            for p in m.parameters(): p.mul_(f)
    return update


def state(m) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def store_files(store) -> dict:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def expected_after(model, update) -> dict:
    import copy
    m = copy.deepcopy(model); update(m)
    return state(m)


# ---- working memory

def test_adapters_start_as_identity_train_alone_and_come_off_cleanly():
    m, x = mlp(), torch.randn(5, 8)
    originals, before, y0 = [m[0], m[2]], state(m), m(x)
    assert add_adapters(m, rank=2) == ["0", "2"] and isinstance(m[0], LowRankAdapter)
    assert torch.equal(m(x), y0)                                                     # B = 0
    m(x).square().sum().backward()
    adapter_ids = {id(p) for p in adapter_parameters(m)}
    assert len(adapter_ids) == 4
    assert all((p.grad is not None) == (id(p) in adapter_ids) for p in m.parameters())
    with pytest.raises(ValueError, match="already has adapters"): add_adapters(m)
    assert remove_adapters(m) == ["0", "2"]
    assert m[0] is originals[0] and m[2] is originals[1] and weights_equal(before, m.state_dict())
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="not an nn.Linear"): add_adapters(m, names=["1"])
    with pytest.raises(ValueError, match="no adapters"): fit_adapters(m, lambda m: m(x).sum(), 1)


def test_fitted_adapters_lower_a_shifted_tasks_held_out_loss():
    model, teacher = mlp(0), mlp(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                                            # the shifted task: a rank-2 change of layer 0
        teacher[0].weight += torch.randn(32, 2, generator=g) @ torch.randn(2, 8, generator=g) * 0.5
    x_sup, x_test = torch.randn(64, 8, generator=g), torch.randn(500, 8, generator=g)
    with torch.no_grad(): y_sup, y_test = teacher(x_sup), teacher(x_test)
    with torch.no_grad(): plain = F.mse_loss(model(x_test), y_test).item()
    before = state(model)
    add_adapters(model, rank=4, names=["0"])
    losses = fit_adapters(model, lambda m: F.mse_loss(m(x_sup), y_sup), steps=150, lr=1e-2)
    with torch.no_grad(): adapted = F.mse_loss(model(x_test), y_test).item()
    remove_adapters(model)
    assert losses[-1] < losses[0] / 10
    assert adapted < plain * 0.3, (plain, adapted)
    assert weights_equal(before, model.state_dict())                                # the base never moved


# ---- the gated core

@pytest.fixture
def core(tmp_path):
    return GatedCore(mlp(), tmp_path / "store", evaluate)


def test_apply_without_approval_raises_and_leaves_weights_and_store_untouched(core):
    p = core.propose(scale_by(1.5), "scale")
    weights, files = state(core.model), store_files(core.store)
    with pytest.raises(ApprovalError, match=rf"{p.id}.*approve\('{p.id}', by=\.\.\.\)"): core.apply(p.id)
    assert weights_equal(weights, core.model.state_dict()) and store_files(core.store) == files


def test_approve_apply_revert_are_exact(core):
    start = state(core.model)
    expected = expected_after(core.model, scale_by(1.1))
    p = core.propose(scale_by(1.1), "scale 1.1")
    assert weights_equal(start, core.model.state_dict())                              # proposing changes nothing live
    assert p.metrics_before == evaluate(mlp()) and p.metrics_after["mean_out"] != p.metrics_before["mean_out"]
    assert p.summary["changed"] == p.summary["tensors"] == 4 and abs(p.summary["top"][0][1] - 0.1) < 1e-6
    core.approve(p.id, by="ada")
    assert core.apply(p.id) == 1 and weights_equal(expected, core.model.state_dict())
    assert core.current_state()["state"] == 1 and core.proposal(p.id).status == "applied"
    assert core.revert() == 0
    assert all(torch.equal(v, start[k]) for k, v in core.model.state_dict().items())
    core.revert(to=1)
    assert all(torch.equal(v, expected[k]) for k, v in core.model.state_dict().items())
    with pytest.raises(ApprovalError, match="already applied"): core.apply(p.id)
    with pytest.raises(GatedCoreError, match="no parent"): core.revert(); core.revert()


def test_rejected_proposals_cannot_be_applied_or_approved(core):
    p = core.propose(scale_by(2.0), "double")
    with pytest.raises(ValueError, match="name"): core.reject(p.id, by=" ")
    core.reject(p.id, by="bob", why="too big")
    with pytest.raises(ApprovalError, match="rejected by bob"): core.apply(p.id)
    with pytest.raises(ApprovalError, match="already rejected"): core.approve(p.id, by="ada")
    with pytest.raises(GatedCoreError, match="changed no tensor"): core.propose(lambda m: None, "nothing")


def test_audit_log_has_one_parseable_line_per_step_and_reopen_restores(core, tmp_path):
    p = core.propose(scale_by(0.9), "shrink")
    core.approve(p.id, by="ada")
    core.apply(p.id)
    q = core.propose(scale_by(3.0), "grow")
    core.reject(q.id, by="ada", why="no")
    core.revert(by="ada")
    lines = (core.store / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(l) for l in lines]
    assert [e["action"] for e in entries] == ["init", "propose", "approve", "apply-begin", "apply-done", "propose", "reject",
                                              "revert-begin", "revert-done"]
    assert all({"time", "action", "id", "by", "metrics", "state", "state_sha256"} <= e.keys() for e in entries)
    assert entries[2]["by"] == "ada" and entries[4]["state"] == 1 and entries[1]["metrics"]["after"] == p.metrics_after
    live = state(core.model)
    other = mlp(seed=5)
    reopened = GatedCore(other, core.store, evaluate)
    assert weights_equal(live, other.state_dict()) and reopened.current_state()["state"] == 0
    assert [(x.id, x.status, x.decided_by) for x in reopened.proposals()] == [(p.id, "applied", "ada"), (q.id, "rejected", "ada")]
    assert reopened.history()[-1]["action"] == "open"


def test_a_stale_proposal_and_a_model_changed_outside_the_core_are_refused(core):
    a, b = core.propose(scale_by(1.2), "a"), core.propose(scale_by(0.8), "b")
    core.approve(a.id, by="ada"); core.approve(b.id, by="ada")
    core.apply(a.id)
    with pytest.raises(GatedCoreError, match="measured against state 0 but state 1"): core.apply(b.id)
    with torch.no_grad(): core.model[0].bias.add_(1)
    with pytest.raises(GatedCoreError, match=r"differ from state 1 in 0\.bias"): core.propose(scale_by(2), "c")


CHILD = """
import torch
from torch import nn
from jepa_lab.gated_core import GatedCore
model = {arch}
core = GatedCore(model, {store!r}, lambda m: {{}})
core.approve({pid!r}, by="night batch")
core.apply({pid!r})
print("not killed")
"""


@pytest.mark.parametrize("point, survives", [("after-begin", "old"), ("after-snapshot", "old"), ("after-pointer", "new")])
def test_sigkill_mid_apply_leaves_one_whole_state_and_a_consistent_log(core, point, survives):
    "The protocol: before the pointer switch the old state is live, from it on the new one; never a mix."
    old = state(core.model)
    p = core.propose(scale_by(1.3), "scale")
    new = expected_after(core.model, scale_by(1.3))
    env = {**os.environ, "GATED_CORE_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD.format(arch=ARCH, store=str(core.store), pid=p.id)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    model = mlp(seed=7)
    with pytest.warns(UserWarning, match="never finished"):
        reopened = GatedCore(model, core.store, evaluate)
    want = old if survives == "old" else new
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    entries = [json.loads(l) for l in (core.store / "audit.jsonl").read_text().splitlines()]
    abandoned = [e for e in entries if e["action"] == "apply-abandoned"]
    assert len(abandoned) == 1 and abandoned[0]["id"] == p.id
    assert abandoned[0]["outcome"] == ("old state kept" if survives == "old" else "new state live")
    assert not list(core.store.rglob("*.tmp"))
    if survives == "old":
        assert reopened.proposal(p.id).status == "approved" and reopened.current_state()["state"] == 0
        reopened.apply(p.id)                                                          # the approval stands
        assert weights_equal(new, model.state_dict())
    else:
        assert reopened.proposal(p.id).status == "applied" and reopened.current_state()["state"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GatedCore(mlp(), core.store, evaluate)                                       # reported once, not on every reopen


def test_a_corrupt_or_missing_snapshot_is_named(core):
    p = core.propose(scale_by(1.1), "x")
    core.approve(p.id, by="ada"); core.apply(p.id)
    path = core.store / "states" / "1.safetensors"
    data = bytearray(path.read_bytes()); data[-3] ^= 0xFF; path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"states/1\.safetensors of state 1 is corrupt"):
        GatedCore(mlp(), core.store, evaluate)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"states/1\.safetensors of state 1 is missing"):
        GatedCore(mlp(), core.store, evaluate)
    core.revert()                                                                   # state 0 is intact
    weights = state(core.model)
    with pytest.raises(CheckpointError, match="1.safetensors"): core.revert(to=1)
    assert weights_equal(weights, core.model.state_dict()) and core.current_state()["state"] == 0


def test_the_panel_buttons_approve_and_reject(core):
    a, b = core.propose(scale_by(1.1), "a"), core.propose(scale_by(0.9), "b")
    panel = proposal_panel(core)
    assert set(panel.buttons) == {(a.id, "approve"), (a.id, "reject"), (b.id, "approve"), (b.id, "reject")}
    panel.buttons[a.id, "approve"].click()                                           # no name: refused, said in the panel
    assert core.proposal(a.id).status == "proposed" and "name" in panel.message.value
    panel.by.value = "ada"
    panel.buttons[a.id, "approve"].click()
    assert (core.proposal(a.id).status, core.proposal(a.id).decided_by) == ("approved", "ada")
    assert panel.buttons[a.id, "approve"].disabled                                   # refreshed after the click
    panel.why.value = "shrinks"
    panel.buttons[b.id, "reject"].click()
    assert (core.proposal(b.id).status, core.proposal(b.id).decided_by, core.proposal(b.id).why) == ("rejected", "ada", "shrinks")
    assert [e["action"] for e in core.history()][-2:] == ["approve", "reject"]


# ---- reflection

def test_auroc_equals_brute_force_with_ties_and_the_fixed_points():
    rng = np.random.default_rng(3)
    for _ in range(5):
        s, p = rng.integers(0, 6, 200).astype(float), rng.random(200) < 0.3
        brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[p] for b in s[~p]])
        assert abs(auroc(s, p) - brute) < 1e-12
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"): auroc([1, 2], [1, 1])
    with pytest.raises(ValueError, match="NaN"): auroc([1, float("nan")], [0, 1])


def test_abstaining_on_the_most_uncertain():
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], bool)
    uncertainty = np.array([0.1, 0.2, 0.1, 0.9, 0.3, 0.2, 0.1, 0.2, 0.8, 0.3])
    r = abstain_accuracy(correct, uncertainty, fraction=0.2)
    assert r == {"accuracy_all": 0.8, "accuracy_kept": 1.0, "kept": 8, "n": 10}
    assert abstain_accuracy(correct, uncertainty, 0.0)["accuracy_kept"] == 0.8


# ---- int8

def test_quantization_matches_torch_and_bounds_the_error():
    w = torch.randn(48, 70, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 1, 48)[:, None]
    w[7] = 0
    q, s = quantize_per_channel(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.quantize_per_channel(w, s.double(), torch.zeros(48, dtype=torch.long), 0, torch.qint8).int_repr()
    assert q.dtype == torch.int8 and s.shape == (48,) and torch.equal(q, ref)
    err = (w - q.float() * s[:, None]).abs().amax(1)
    assert (err <= s / 2 * (1 + 1e-6)).all() and q.abs().max() == 127


def test_compacted_model_is_small_close_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    small = compact_int8(model)
    assert all(not isinstance(m, nn.Linear) for m in small.modules()) and isinstance(small[0], Int8Linear)
    assert isinstance(model[0], nn.Linear)                                           # the original is untouched
    x = torch.randn(128, 256)
    with torch.no_grad(): y, y8 = model(x), small(x)
    assert ((y8 - y).norm() / y.norm()).item() < 0.02
    assert state_bytes(small) / state_bytes(model) < 0.3
    path = save_checkpoint(tmp_path / "int8.safetensors", small, step=0, rng=False)
    back = load_int8(path, compact_int8(nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))))
    assert weights_equal(small.state_dict(), back.state_dict()) and back[0].weight_int8.dtype == torch.int8
    float_path = save_checkpoint(tmp_path / "float.safetensors", model, step=0, rng=False)
    with pytest.raises(CheckpointError): load_int8(float_path, compact_int8(model))    # wrong keys: strict
    forged = compact_int8(nn.Sequential(nn.Linear(4, 3)))
    forged[0].weight_int8 = forged[0].weight_int8.float()                           # same keys and shapes, float weights
    forged_path = save_checkpoint(tmp_path / "forged.safetensors", forged, step=0, rng=False)
    with pytest.raises(CheckpointError, match="dtypes"): load_int8(forged_path, compact_int8(nn.Sequential(nn.Linear(4, 3))))
    with pytest.raises(ValueError, match="adapters"):
        add_adapters(model); compact_int8(model)
