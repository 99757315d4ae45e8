"VL-JEPA phase 3 (13c): AUROC by hand, the monitor and the injector on synthetic problems, phase-3 rows, the export round trip."
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import jepa_lab.vl_recursion as vr
from jepa_lab.decoder import Decoder, DecoderConfig, file_sha256
from jepa_lab.encoders import TextEncoder, TextEncoderConfig
from jepa_lab.vl_data import read_manifest
from jepa_lab.vl_decode import YDecoder
from jepa_lab.vl_jepa import VLConfig, VLJEPA, YEncoder, predict
from jepa_lab.gated_core import auroc  # 12a's, which 13c reuses
from jepa_lab.vl_recursion import (ExportError, HeadConfig, Phase3Error, RecursionConfig, StateInjector, candidate_logits,
                                   export_vl_jepa, inject, load_exported, make_table, margin_score, monitor_scores, phase3_rows,
                                   roc_points, state_dim, train_injector, train_monitor, within_kind_auroc, write_phase3_manifest)


# --- AUROC -----------------------------------------------------------------------------------------------------------

def brute_auroc(s, y):
    "P(positive > negative) + ½ P(tie), over all pairs."
    pos, neg = [a for a, b in zip(s, y) if b], [a for a, b in zip(s, y) if not b]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_hand_computed_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75          # 3 of the 4 positive–negative pairs in order
    assert auroc([1, 1, 2, 0], [1, 0, 1, 0]) == 0.875                   # (½ + 1 + 1 + 1) / 4: the tie counts half
    assert auroc([5, 5, 5, 5, 5], [1, 0, 1, 0, 0]) == 0.5               # all tied: chance
    assert auroc([2, 2, 1, 1], [1, 1, 0, 0]) == 1.0 and auroc([2, 2, 1, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.2, 0.2, 0.9, 0.1, 0.2], [True, False, True, False, False]) == pytest.approx(5 / 6)   # 0.2: ½ + 1 + ½; 0.9: 3
    rng = np.random.default_rng(0)
    for _ in range(20):                                                 # many ties: integer scores in 0..3
        s, y = rng.integers(0, 4, 30), rng.random(30) < 0.4
        if 0 < y.sum() < len(y):
            assert auroc(s, y) == pytest.approx(brute_auroc(s.tolist(), y.tolist()), abs=1e-12)
            fpr, tpr = roc_points(s, y)
            assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auroc(s.tolist(), y.tolist()), abs=1e-12)


def test_auroc_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auroc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1, float("nan")], [0, 1])


def test_within_kind_auroc_sees_only_what_is_beyond_the_kind():
    kind = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    wrong = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])
    prior = kind.float()                                                # kind 1 is harder: a score that only knows the kind
    assert auroc(prior, wrong) > 0.7
    assert within_kind_auroc(prior, wrong, kind)["mean"] == 0.5


# --- the monitor -------------------------------------------------------------------------------------------------------

def synthetic_rows(n, seed, signal=True):
    g = torch.Generator().manual_seed(seed)
    pred, state = torch.randn(n, 12, generator=g), torch.randn(n, 2, 4, 3, generator=g)
    wrong = state[:, 0, 0].mean(-1) > 0 if signal else torch.rand(n, generator=g) < 0.3
    return pred, state, wrong


def test_monitor_learns_a_separable_signal_and_not_noise():
    cfg = RecursionConfig(steps=300, hidden=32, lr=3e-3)
    pred, state, wrong = synthetic_rows(1500, 0)
    monitor = train_monitor(pred, state, wrong, cfg)
    p, s, w = synthetic_rows(1000, 1)
    assert auroc(monitor_scores(monitor, p, s), w) > 0.9
    pred, state, wrong = synthetic_rows(1500, 2, signal=False)          # labels independent of the inputs
    monitor = train_monitor(pred, state, wrong, cfg)
    p, s, w = synthetic_rows(1000, 3, signal=False)
    assert abs(auroc(monitor_scores(monitor, p, s), w) - 0.5) < 0.07
    with pytest.raises(Phase3Error, match="right and wrong"):
        train_monitor(pred, state, torch.zeros(len(pred), dtype=torch.bool), cfg)


def test_the_loss_is_class_balanced():
    "With 5 % wrong rows and no signal, a balanced monitor scores around 0 (equal priors), not near logit(0.05) ≈ −2.9."
    pred, state, _ = synthetic_rows(2000, 4)
    wrong = torch.rand(2000, generator=torch.Generator().manual_seed(5)) < 0.05
    monitor = train_monitor(pred, state, wrong, RecursionConfig(steps=300, hidden=16, weight_decay=0.1))
    assert abs(float(monitor_scores(monitor, pred, state).mean())) < 0.7


