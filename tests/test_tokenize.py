"Tokenizers: byte-level BPE (round trip, determinism, files, compression vs HF tokenizers), patch VQ-VAE, triplet tokens."
import functools
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from jepa_lab.core import Run
from jepa_lab.data import dialog_texts
from jepa_lab.tokenize import (DEFAULT_SPECIALS, ByteBPE, HFByteBPE, PatchVQVAE, TokenizerError, VQConfig,
                               count_pretokens, decode_triplet, encode_triplet, evaluate_vq, frames_to_tensor,
                               mean_image_mse, naive_encode, patchify, tokens_per_byte, train_merges,
                               train_merges_naive, train_vq, unpatchify, VectorQuantizer)
from jepa_lab.world import Triplet, sample_frames

VOCAB = 1024
MAX_TOKENS_PER_BYTE = 0.5   # held-out dialog: BPE must at least halve raw bytes (1.0)
HF_MARGIN = 0.05            # lab BPE tokens/byte within 5 % of Hugging Face tokenizers'
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(None)
def train_texts(): return tuple(dialog_texts("train"))

@functools.lru_cache(None)
def lab_bpe(): return ByteBPE.train(train_texts(), VOCAB)

@functools.lru_cache(None)
def hf_bpe(): return HFByteBPE.train(train_texts(), VOCAB)


# text made of special-token strings, their fragments and arbitrary Unicode
special_heavy = st.lists(st.one_of(st.sampled_from(DEFAULT_SPECIALS), st.sampled_from(["<", ">", "<bo", "s>"]),
                                   st.text(max_size=6)), max_size=8).map("".join)


@SETTINGS
@given(st.text())
def test_bpe_round_trips_any_text(text):
    bpe = lab_bpe()
    assert bpe.decode(bpe.encode(text), errors="strict") == text
    assert bpe.decode(bpe.encode(text, allow_special=True), errors="strict") == text


@SETTINGS
@given(special_heavy)
def test_bpe_round_trips_literal_special_strings_without_emitting_special_ids(text):
    bpe = lab_bpe()
    plain = bpe.encode(text)
    assert bpe.decode(plain, errors="strict") == text
    assert not any(256 <= i < bpe.first_merge_id for i in plain)   # user text cannot inject control tokens
    marked = bpe.encode(text, allow_special=True)
    assert bpe.decode(marked, errors="strict") == text
    # specials hold no inner '<' or '>', so their occurrences never overlap and str.count counts them exactly
    assert sum(256 <= i < bpe.first_merge_id for i in marked) == sum(text.count(s) for s in DEFAULT_SPECIALS)


@pytest.mark.parametrize("text", ["🙂👍🏽🇫🇷", "你好，世界。日本語のテキスト", "\x00\x01\x07\x1b[0m\r\n\t\x7f\x85\u2028",
                                  "e\u0301 (combining)", "<bos><eos><pad>", "   leading and trailing   ", "_under_score_"])
def test_bpe_round_trips_emoji_cjk_control(text):
    for tok in (lab_bpe(), hf_bpe()):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, allow_special=True)) == text


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(), special_heavy))
def test_hf_wrapper_round_trips_any_text(text):
    hf = hf_bpe()
    assert hf.decode(hf.encode(text)) == text
    assert not set(hf.encode(text)) & {hf.special_id(s) for s in DEFAULT_SPECIALS}


def test_special_tokens_only_when_allowed():
    bpe = lab_bpe()
    ids = bpe.encode("<bos>hi<eos>", allow_special=True)
    assert ids[0] == bpe.special_id("<bos>") == 257 and ids[-1] == bpe.special_id("<eos>")
    assert bpe.decode(ids, skip_special=True) == "hi"
    assert bpe.special_id("<bos>") not in bpe.encode("<bos>hi<eos>")


def test_training_is_deterministic_and_independent_of_input_order():
    texts = list(train_texts())
    a, b = ByteBPE.train(texts, 600), ByteBPE.train(texts, 600)
    shuffled = texts[:]; random.Random(1).shuffle(shuffled)
    c = ByteBPE.train(shuffled, 600)
    assert a.merges == b.merges == c.merges and len(a.merges) == 600 - 256 - len(DEFAULT_SPECIALS)


