"jepa_lab.data: dialog splits without leakage, determinism, manifests, bad input, knowledge graphs."
import itertools
import json
from pathlib import Path

import datasets
import pytest

from jepa_lab import data
from jepa_lab.data import (SPLITS, DataFormatError, EmptySplitError, HubOfflineError, MissingDataError,
                           dialog_content_hash, dialog_texts, load_dialog_pairs, load_pykeen_graph,
                           load_saved_dialog, load_table, load_wordnet_graph, read_triples_tsv,
                           save_dialog_pairs, wordnet_available)

pytestmark = pytest.mark.filterwarnings("ignore::jepa_lab.data.SkippedDataWarning")


def pair_keys(ds):
    return {(tuple(c), r) for c, r in zip(ds["context"], ds["response"])}


def write_corpus(folder: Path, n_files: int = 3, per_file: int = 20) -> Path:
    "A small chatterbot-style corpus; every conversation opens with 'hi' (a turn shared across splits)."
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = [f"categories:\n- topic{f}\n", "conversations:\n"]
        for c in range(per_file):
            turns = ["hi", f"hello from {f}.{c}", f"how   are you {f}.{c}?", f"fine {f}.{c}"]
            lines.append("- - " + "\n  - ".join(turns) + "\n")
        (folder / f"topic{f}.yml").write_text("".join(lines))
    return folder


@pytest.fixture(scope="module")
def real_dialog():
    return load_dialog_pairs(context_turns=6, seed=0)


def test_no_leakage_across_splits(real_dialog):
    assert list(real_dialog) == list(SPLITS)
    convs = {s: set(ds["conversation"]) for s, ds in real_dialog.items()}
    keys = {s: pair_keys(ds) for s, ds in real_dialog.items()}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not convs[a] & convs[b], f"a conversation is in {a} and {b}"
        assert not keys[a] & keys[b], f"a (context, response) pair is in {a} and {b}"
    for s, ds in real_dialog.items():
        assert ds.num_rows == len(keys[s]) > 50, f"{s}: duplicates inside the split or too few rows"
        assert all(1 <= len(c) <= 6 for c in ds["context"])
        assert all(c.startswith("english/") and ".yml#" in c for c in ds["conversation"])
    # the raw corpus does repeat pairs across conversations (tech_support.yml): dedup had work to do
    raw = [(tuple(c), r) for conv in data.read_conversations() for c, r in data.context_pairs(conv.turns)]
    assert len(set(raw)) < len(raw) and sum(ds.num_rows for ds in real_dialog.values()) == len(set(raw))


def test_context_window_and_normalisation(tmp_path):
    corpus = write_corpus(tmp_path / "english", n_files=1, per_file=10)
    dd = load_dialog_pairs(context_turns=2, seed=0, corpus_dir=corpus)
    rows = [r for ds in dd.values() for r in ds.to_list() if r["conversation"] == "english/topic0.yml#4"]
    assert [(r["context"], r["response"]) for r in rows] == [
        (["hi"], "hello from 0.4"),
        (["hi", "hello from 0.4"], "how are you 0.4?"),  # whitespace normalised
        (["hello from 0.4", "how are you 0.4?"], "fine 0.4"),  # window of 2, oldest first
    ]
    assert {r["category"] for r in rows} == {"topic0"}


def test_short_turn_shared_but_no_pair_leak(tmp_path):
    dd = load_dialog_pairs(seed=0, corpus_dir=write_corpus(tmp_path / "english"))
    texts = {s: set(dialog_texts(s, seed=0, corpus_dir=tmp_path / "english")) for s in SPLITS}
    assert "hi" in texts["train"] and "hi" in texts["test"]  # the same utterance in two conversations is fine
    for a, b in itertools.combinations(SPLITS, 2):
        assert not pair_keys(dd[a]) & pair_keys(dd[b])
    # ("hi" -> "hello from ...") pairs are distinct per conversation, so each split keeps them all
    assert sum(ds.num_rows for ds in dd.values()) == 3 * 20 * 3


def test_determinism_by_seed(real_dialog):
    same = load_dialog_pairs(context_turns=6, seed=0)
    assert dialog_content_hash(same) == dialog_content_hash(real_dialog)
    assert {s: ds.to_list() for s, ds in same.items()} == {s: ds.to_list() for s, ds in real_dialog.items()}
    other = load_dialog_pairs(context_turns=6, seed=1)
    assert set(other["test"]["conversation"]) != set(real_dialog["test"]["conversation"])
    assert dialog_texts("train", seed=0) == dialog_texts("train", seed=0) != dialog_texts("train", seed=1)