# --- the injector ------------------------------------------------------------------------------------------------------

def correctable(n, seed, table, shift):
    "Rows whose prediction is the true answer's embedding pushed by `shift` when the state's channel 0 says so."
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 2, (n,), generator=g)
    answer = torch.randint(0, 4, (n,), generator=g)
    mode = torch.rand(n, generator=g) < 0.5
    state = 0.1 * torch.randn(n, 2, 4, 3, generator=g)
    state[:, 0, 0] += 2 * mode[:, None].float()
    pred = table.emb[kind, answer] + mode[:, None].float() * shift + 0.05 * torch.randn(n, 16, generator=g)
    return pred, state, kind, answer, mode


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_injector_corrects_a_correctable_shift(loss):
    g = torch.Generator().manual_seed(0)
    table = make_table(("a", "b"), [list("wxyz"), list("pqrs")], [torch.randn(4, 16, generator=g) for _ in range(2)])
    shift = 20 * torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    cfg = RecursionConfig(steps=400, hidden=32, lr=3e-3, injector_loss=loss)
    injector = train_injector(*correctable(2000, 1, table, shift)[:4], table, cfg)
    pred, state, kind, answer, mode = correctable(1000, 2, table, shift)
    with torch.no_grad(): corrected = pred + injector(pred, state)
    before = (candidate_logits(pred, kind, table).argmax(1) == answer)[mode].float().mean()
    after = (candidate_logits(corrected, kind, table).argmax(1) == answer)[mode].float().mean()
    assert before < 0.6 and after > before + 0.35 and after > 0.9
    kept = (candidate_logits(corrected, kind, table).argmax(1) == answer)[~mode].float().mean()
    assert kept > 0.95                                                  # the unshifted rows stay right


def test_an_untrained_injector_changes_nothing_and_inject_touches_only_flagged_rows():
    injector = StateInjector(HeadConfig(12, 8, 16))
    pred, state, _ = synthetic_rows(50, 0)
    assert torch.equal(injector(pred, state), torch.zeros_like(pred))
    torch.nn.init.normal_(injector.net[-1].weight)
    monitor = train_monitor(pred, state, state[:, 0, 0].mean(-1) > 0, RecursionConfig(steps=20))
    z, flagged = inject(monitor, injector, pred, state, threshold=float(monitor_scores(monitor, pred, state).median()))
    assert 0 < int(flagged.sum()) < len(pred)
    assert torch.equal(z[~flagged], pred[~flagged]) and not torch.equal(z[flagged], pred[flagged])
    with pytest.raises(Phase3Error, match="state summarising to"):
        injector(pred, state[:, :1])


def test_margin_score_is_high_when_two_candidates_are_equally_near():
    table = make_table(("a",), [["x", "y", "z"]], [torch.eye(3)])
    s = margin_score(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.5, 0.0]]), torch.zeros(3, dtype=torch.long), table)
    assert s[0] == pytest.approx(0.0, abs=1e-6) and s[1] == pytest.approx(-1.0) and s[1] < s[2] < s[0]


# --- tiny real modules: phase-3 rows, the manifest, export -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_vl):
    return tiny_vl(3, 2, 2, 300, 16)


def tiny_modules(bpe, seed=0):
    torch.manual_seed(seed)
    model = VLJEPA(VLConfig(x_dim=16, y_dim=16, q_dim=16, vocab_size=bpe.vocab_size, dim=16, depth=1, heads=2, d_state=4, chunk=8))
    y_enc = YEncoder(TextEncoder(TextEncoderConfig(vocab_size=bpe.vocab_size, dim=16, depth=1, heads=2, max_len=96)), bpe)
    y_dec = YDecoder(Decoder(DecoderConfig(vocab_size=bpe.vocab_size, dim=16, depth=1, heads=2, kv_heads=1, ffn_hidden=32, max_len=64)),
                     bpe, latent_dim=16, prompt_len=2, hidden=16)
    head = HeadConfig(16, state_dim(model), 8)
    mods = [model, y_enc, y_dec, vr.ConfusionMonitor(head), StateInjector(head)]
    with torch.no_grad():                                               # no zero-initialised tensor may hide a mix-up
        for m in mods:
            for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))
    return [m.eval() for m in mods]