def test_incremental_training_equals_the_plain_algorithm():
    words = count_pretokens(train_texts()[:300])
    assert train_merges(words, 120, 256) == train_merges_naive(words, 120, 256)


def test_fast_encoder_equals_naive_encoder():
    bpe = lab_bpe()
    for text in dialog_texts("validation")[:80] + ["🙂 你好 \x00 <bos>"]:
        assert bpe.encode(text) == naive_encode(bpe, text)


def test_save_load_equality(tmp_path):
    bpe = lab_bpe()
    loaded = ByteBPE.load(bpe.save(tmp_path / "bpe.json"))
    assert loaded == bpe and loaded.vocab_size == bpe.vocab_size
    text = " ".join(dialog_texts("validation")[:20])
    assert loaded.encode(text) == bpe.encode(text)
    hf = hf_bpe()
    hf_loaded = HFByteBPE.load(hf.save(tmp_path / "hf.json"))
    assert hf_loaded.encode(text) == hf.encode(text) and hf_loaded.vocab_size == hf.vocab_size


@pytest.mark.parametrize("split", ["validation", "test"])
def test_compression_beats_raw_bytes_on_held_out_dialog(split):
    tpb = tokens_per_byte(lab_bpe(), dialog_texts(split))
    assert tpb < MAX_TOKENS_PER_BYTE, f"{split}: {tpb:.3f} tokens/byte"


def test_lab_bpe_compresses_like_hugging_face_tokenizers():
    held_out = dialog_texts("validation") + dialog_texts("test")
    lab, hf = tokens_per_byte(lab_bpe(), held_out), tokens_per_byte(hf_bpe(), held_out)
    assert hf_bpe().vocab_size == lab_bpe().vocab_size == VOCAB
    assert abs(lab / hf - 1) < HF_MARGIN, f"lab {lab:.4f} vs HF {hf:.4f} tokens/byte"


def test_decode_refuses_out_of_range_ids():
    for tok in (lab_bpe(), hf_bpe()):
        for bad in ([tok.vocab_size], [65, -1], [10 ** 9]):
            with pytest.raises(TokenizerError, match="out of range"): tok.decode(bad)


def test_encode_refuses_non_text():
    with pytest.raises(TokenizerError, match="surrogate"): lab_bpe().encode("a\ud800")
    with pytest.raises(TokenizerError, match="str"): lab_bpe().encode(b"bytes")


def test_training_refuses_vocab_smaller_than_bytes_plus_specials():
    for cls in (ByteBPE, HFByteBPE):
        with pytest.raises(TokenizerError, match="vocab_size 263"): cls.train(["hello"], 256 + len(DEFAULT_SPECIALS) - 1)


def test_load_refuses_missing_malformed_and_inconsistent_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"): ByteBPE.load(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="does not exist"): HFByteBPE.load(tmp_path / "nope.json")
    good = lab_bpe().save(tmp_path / "bpe.json")
    text = good.read_text()
    cut = tmp_path / "cut.json"; cut.write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerError, match="not valid JSON"): ByteBPE.load(cut)
    with pytest.raises(TokenizerError, match="not a Hugging Face"): HFByteBPE.load(cut)
    obj = json.loads(text)
    for change, pattern in [(dict(format="other"), "not a jepa-lab-bpe"), (dict(merges=[[1, 999999]]), "merge 0"),
                            (dict(merges=[[1, 2, 3]]), "pair"), (dict(vocab_size=5), "vocab_size"),
                            (dict(specials=["<a>", "<a>"]), "distinct")]:
        bad = tmp_path / "bad.json"; bad.write_text(json.dumps({**obj, **change}))
        with pytest.raises(TokenizerError, match=pattern): ByteBPE.load(bad)
    assert good.read_text() == text and ByteBPE.load(good) == lab_bpe()   # a failed load damages nothing


