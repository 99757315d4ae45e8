"""Lesson 13's vision-language data: captions and answers checked against hand-built lab states, disjoint splits,
the manifest.jsonl round trip, every refused row naming its line, and writes that fail leave the old manifest as it was."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jepa_lab.core import load_settings
from jepa_lab.jepa_eval import labelled_worlds
from jepa_lab.tokenize import ByteBPE
from jepa_lab.vl_data import (ANSWER_CANDIDATES, MANIFEST, MOVE_OUTCOMES, QA, QUESTION_KINDS, ROOMS, CaptionRow, ManifestError,
                              QARow, QueryRow, VLDataError, VLFrames, answer_candidates, frame_streams, load_images,
                              majority_baseline, move_outcome, read_manifest, scene_caption, scene_questions, vl_frames,
                              vl_splits, write_manifest)
from jepa_lab.world import CLOSED_DOOR, OPEN_DOOR, LabObject, LabWorld, empty_lab_state, make_lab_state, set_edge


@pytest.fixture(scope="module")
def splits():
    return vl_splits(24, 6, 8, seed=0)


# ---------------------------------------------------------------- captions
def test_caption_names_everything_in_catalogue_order():
    s = empty_lab_state(agent=(1, 1), facing="east", objects=[LabObject("ball", "blue", "small", (1, 6)),
                                                              LabObject("cube", "red", "big", (6, 6))])
    assert scene_caption(s) == "agent north-west facing east. big red cube south-east. small blue ball north-east."
    flipped = s.copy(); flipped.objects = flipped.objects[::-1]
    assert scene_caption(flipped) == scene_caption(s)                    # storage order does not matter
    nudged = s.copy(); nudged.objects[0].cell = (2, 7)                   # same room: same caption
    assert scene_caption(nudged) == scene_caption(s)
    moved = s.copy(); moved.objects[0].cell = (6, 1)                     # another room: another caption
    assert scene_caption(moved) == "agent north-west facing east. big red cube south-east. small blue ball south-west."
    held = s.copy(); held.objects[0].cell, held.held = None, 0
    assert scene_caption(held) == "agent north-west facing east, carrying small blue ball. big red cube south-east."


def test_caption_is_deterministic(splits):
    again = vl_frames(24, seed=0)
    assert again.captions == splits["train"].captions
    assert all(c == c.lower() and c.endswith(".") for c in again.captions)
    for seed in range(5):
        assert scene_caption(make_lab_state(seed)) == scene_caption(make_lab_state(seed))


def test_captions_fit_96_tokens(splits):
    bpe_file = load_settings().models_path / "text_jepa-bpe.json"
    if not bpe_file.is_file(): pytest.skip(f"{bpe_file} missing: run experiments/text_jepa")
    bpe = ByteBPE.load(bpe_file)
    captions = [c for v in splits.values() for c in v.captions]
    captions += [c for caps in frame_streams(4, 24)["captions"] for c in caps]
    worst = empty_lab_state(agent=(5, 1), facing="south", objects=[LabObject("triangle", c, "small", (6, i))
                                                                   for i, c in enumerate(("blue", "yellow", "purple", "cyan"))])
    counts = [len(bpe.encode(c)) for c in captions + [scene_caption(worst)]]
    assert max(counts) <= 96 and len(bpe.encode(scene_caption(worst))) >= max(counts)   # the hand-made worst case is the worst


# ---------------------------------------------------------------- questions
def test_move_outcomes_follow_the_world_rules():
    s = empty_lab_state(agent=(0, 0), facing="south", objects=[LabObject("ball", "red", "big", (1, 0))])
    assert move_outcome(s, "north") == move_outcome(s, "west") == "blocked by a wall"    # the grid's border
    assert move_outcome(s, "south") == "blocked by an object"
    assert move_outcome(s, "east") == "it moves"
    s.agent = (0, 3)
    assert move_outcome(s, "east") == "it enters another room"                           # column 4 is the eastern room
    set_edge(s, (0, 3), "east", CLOSED_DOOR)
    assert move_outcome(s, "east") == "blocked by a closed door"
    set_edge(s, (0, 3), "east", OPEN_DOOR)
    assert move_outcome(s, "east") == "it enters another room"
    assert s.agent == (0, 3) and s.facing == "south"                                    # simulated on a copy
    with pytest.raises(VLDataError, match="north-east"):
        move_outcome(s, "north-east")


def test_questions_of_a_hand_built_scene():
    s = empty_lab_state(agent=(2, 2), facing="north", objects=[
        LabObject("ball", "red", "big", (6, 6)), LabObject("ball", "blue", "small", None),
        LabObject("cube", "red", "small", (1, 6)), LabObject("triangle", "green", "big", (2, 3))])
    s.held = 1
    assert scene_questions(s) == [
        QA("colour", "what colour is the cube?", "red"),
        QA("colour", "what colour is the triangle?", "green"),                  # two balls: no colour question for them
        QA("shape", "what shape is the green thing?", "triangle"),
        QA("shape", "what shape is the blue thing?", "ball"),                   # two red things: no shape question for red
        QA("count", "how many cubes are there?", "one"),
        QA("count", "how many balls are there?", "two"),                        # the carried ball counts
        QA("count", "how many triangles are there?", "one"),
        QA("big", "how many big things are there?", "two"),
        QA("room", "where is the red cube?", "north-east"),
        QA("room", "where is the red ball?", "south-east"),
        QA("room", "where is the green triangle?", "north-west"),
        QA("room", "where is the blue ball?", "carried"),
        QA("agent_room", "where is the agent?", "north-west"),
        QA("facing", "which way is the agent facing?", "north"),
        QA("action", "what happens if the agent moves north?", "it moves"),
        QA("action", "what happens if the agent moves south?", "it moves"),
        QA("action", "what happens if the agent moves east?", "blocked by an object"),
        QA("action", "what happens if the agent moves west?", "it moves")]
    empty = scene_questions(empty_lab_state(agent=(7, 7), facing="west"))
    assert [q.answer for q in empty if q.kind in ("count", "big")] == ["zero"] * 4
    assert {q.question: q.answer for q in empty}["where is the agent?"] == "south-east"
    assert {q.answer for q in empty if q.question.endswith(("south?", "east?"))} == {"blocked by a wall"}


def test_counts_beyond_four_are_refused():
    s = empty_lab_state(objects=[LabObject("cube", c, "small", (5, i)) for i, c in enumerate(["red", "green", "blue", "yellow", "cyan"])])
    with pytest.raises(VLDataError, match="four"):
        scene_questions(s)


def test_answers_are_candidates_and_every_frame_has_the_fixed_questions(splits):
    data = splits["train"]
    for qs in data.questions:
        kinds = [q.kind for q in qs]
        assert kinds == sorted(kinds, key=QUESTION_KINDS.index)
        assert (kinds.count("count"), kinds.count("big"), kinds.count("agent_room"), kinds.count("facing"), kinds.count("action")) == (3, 1, 1, 1, 4)
        assert all(q.answer in answer_candidates(q.kind) for q in qs)
    assert set(ANSWER_CANDIDATES) == set(QUESTION_KINDS) and answer_candidates("action") == MOVE_OUTCOMES
    assert answer_candidates("room") == ROOMS + ("carried",)
    with pytest.raises(VLDataError, match="colour"):
        answer_candidates("color")
    idx, flat = data.flat_qa()
    assert len(idx) == len(flat) == sum(map(len, data.questions)) and flat[0] == data.questions[idx[0]][0]


# ---------------------------------------------------------------- frames and splits
def test_vl_frames_are_labelled_worlds_frames(splits):
    frames, _, worlds = labelled_worlds(24, seed=0)
    data = splits["train"]
    assert np.array_equal(frames, data.frames) and np.array_equal(worlds, data.world)
    assert data.frames.dtype == np.uint8 and data.world.dtype == data.step.dtype == np.int64
    assert (data.step[data.world == 0] == np.sort(data.step[data.world == 0])).all() and data.step.min() == 0
    replay = LabWorld(size=64)
    for i in np.flatnonzero(data.step == 0)[:5]:                          # each world's first frame is its reset
        obs = replay.reset(int(data.world_seed[i]))
        assert np.array_equal(obs.image, data.frames[i]) and scene_caption(replay.state) == data.captions[i]


def test_splits_share_no_world(splits):
    assert list(splits) == ["train", "val", "test"]
    seeds = {k: set(v.world_seed.tolist()) for k, v in splits.items()}
    assert len(seeds["train"]) == 24 and len(seeds["val"]) == 6 and len(seeds["test"]) == 8
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    firsts = {k: v.frames[v.step == 0].reshape(len(seeds[k]), -1) for k, v in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        same = (firsts[a][:, None] == firsts[b][None]).all(-1)           # any first frame of a equal to one of b?
        assert not same.any(), f"{a} and {b} share a world"


def test_subset_keeps_rows_together(splits):
    data = splits["val"]
    part = data.subset(data.world == 2)
    assert len(part) == (data.world == 2).sum() and (part.world == 2).all()
    again = data.subset(np.flatnonzero(data.world == 2))
    assert again.captions == part.captions and again.questions == part.questions and np.array_equal(again.frames, part.frames)
    with pytest.raises(VLDataError, match="disagree"):
        VLFrames(data.frames, data.captions[:-1], data.questions, data.world, data.step)
    with pytest.raises(VLDataError, match="n_worlds"):
        vl_frames(0)
    with pytest.raises(VLDataError, match="n_val"):
        vl_splits(2, 0, 2)


def test_frame_streams_keep_repeats_and_walk_other_worlds(splits):
    s = frame_streams(6, steps=12, seed=0)
    assert s["images"].shape == (6, 13, 64, 64, 3) and s["images"].dtype == np.uint8
    assert [len(c) for c in s["captions"]] == [13] * 6 and s["changed"].shape == s["actions"].shape == (6, 12)
    assert all(s["changed"][i, t] == (s["captions"][i][t] != s["captions"][i][t + 1]) for i in range(6) for t in range(12))
    assert 0 < s["changed"].mean() < 1
    replay = LabWorld(size=64)
    for i in range(6):
        obs = replay.reset(int(s["world_seed"][i]))
        assert np.array_equal(obs.image, s["images"][i, 0]) and scene_caption(replay.state) == s["captions"][i][0]
        for t, a in enumerate(s["actions"][i]):
            assert np.array_equal(replay.step(int(a)).image, s["images"][i, t + 1])
            assert scene_caption(replay.state) == s["captions"][i][t + 1]
    assert not set(s["world_seed"].tolist()) & {x for v in splits.values() for x in v.world_seed.tolist()}
    rooms = np.array([[c.split()[1].rstrip(",") for c in caps] for caps in s["captions"]])
    assert (rooms[:, 1:] != rooms[:, :-1]).any()                          # the scripted agent goes through rooms
    with pytest.raises(VLDataError, match="scripted"):
        frame_streams(2, policy="greedy")


def test_majority_baseline():
    train = [QA("facing", "q", "north")] * 3 + [QA("facing", "q", "east")] * 2 + [QA("count", "q", "two"), QA("count", "q", "one")]
    test = [[QA("facing", "q", "north"), QA("facing", "q", "west")], [QA("count", "q", "one"), QA("count", "q", "one")]]
    # count: a 1-1 tie goes to the earlier candidate, "one"
    assert majority_baseline(train, test) == {"count": 1.0, "facing": 0.5}
    with pytest.raises(VLDataError, match="big"):
        majority_baseline(train, [QA("big", "q", "one")])


# ---------------------------------------------------------------- the manifest
def qa_by_image(part):
    out = {}
    for r in part.qa: out.setdefault(r.image, []).append(QA(r.meta["kind"], r.question, r.answer))
    return out


def test_manifest_round_trip(tmp_path, splits):
    for name, data in splits.items():
        assert write_manifest(tmp_path, data, name) == tmp_path / MANIFEST
    manifest = read_manifest(tmp_path / MANIFEST)
    assert manifest.root == tmp_path and not manifest.queries
    assert len(manifest) == sum(len(v) + sum(map(len, v.questions)) for v in splits.values())
    for name, data in splits.items():
        part = manifest.split(name)
        assert [r.text for r in part.captions] == data.captions
        assert [r.meta["world"] for r in part.captions] == data.world.tolist()
        assert [r.meta["step"] for r in part.captions] == data.step.tolist()
        assert np.array_equal(load_images(part, part.captions), data.frames)
        by_image = qa_by_image(part)
        assert [by_image[r.image] for r in part.captions] == data.questions
    lines = (tmp_path / MANIFEST).read_text().splitlines()
    assert json.loads(lines[0]) == {"image": "images/train-0.png", "text": splits["train"].captions[0], "split": "train",
                                    "world": 0, "step": 0}
    assert manifest.captions[1].line == 2 + len(splits["train"].questions[0])     # 1-based, counted in the file
    with pytest.raises(ManifestError, match="train, val"):
        manifest.split("validation")


def test_questions_per_frame_is_a_seeded_sample(tmp_path, splits):
    data = splits["val"]
    write_manifest(tmp_path / "a", data, "val", questions_per_frame=3, seed=1)
    write_manifest(tmp_path / "b", data, "val", questions_per_frame=3, seed=1)
    write_manifest(tmp_path / "c", data, "val", questions_per_frame=3, seed=2)
    text = {k: (tmp_path / k / MANIFEST).read_text() for k in "abc"}
    assert text["a"] == text["b"] != text["c"]
    part = read_manifest(tmp_path / "a")
    by_image = qa_by_image(part)
    for r, qs in zip(part.captions, data.questions):
        assert len(by_image[r.image]) == 3 and all(q in qs for q in by_image[r.image])
    write_manifest(tmp_path / "d", data, "val", questions_per_frame=0)
    assert not read_manifest(tmp_path / "d").qa


def test_writing_refuses_a_second_copy_of_a_split_and_bad_names(tmp_path, splits):
    write_manifest(tmp_path, splits["val"], "val")
    before = (tmp_path / MANIFEST).read_bytes()
    with pytest.raises(ManifestError, match="already holds split 'val'"):
        write_manifest(tmp_path, splits["test"], "val")
    with pytest.raises(ManifestError, match="split name"):
        write_manifest(tmp_path, splits["test"], "../test")
    assert (tmp_path / MANIFEST).read_bytes() == before


def test_a_failed_write_leaves_the_manifest_intact(tmp_path, splits, monkeypatch):
    write_manifest(tmp_path, splits["train"], "train")
    before, images = (tmp_path / MANIFEST).read_bytes(), sorted(os.listdir(tmp_path / "images"))
    bad = splits["val"].subset(np.arange(len(splits["val"])))
    bad.questions[-1] = bad.questions[-1][:-1] + [QA("action", "what happens if the agent moves west?", "")]   # last row
    with pytest.raises(ManifestError, match="val frame .*'answer' is empty"):
        write_manifest(tmp_path, bad, "val")
    assert (tmp_path / MANIFEST).read_bytes() == before                   # not even the rows before the bad one
    assert sorted(os.listdir(tmp_path / "images")) == images and sorted(os.listdir(tmp_path)) == ["images", MANIFEST]

    def boom(*args): raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)                              # fail at the very last moment, after the images
    with pytest.raises(OSError, match="disk full"):
        write_manifest(tmp_path, splits["val"], "val")
    monkeypatch.undo()
    assert (tmp_path / MANIFEST).read_bytes() == before
    assert sorted(os.listdir(tmp_path / "images")) == images and sorted(os.listdir(tmp_path)) == ["images", MANIFEST]
    write_manifest(tmp_path, splits["val"], "val")                        # and the folder is still usable
    assert len(read_manifest(tmp_path).split("val").captions) == len(splits["val"])


# ---------------------------------------------------------------- reading other manifests
@pytest.fixture
def seed_folder(tmp_path):
    "A folder in the seed's layout: images/001.png, captions/001.txt."
    (tmp_path / "images").mkdir(); (tmp_path / "captions").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "images" / "001.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "002.png")
    (tmp_path / "captions" / "001.txt").write_text("a grey square\n")
    (tmp_path / "captions" / "empty.txt").write_text("  \n")
    (tmp_path / "outside.png").write_bytes((tmp_path / "images" / "001.png").read_bytes())
    return tmp_path


SEED_ROWS = ['{"image": "images/001.png", "text": "captions/001.txt"}',
             '{"image": "images/002.png", "question": "What color?", "answer": "Blue"}']


def test_the_seeds_rows_read(seed_folder):
    rows = SEED_ROWS + ['{"image": null, "query": "Hello", "confused": false, "tool_used": null}',
                        '{"image": "images/002.png", "query": "what is this?", "tool_used": "search", "lang": "en"}',
                        '{"image": "images/002.png", "text": "black", "split": "train"}']
    (seed_folder / MANIFEST).write_text("\n".join(rows) + "\n\n")
    m = read_manifest(seed_folder)                                       # the folder or the file both work
    assert m.captions == [CaptionRow("images/001.png", "a grey square", {"text_file": "captions/001.txt"}, 1),
                          CaptionRow("images/002.png", "black", {"split": "train"}, 5)]
    assert m.qa == [QARow("images/002.png", "What color?", "Blue", {}, 2)]
    assert m.queries == [QueryRow(None, "Hello", False, None, {}, 3), QueryRow("images/002.png", "what is this?", None, "search", {"lang": "en"}, 4)]
    assert m.split("train").captions == m.captions[1:]


def test_load_images_reads_each_file_once(seed_folder, monkeypatch):
    (seed_folder / MANIFEST).write_text("\n".join(SEED_ROWS * 3 + ['{"image": null, "query": "hi"}']))
    m = read_manifest(seed_folder / MANIFEST)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
    images = load_images(m, m.captions + m.qa)
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8 and sorted(opened) == ["001.png", "002.png"]
    assert (images[:3] == 200).all() and (images[3:] == 0).all()
    with pytest.raises(ManifestError, match=f"{MANIFEST}:7: this row has no image"):
        load_images(m, m.queries)


BAD_ROWS = [
    ('{"image": "images/001.png", "text": "x"', "invalid JSON"),
    ('["images/001.png", "a caption"]', "not a JSON object"),
    ('{"image": "images/001.png", "caption": "x"}', "no recognisable kind"),
    ('{"image": "images/001.png", "caption": "x"}', "a caption row has 'image' and 'text'"),
    ('{"image": "images/001.png", "text": "x", "question": "q?", "answer": "a"}', "both 'text' and 'question' present"),
    ('{"image": "images/001.png", "text": "   "}', "'text' is empty"),
    ('{"image": "images/001.png", "question": "", "answer": "a"}', "'question' is empty"),
    ('{"image": "images/001.png", "question": "q?", "answer": ""}', "'answer' is empty"),
    ('{"image": "images/001.png", "question": "q?"}', "'answer' is missing"),
    ('{"image": "images/001.png", "text": 3}', "'text' must be a string"),
    ('{"image": "images/001.png", "question": "how many?", "answer": 2}', "'answer' must be a string"),
    ('{"image": 7, "text": "x"}', "image path must be a string"),
    ('{"image": null, "text": "x"}', "needs an 'image' path"),
    ('{"text": "x"}', "needs an 'image' path"),
    ('{"image": "images/003.png", "text": "x"}', "image 'images/003.png' does not exist"),
    ('{"image": "/etc/hostname", "text": "x"}', "is absolute"),
    ('{"image": "../outside.png", "text": "x"}', "escapes the manifest's folder"),
    ('{"image": "images/../../outside.png", "text": "x"}', "escapes the manifest's folder"),
    ('{"image": "images/001.png", "text": "captions/002.txt"}', "text file 'captions/002.txt' does not exist"),
    ('{"image": "images/001.png", "text": "captions/empty.txt"}', "is empty"),
    ('{"image": "images/001.png", "text": "../captions/001.txt"}', "escapes the manifest's folder"),
    ('{"image": null, "query": "hi", "confused": "no"}', "'confused' must be true, false or null"),
    ('{"image": null, "query": "hi", "tool_used": 3}', "'tool_used' must be a string"),
    ('{"image": null, "query": ""}', "'query' is empty"),
    ('{"query": "hi", "question": "q?", "answer": "a"}', "both 'question' and 'query' present"),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS)
def test_bad_rows_name_file_line_and_reason(seed_folder, row, reason):
    (seed_folder / MANIFEST).write_text("\n".join(SEED_ROWS + ["", row]) + "\n")     # line 3 is blank: the bad row is line 4
    with pytest.raises(ManifestError) as err:
        read_manifest(seed_folder)
    assert f"{seed_folder / MANIFEST}:4: " in str(err.value) and reason in str(err.value)


def test_escape_by_symlink_is_refused(seed_folder):
    (seed_folder / "images" / "link.png").symlink_to(seed_folder.parent)
    (seed_folder / MANIFEST).write_text('{"image": "images/link.png/x.png", "text": "x"}\n')
    with pytest.raises(ManifestError, match=f"{MANIFEST}:1: .*escapes"):
        read_manifest(seed_folder)


def test_not_utf8_names_the_line(seed_folder):
    (seed_folder / MANIFEST).write_bytes(SEED_ROWS[0].encode() + b"\n" + b'{"image": "images/001.png", "text": "\xff"}\n')
    with pytest.raises(ManifestError, match=f"{MANIFEST}:2: not UTF-8"):
        read_manifest(seed_folder)


def test_missing_or_empty_manifest_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist.*no synthetic fallback"):
        read_manifest(tmp_path)                                           # a folder without a manifest
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "elsewhere" / MANIFEST)
    (tmp_path / MANIFEST).write_text("\n  \n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(tmp_path)