def test_phase3_rows_are_unpadded_and_labelled(tiny):
    splits, data, bpe = tiny
    model, _, y_dec, _, _ = tiny_modules(bpe)
    rows = phase3_rows(model, y_dec, data, "val", max_new=4)
    it = data.items["val"]
    assert len(rows) == int((it.kind != 0).sum()) and rows.state.shape[1:] == (2, 16, 4)
    assert rows.wrong.tolist() == [s.strip() != t for s, t in zip(rows.said, rows.truth)]
    assert all(t == vr.answer_candidates(vr.QUESTION_KINDS[k])[a] for t, k, a in zip(rows.truth, rows.kind.tolist(), rows.answer.tolist()))
    for i in [0, len(rows) // 2, len(rows) - 1]:                        # each row is what a batch of one computes
        one = predict(model, data, "val", rows.item[i:i + 1])
        assert torch.allclose(one.pred[0], rows.pred[i], atol=1e-5) and torch.allclose(one.state[0], rows.state[i], atol=1e-5)
    sub = rows.subset(rows.wrong)
    assert len(sub) == int(rows.wrong.sum()) and sub.said == [s for s, w in zip(rows.said, rows.wrong) if w]


def test_the_phase3_manifest_carries_the_labels(tiny, tmp_path):
    splits, data, bpe = tiny
    model, _, y_dec, _, _ = tiny_modules(bpe)
    rows = phase3_rows(model, y_dec, data, "val", max_new=4)
    rows.wrong[::3] = ~rows.wrong[::3]                                  # both values present, whatever the random decoder said
    m = read_manifest(write_phase3_manifest(tmp_path / "m", splits["val"], rows))
    assert len(m.queries) == len(rows) and len(m.captions) == len(splits["val"])
    assert [q.confused for q in m.queries] == rows.wrong.tolist() and {q.tool_used for q in m.queries} == {None}
    assert [q.image for q in m.queries] == [f"images/val-{f}.png" for f in rows.frame.tolist()]
    line = json.loads((tmp_path / "m" / "manifest.jsonl").read_text().splitlines()[-1])
    assert set(line) >= {"image", "query", "confused", "tool_used"} and line["tool_used"] is None


def outputs(mods, data):
    model, y_enc, y_dec, monitor, injector = mods
    idx = torch.arange(5)
    with torch.no_grad():
        out = predict(model, data, "test", idx)
        return {"pred": out.pred, "state": out.state, "monitor": monitor(out.pred, out.state), "injector": injector(out.pred, out.state),
                "y": y_enc(["red", "where is the agent?"]), "bridge": y_dec.bridge(out.pred), "text": y_dec.generate(out.pred, 5)}


def export_tiny(folder, mods, **kw):
    return export_vl_jepa(folder, *mods, data_hash="abc", **kw)


def loaded_modules(back):
    return [back[k] for k in ("model", "y_encoder", "y_decoder", "monitor", "injector")]


def test_export_round_trip_is_bit_exact(tiny, tmp_path):
    _, data, bpe = tiny
    mods = tiny_modules(bpe)
    manifest = export_tiny(tmp_path / "exp", mods)
    files = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert files == sorted(["angn.safetensors", "decoder_tokenizer.json", "key_map.json", "manifest.json", "predictor.safetensors",
                            "recursion.safetensors", "y_decoder.safetensors", "y_encoder.safetensors", "y_tokenizer.json"])
    assert manifest["data_hash"] == "abc" and set(manifest["files"]) == set(files) - {"manifest.json"}
    back = load_exported(tmp_path / "exp")
    a, b = vr.export_modules(*mods).state_dict(), vr.export_modules(*loaded_modules(back)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = outputs(mods, data), outputs(loaded_modules(back), data)
    assert oa["text"] == ob["text"] and all(torch.equal(oa[k], ob[k]) for k in oa if k != "text")
    keys = load_file(str(tmp_path / "exp" / "predictor.safetensors"))
    assert "backbone.layers.0.in_proj.weight" in keys and "head.fc1.weight" in keys and not any("gate" in k or "angn" in k for k in keys)
    assert set(load_file(str(tmp_path / "exp" / "angn.safetensors"))) == {"angn.layers.0.weight", "angn.layers.0.bias"}
    key_map = json.loads((tmp_path / "exp" / "key_map.json").read_text())
    assert key_map["angn.safetensors"]["angn.layers.0.weight"] == "predictor.backbone.gates.0.w"
    assert key_map["predictor.safetensors"]["head.fc2.bias"] == "predictor.head.2.bias"


def rewrite(folder: Path, file: str, change, update_sha=True):
    "Rewrite one weight file through `change(tensors)`; keep the manifest's sha256 in step unless asked not to."
    tensors = load_file(str(folder / file))
    change(tensors)
    save_file(tensors, str(folder / file))
    if update_sha:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][file] = file_sha256(folder / file)
        (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def exported(tiny, tmp_path):
    export_tiny(tmp_path / "exp", tiny_modules(tiny[2]))
    return tmp_path / "exp"


def test_a_missing_key_is_named_with_its_file(exported):
    rewrite(exported, "predictor.safetensors", lambda t: t.pop("backbone.norm.weight"))
    with pytest.raises(ExportError, match=r"predictor\.safetensors.*missing keys \(1\): backbone\.norm\.weight"):
        load_exported(exported)


def test_an_unexpected_key_is_named_with_its_file(exported):
    rewrite(exported, "recursion.safetensors", lambda t: t.update({"monitor.extra.weight": torch.zeros(2)}))
    with pytest.raises(ExportError, match=r"recursion\.safetensors.*unexpected keys \(1\): monitor\.extra\.weight"):
        load_exported(exported)


def test_a_renamed_key_names_both_names(exported):
    rewrite(exported, "angn.safetensors", lambda t: t.update({"angn.layers.0.w": t.pop("angn.layers.0.weight")}))
    with pytest.raises(ExportError, match=r"angn\.safetensors") as e:
        load_exported(exported)
    assert "missing keys (1): angn.layers.0.weight" in str(e.value) and "unexpected keys (1): angn.layers.0.w" in str(e.value)


def test_a_changed_file_fails_its_sha256(exported):
    rewrite(exported, "y_decoder.safetensors", lambda t: t["bridge.gain"].mul_(2), update_sha=False)
    with pytest.raises(ExportError, match=r"y_decoder\.safetensors: sha256 .* does not match"):
        load_exported(exported)


def test_an_export_that_fails_midway_leaves_the_old_one(tiny, tmp_path, monkeypatch):
    _, data, bpe = tiny
    old = tiny_modules(bpe, seed=0)
    export_tiny(tmp_path / "exp", old)
    before = {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir()}
    calls = []
    real = vr._write_tensors
    def failing(path, tensors, metadata):
        calls.append(path.name)
        if len(calls) == 3: raise OSError("disk full (simulated)")
        real(path, tensors, metadata)
    monkeypatch.setattr(vr, "_write_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        export_tiny(tmp_path / "exp", tiny_modules(bpe, seed=1))
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]       # no temporary folder left behind
    monkeypatch.setattr(vr, "_write_tensors", real)
    back = load_exported(tmp_path / "exp")
    assert torch.equal(outputs(loaded_modules(back), data)["pred"], outputs(old, data)["pred"])
    export_tiny(tmp_path / "exp", tiny_modules(bpe, seed=1))            # a successful export replaces it
    assert not torch.equal(outputs(loaded_modules(load_exported(tmp_path / "exp")), data)["pred"], outputs(old, data)["pred"])


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(tiny, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not a VL-JEPA export"):
        export_tiny(tmp_path / "mine", tiny_modules(tiny[2]))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_export_names_route_every_tensor_and_refuse_strangers():
    assert vr.export_name("predictor.backbone.gates.1.w") == ("angn.safetensors", "angn.layers.1.weight")
    assert vr.export_name("predictor.backbone.gates.0.scale") == ("angn.safetensors", "angn.layers.0.scale")   # a new gate tensor
    assert vr.export_name("predictor.backbone.blocks.3.A_log") == ("predictor.safetensors", "backbone.layers.3.A_log")
    assert vr.export_name("predictor.backbone.new_proj.weight") == ("predictor.safetensors", "backbone.new_proj.weight")
    assert vr.export_name("y_encoder.blocks.0.attn.qkv.weight") == ("y_encoder.safetensors", "encoder.layers.0.attn.qkv.weight")
    assert vr.export_name("y_decoder.decoder.layers.0.attn.wq.weight") == ("y_decoder.safetensors", "decoder.layers.0.attn.wq.weight")
    with pytest.raises(ExportError, match="'stranger.weight'"):
        vr.export_name("stranger.weight")
    with pytest.raises(ExportError, match="both export as"):
        vr.key_map({"predictor.backbone.segment": 0, "predictor.backbone.segment_embed": 0})