def test_dialog_texts_are_the_splits_utterances(real_dialog):
    texts = dialog_texts("validation", seed=0)
    assert len(texts) == len(set(texts))
    expected = {t for c, r in zip(real_dialog["validation"]["context"], real_dialog["validation"]["response"])
                for t in [*c, r]}
    assert set(texts) == expected
    with pytest.raises(ValueError, match="unknown split"):
        dialog_texts("dev")


def test_malformed_yaml_names_file_and_line(tmp_path):
    corpus = write_corpus(tmp_path / "english", n_files=1, per_file=3)
    (corpus / "zz_broken.yml").write_text("categories:\n- x\nconversations:\n- - Hello\n  - Note: see: below\n")
    with pytest.raises(DataFormatError, match=r"zz_broken\.yml, line 5: malformed YAML") as err:
        load_dialog_pairs(corpus_dir=corpus, fractions=(0.4, 0.3, 0.3))
    assert err.value.line == 5 and err.value.file.endswith("zz_broken.yml")


def test_malformed_conversation_skipped_or_refused(tmp_path):
    path = tmp_path / "odd.yml"
    path.write_text("conversations:\n- - Hello\n  - Hi\n- Question?\n  - '22'\n- - Bye\n  - Bye\n")
    with pytest.raises(DataFormatError, match=r"odd\.yml, line 4: conversation #1"):
        data.read_conversation_file(path, strict=True)
    with pytest.warns(data.SkippedDataWarning, match=r"odd\.yml, line 4"):
        convs = data.read_conversation_file(path)
    assert [c.id for c in convs] == [f"{tmp_path.name}/odd.yml#0", f"{tmp_path.name}/odd.yml#2"]


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1, "b": "x"}\n\n{"a": 2, "b": "y"\n{"a": 3, "b": "z"}\n')
    with pytest.raises(DataFormatError, match=r"rows\.jsonl, line 3: malformed JSON line") as err:
        load_table(path, cache_dir=tmp_path / "cache")
    assert err.value.line == 3
    bad_csv = tmp_path / "rows.csv"
    bad_csv.write_text("a,b\n1,x\n2,y,extra\n")
    with pytest.raises(DataFormatError, match=r"rows\.csv, line 3: 3 fields"):
        load_table(bad_csv, cache_dir=tmp_path / "cache")


def test_load_table_reads_every_format(tmp_path):
    rows = [{"id": i, "text": f"row {i}", "tags": ["a", "b"][: i % 3]} for i in range(7)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    for name in ["t.jsonl", "t.json", "t.parquet"]:
        assert load_table(tmp_path / name, cache_dir=tmp_path / "cache").to_list() == rows, name
    (tmp_path / "t.csv").write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows))
    assert load_table(tmp_path / "t.csv", cache_dir=tmp_path / "cache")["text"] == [r["text"] for r in rows]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(MissingDataError, match="nope.jsonl does not exist"):
        load_table(tmp_path / "nope.jsonl")
    with pytest.raises(MissingDataError, match="no_corpus does not exist"):
        load_dialog_pairs(corpus_dir=tmp_path / "no_corpus")
    with pytest.raises(MissingDataError, match="triples.tsv does not exist"):
        read_triples_tsv(tmp_path / "triples.tsv", source="test")
    with pytest.raises(MissingDataError, match="manifest.json missing"):
        load_saved_dialog(tmp_path / "nothing")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(EmptySplitError, match="empty.jsonl is empty"):
        load_table(tmp_path / "empty.jsonl")


def test_empty_split_is_named(tmp_path):
    corpus = write_corpus(tmp_path / "english", n_files=2, per_file=5)
    with pytest.raises(EmptySplitError, match="split 'validation' has no dialog pairs"):
        load_dialog_pairs(corpus_dir=corpus, fractions=(1.0, 0.0, 0.0))
    with pytest.raises(EmptySplitError, match="split 'test' has no dialog pairs"):
        load_dialog_pairs(corpus_dir=corpus, fractions=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="sum to 1"):
        load_dialog_pairs(corpus_dir=corpus, fractions=(0.8, 0.1, 0.2))


