"VL-JEPA phase 2 (13b): the Y-decoder learns to say what an embedding means, selective decoding's schedules, saving."
import numpy as np
import pytest
import torch

from jepa_lab.core import Run
from jepa_lab.decoder import Decoder, DecoderConfig
from jepa_lab.tokenize import ByteBPE
from jepa_lab.vl_decode import (YDecoder, YDecoderConfig, generative_scores, load_y_decoder, save_y_decoder, schedule_quality,
                                selective_points, selective_vs_uniform, standing_captions, token_f1, train_y_decoder,
                                uniform_points)
from jepa_lab.vl_jepa import VLError

TEXTS = ["red", "it moves", "north-west", "blocked by a wall"]


@pytest.fixture(scope="module")
def tiny_decoder():
    bpe = ByteBPE.train(TEXTS * 5 + ["agent north-west facing east."] * 3, 300)
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=bpe.vocab_size, dim=32, depth=1, heads=2, kv_heads=1, ffn_hidden=64, max_len=64)), bpe


def test_token_f1():
    assert token_f1("a b c", "a b c") == 1.0 and token_f1("x", "a b") == 0.0
    assert token_f1("a b", "a c") == pytest.approx(0.5)
    assert token_f1("a a", "a") == pytest.approx(2 * 1 / 3)            # multiset counts


def test_schedules():
    z = torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0, 1], [1, 0]])
    assert selective_points(z, 0.1).tolist() == [True, False, True, False, True]
    assert selective_points(z, 2.0).tolist() == [True, False, False, False, False]      # never moves far enough
    assert uniform_points(5, 2).tolist() == [True, False, True, False, True]
    assert standing_captions(list("abcde"), np.array([True, False, True, False, False])) == list("aaccc")


def test_selective_saves_decodes_when_embeddings_move_with_the_scene():
    "Streams whose embedding jumps exactly when the caption changes: selective matches uniform-1 quality with fewer decodes."
    rng = np.random.default_rng(0)
    z, truth = {}, {}
    for split in ("val", "test"):
        zs, ts = [], []
        for _ in range(6):
            segments = rng.integers(2, 6, size=6)                       # scenes lasting 2..5 frames
            captions = [f"scene {i} of {rng.integers(1000)}" for i in range(len(segments))]
            ts.append([c for c, n in zip(captions, segments) for _ in range(n)])
            zs.append(torch.cat([torch.randn(1, 8).repeat(n, 1) for n in segments]))
        z[split], truth[split] = zs, ts
    rows = selective_vs_uniform(z, truth, truth, everys=(1, 2))         # decoded = truth: a perfect decoder
    every1 = rows[0]
    assert every1["uniform_quality"] == 1.0 and every1["selective_quality"] == 1.0
    assert every1["saved"] > 2.0                                         # scenes last 3.5 frames on average
    assert rows[1]["selective_quality"] >= rows[1]["uniform_quality"]


def test_y_decoder_learns_to_say_the_latents(tiny_decoder, tmp_path):
    decoder, bpe = tiny_decoder
    torch.manual_seed(0)
    latents = torch.randn(len(TEXTS), 16)
    y_dec = YDecoder(decoder, bpe, 16, prompt_len=2, hidden=32)
    before = generative_scores(y_dec, latents, TEXTS, ["colour", "action", "room", "action"])["scores"]["all"]
    z = latents.repeat(30, 1) + 0.05 * torch.randn(len(TEXTS) * 30, 16)
    texts = TEXTS * 30
    train_y_decoder(y_dec, z, texts, ["x"] * len(texts), YDecoderConfig(steps=150, batch_size=16, lr=3e-3, prompt_len=2, hidden=32,
                                                                          caption_share=0.0), Run(tmp_path))
    scores = generative_scores(y_dec, latents, TEXTS, ["colour", "action", "room", "action"])
    assert before == 0.0 and scores["scores"]["all"] >= 0.75, scores["said"]


def test_y_decoder_save_load(tiny_decoder, tmp_path):
    decoder, bpe = tiny_decoder
    y_dec = YDecoder(decoder, bpe, 16, prompt_len=2, hidden=32).eval()
    cfg = YDecoderConfig(steps=0, prompt_len=2, hidden=32)
    save_y_decoder(tmp_path, y_dec, cfg, phase1_sha256="abc")
    loaded = load_y_decoder(tmp_path, bpe, "abc")
    z = torch.randn(3, 16)
    assert y_dec.generate(z, 5) == loaded.generate(z, 5)
    with pytest.raises(VLError, match="another phase-1 model"):
        load_y_decoder(tmp_path, bpe, "def")
    (tmp_path / "vl_y_decoder.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(VLError, match="sha256"):
        load_y_decoder(tmp_path, bpe)
    with pytest.raises(FileNotFoundError, match="13b_vl_decode"):
        load_y_decoder(tmp_path / "nowhere", bpe)


def test_schedule_quality_counts_decodes():
    decoded = [["a", "b", "c"]]
    q, rate = schedule_quality(decoded, [["a", "a", "c"]], [np.array([True, False, True])])
    assert q == 1.0 and rate == pytest.approx(2 / 3)