def test_patchify_inverts_and_quantizer_passes_gradients_straight_through():
    images = torch.rand(2, 3, 16, 16)
    patches = patchify(images, 4)
    assert patches.shape == (2, 16, 48) and torch.equal(unpatchify(patches, 4, 16, 16), images)
    vq = VectorQuantizer(3, 2)
    vq.codebook.copy_(torch.tensor([[0., 0.], [1., 1.], [9., 9.]])); vq.ema_sum.copy_(vq.codebook)  # e_k = m_k / N_k, N_k = 1
    z = torch.tensor([[0.8, 0.9], [0.1, -0.2]], requires_grad=True)
    before = vq.codebook.clone()
    z_q, codes, _ = vq(z)                            # (training mode: the EMA then moves codes 0 and 1)
    assert codes.tolist() == [1, 0] and torch.equal(z_q.detach(), before[codes])
    assert not torch.allclose(vq.codebook[:2], before[:2]) and torch.allclose(vq.codebook[2], before[2])  # unused: stays
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert vq.restart_dead(torch.zeros(4, 2)) == 1   # code 2 was never chosen


def test_frames_to_tensor_refuses_wrong_frames():
    with pytest.raises(ValueError, match="uint8"): frames_to_tensor(sample_frames(2).astype("float32"))


def test_vq_beats_mean_image_baseline_without_collapse(tmp_path):
    config = VQConfig(steps=300, n_train=256, seed=0)
    train = frames_to_tensor(sample_frames(config.n_train, seed=0))
    held_out = frames_to_tensor(sample_frames(128, seed=10_000))
    model = train_vq(config, train, Run(tmp_path / "vq"))
    metrics, baseline = evaluate_vq(model, held_out), mean_image_mse(train, held_out)
    assert metrics["mse"] < 0.5 * baseline, f"VQ {metrics['mse']:.5f} vs mean image {baseline:.5f}"
    assert metrics["perplexity"] > 8, f"codebook collapsed: perplexity {metrics['perplexity']:.1f}"
    tokens = model.tokenize(held_out[:4])
    assert tokens.shape == (4, 64) and tokens.dtype == torch.int64 and int(tokens.max()) < config.codebook_size
    assert model.detokenize(tokens).shape == (4, 3, 64, 64)
    assert (tmp_path / "vq" / "metrics.jsonl").exists() and list((tmp_path / "vq" / "checkpoints").glob("*.safetensors"))


@settings(max_examples=200, deadline=None)
@given(st.builds(Triplet, st.one_of(st.text(), special_heavy), st.one_of(st.text(), special_heavy), st.text()))
def test_triplet_round_trip(triplet):
    bpe = lab_bpe()
    ids = encode_triplet(bpe, triplet)
    assert decode_triplet(bpe, ids) == triplet
    assert [i for i in ids if 256 <= i < bpe.first_merge_id] == [bpe.special_id(s) for s in
                                                                 ("<bos>", "<what>", "<action>", "<result>", "<eos>")]


def test_triplet_round_trip_with_hf_wrapper():
    t = Triplet("red ball 🔴", "push <action> left", "rolls\n")
    assert decode_triplet(hf_bpe(), encode_triplet(hf_bpe(), t)) == t


def test_decode_triplet_refuses_malformed_sequences():
    bpe = lab_bpe()
    ids = encode_triplet(bpe, Triplet("cup", "lift", "cup up"))
    what, action = bpe.special_id("<what>"), bpe.special_id("<action>")
    swapped = [action if i == what else what if i == action else i for i in ids]
    for bad, pattern in [(ids[:-1], "<eos>"), (ids[1:], "<bos>"), (swapped, "in order"),
                         ([i for i in ids if i != action], "in order")]:
        with pytest.raises(TokenizerError, match=pattern): decode_triplet(bpe, bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, VOCAB - 1), max_size=40))
def test_any_in_range_ids_decode(ids):
    bpe = lab_bpe()
    text = bpe.decode(ids)                               # a cut multi-byte character becomes U+FFFD, never an error
    assert bpe.decode_bytes(ids) == b"".join(bpe.token_bytes(i) for i in ids)
    assert isinstance(text, str) and isinstance(hf_bpe().decode(ids), str)