def test_hub_offline_fails_fast_and_says_so(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("the offline flag must be enough: no connection attempt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "_reachable", no_probe)
    with pytest.raises(HubOfflineError, match=r"hub:some/dataset .*offline \(HF_HUB_OFFLINE=1 is set\)"):
        load_table("hub:some/dataset")
    for var in ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "_reachable", lambda host, port=443, timeout=3.0: False)  # no network touched
    with pytest.raises(HubOfflineError, match="huggingface.co:443 could not be reached"):
        load_table("hub:some/dataset")


def test_manifest_hash_follows_content_and_save_is_safe(tmp_path):
    corpus = write_corpus(tmp_path / "english")
    dd = load_dialog_pairs(seed=0, corpus_dir=corpus)
    folder = tmp_path / "saved" / "dialog"
    manifest = save_dialog_pairs(dd, folder, seed=0, context_turns=6)
    assert manifest["rows"] == {s: ds.num_rows for s, ds in dd.items()}
    assert manifest["params"] == {"seed": 0, "context_turns": 6}
    assert manifest["source"]["package"] == "chatterbot-corpus" and manifest["source"]["version"] != "not installed"
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert dialog_content_hash(load_saved_dialog(folder)) == manifest["content_hash"]

    text = (corpus / "topic1.yml").read_text()
    (corpus / "topic1.yml").write_text(text.replace("fine 1.7", "fine 1.7!"))
    changed = load_dialog_pairs(seed=0, corpus_dir=corpus)
    assert dialog_content_hash(changed) != manifest["content_hash"]

    # a failed save leaves the previous dataset whole and no temp folders behind
    def crash(self, *args, **kwargs):
        raise OSError("disk full")
    original_save = datasets.DatasetDict.save_to_disk
    datasets.DatasetDict.save_to_disk = crash
    try:
        with pytest.raises(OSError, match="disk full"):
            save_dialog_pairs(changed, folder)
    finally:
        datasets.DatasetDict.save_to_disk = original_save
    assert dialog_content_hash(load_saved_dialog(folder)) == manifest["content_hash"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["dialog"]

    # saving over it works; saving over a folder that is not a dialog dataset is refused
    assert save_dialog_pairs(changed, folder)["content_hash"] == dialog_content_hash(changed)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved dialog dataset"):
        save_dialog_pairs(dd, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_tampered_saved_dataset_is_refused(tmp_path):
    dd = load_dialog_pairs(seed=0, corpus_dir=write_corpus(tmp_path / "english"))
    folder = tmp_path / "dialog"
    save_dialog_pairs(dd, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["content_hash"] = "0" * 16
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match="content hash .* differs"):
        load_saved_dialog(folder)


def test_pykeen_graphs_have_documented_counts():
    expected = {"nations": (1992, 14, 55), "kinships": (10686, 104, 25), "umls": (6529, 135, 46)}
    for name, (triples, entities, relations) in expected.items():
        kg = load_pykeen_graph(name)
        assert kg.counts() == {"triples": triples, "entities": entities, "relations": relations}, name
    nations = load_pykeen_graph("nations")
    assert [len(load_pykeen_graph("nations", splits=[s]).triples) for s in ["train", "valid", "test"]] == [1592, 199, 201]
    # provenance points at the real line
    h, r, t = nations.triples[1600]
    prov = nations.provenance[1600]
    folder = data.pykeen_datasets_dir().parent.parent
    assert (folder / prov.file).read_text().splitlines()[prov.line - 1].split("\t") == [h, r, t]
    graph = nations.to_networkx()
    assert graph.number_of_edges() == 1992 and graph.number_of_nodes() == 14
    assert graph.get_edge_data(h, t, key=r) == {"relation": r, "source": prov.source, "file": prov.file, "line": prov.line}


def test_malformed_tsv_names_line(tmp_path):
    path = tmp_path / "kg.tsv"
    path.write_text("a\tlikes\tb\n\nb\tlikes\n")
    with pytest.raises(DataFormatError, match=r"kg\.tsv, line 3: expected head<TAB>relation<TAB>tail"):
        read_triples_tsv(path, source="test")


def test_wordnet_missing_says_how_to_install(tmp_path):
    assert not wordnet_available(tmp_path)
    with pytest.raises(MissingDataError, match="apt-get install -y wordnet-base wordnet-sense-index"):
        load_wordnet_graph(around="dog.n.01", data_path=tmp_path / "data", wordnet_dir=tmp_path)
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(not wordnet_available(), reason="WordNet 3.0 not installed: apt-get install -y wordnet-base "
                                                    "wordnet-sense-index (CI installs it in setup)")
def test_wordnet_dog_hypernyms(tmp_path):
    kg = load_wordnet_graph(around="dog.n.01", hops=1, data_path=tmp_path)
    hypernyms = {t for h, r, t in kg.triples if h == "dog.n.01" and r == "hypernym"}
    assert "canine.n.02" in hypernyms and "domestic_animal.n.01" in hypernyms
    assert ("dog.n.01", "part_meronym", "flag.n.07") in kg.triples
    prov = kg.provenance[kg.triples.index(("dog.n.01", "hypernym", "canine.n.02"))]
    line = (tmp_path / "nltk_data/corpora/wordnet" / prov.file).read_text().splitlines()[prov.line - 1]
    assert prov.file == "data.noun" and line.startswith("02084071 05 n ") and " dog " in line
    first = load_wordnet_graph(limit=200, pos="n", data_path=tmp_path)
    assert first.counts()["triples"] > 100 and all(".n." in h for h, _, _ in first.triples)
