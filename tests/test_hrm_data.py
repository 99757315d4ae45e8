"""Lesson 12's puzzle data: the exact sudoku solver (solutions, difficulty, bad input), deterministic generators of
distinct uniquely-solvable puzzles, augmentations and the key that sees through them, leak-free splits, mazes with a
unique shortest path and an honest path checker, the hub parsers (on fake rows, no network) and provenance."""
import itertools
import json
from collections import deque

import numpy as np
import pytest
import torch

from jepa_lab.core import data_hash
from jepa_lab.hrm import (MAZE_VOCAB, PuzzleError, augment_sudoku, augment_train, concat_puzzles, generate_maze,
                          generate_mazes, generate_sudoku, grid_accuracy, is_shortest_path, is_valid_solution, leaks,
                          load_puzzles, make_sudoku, parse_maze_rows, parse_sudoku_rows, puzzle_manifest,
                          show_sudoku, solve_sudoku, split_puzzles, subset, sudoku_key, vocab_size)


def grid(text: str) -> np.ndarray:
    side = round(len(text) ** 0.5)
    return np.array([0 if ch in ".0" else int(ch) for ch in text]).reshape(side, side)


NORVIG = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
NORVIG_SOLUTION = "483921657967345821251876493548132976729564138136798245372689514814253769695417382"
INKALA = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"
INKALA_SOLUTION = "812753649943682175675491283154237896369845721287169534521974368438526917796318452"


@pytest.fixture(scope="module")
def sudoku4():
    return generate_sudoku(300, 4, seed=3)


@pytest.fixture(scope="module")
def mazes():
    return generate_mazes(60, 15, seed=3)


# --- solver ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("puzzle, solution, hard", [(NORVIG, NORVIG_SOLUTION, False), (INKALA, INKALA_SOLUTION, True)])
def test_solver_solves_published_puzzles(puzzle, solution, hard):
    result = solve_sudoku(grid(puzzle))
    assert len(result.solutions) == 1 and (result.solutions[0] == grid(solution)).all()
    assert is_valid_solution(grid(solution))
    assert (result.guesses > 10) if hard else (result.guesses == 0)


def test_solver_counts_all_solutions_of_an_empty_4x4():
    result = solve_sudoku(np.zeros((4, 4), int), limit=1000)
    assert len(result.solutions) == 288                                    # the known number of 4×4 grids
    assert len({s.tobytes() for s in result.solutions}) == 288 and all(map(is_valid_solution, result.solutions))
    assert len(solve_sudoku(np.zeros((4, 4), int)).solutions) == 2       # limit=2 stops at the second


def test_solver_finds_no_solution_for_a_contradiction():
    dead_end = np.array([[1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 3, 0], [0, 0, 4, 0]])   # (0, 2) has no candidate left
    assert solve_sudoku(dead_end).solutions == []
    puzzle, solution = grid(NORVIG), grid(NORVIG_SOLUTION)
    tried = 0
    for r, c in zip(*np.nonzero(puzzle == 0)):                            # every wrong digit the givens allow
        for d in range(1, 10):
            box = puzzle[r // 3 * 3:r // 3 * 3 + 3, c // 3 * 3:c // 3 * 3 + 3]
            if d == solution[r, c] or d in puzzle[r] or d in puzzle[:, c] or d in box: continue
            wrong = puzzle.copy(); wrong[r, c] = d
            assert solve_sudoku(wrong).solutions == [], (r, c, d)
            tried += 1
    assert tried > 50


@pytest.mark.parametrize("bad, words", [
    (np.zeros((3, 4), int), "square"),
    (np.zeros((5, 5), int), "unsupported sudoku size 5"),
    (np.zeros((4, 4)), "integers"),
    (np.where(np.eye(4, dtype=bool), 5, 0), "holds 5"),
    (np.array([[1, 0, 1, 0], [0] * 4, [0] * 4, [0] * 4]), "digit 1 appears twice in row 0"),
    (np.array([[2, 0, 0, 0], [0, 2, 0, 0], [0] * 4, [0] * 4]), "digit 2 appears twice in box 0"),
])
def test_bad_input_raises_naming_the_problem(bad, words):
    with pytest.raises(PuzzleError, match=words): solve_sudoku(bad)


# --- generator ------------------------------------------------------------------------------------------------------

def test_same_seed_same_puzzles_other_seed_different(sudoku4):
    again = generate_sudoku(300, 4, seed=3)
    assert torch.equal(again.inputs, sudoku4.inputs) and torch.equal(again.labels, sudoku4.labels)
    assert again.keys == sudoku4.keys
    other = generate_sudoku(300, 4, seed=4)
    assert len(set(other.keys) ^ set(sudoku4.keys)) > 300


@pytest.mark.parametrize("n, count", [(4, 300), (6, 25)])
def test_every_puzzle_has_one_solution_equal_to_its_label(n, count, sudoku4):
    puzzles = sudoku4 if n == 4 else generate_sudoku(count, n, seed=0)
    assert puzzles.kind == f"sudoku{n}" and puzzles.inputs.shape == (count, n * n) and puzzles.vocab_size == n + 2
    assert len(set(puzzles.keys)) == count and puzzles.inputs.min() == 1 and puzzles.labels.min() == 2
    for x, y, rating in zip(puzzles.inputs, puzzles.labels, puzzles.difficulty):
        result = solve_sudoku((x - 1).reshape(n, n).numpy())
        assert len(result.solutions) == 1 and (result.solutions[0] + 1 == y.reshape(n, n).numpy()).all()
        assert result.guesses == rating


def test_min_guesses_keeps_only_harder_puzzles():
    hard = generate_sudoku(3, 9, seed=0, min_guesses=4)
    assert (hard.difficulty >= 4).all()
    assert all(solve_sudoku((x - 1).reshape(9, 9).numpy()).guesses >= 4 for x in hard.inputs)


def test_minimal_puzzles_lose_uniqueness_when_any_clue_goes():
    rng = np.random.default_rng(5)
    for n in (4, 6):
        puzzle, solution, _ = make_sudoku(n, rng)
        for r, c in zip(*np.nonzero(puzzle)):
            fewer = puzzle.copy(); fewer[r, c] = 0
            assert len(solve_sudoku(fewer).solutions) == 2


def test_asking_for_more_4x4_puzzles_than_exist_raises():
    with pytest.raises(PuzzleError, match="distinct 4×4 puzzles"):
        generate_sudoku(40, 4, seed=0, min_guesses=1, max_attempts=200)    # 4×4 puzzles never need a guess


# --- augmentation and keys ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 6, 9])
def test_augmentation_keeps_validity_uniqueness_and_key(n):
    rng = np.random.default_rng(n)
    puzzle, solution, _ = make_sudoku(n, rng)
    changed = 0
    for _ in range(8):
        p, s = augment_sudoku(puzzle, solution, rng)
        result = solve_sudoku(p)
        assert is_valid_solution(s) and len(result.solutions) == 1 and (result.solutions[0] == s).all()
        assert sorted((p > 0).ravel()) == sorted((puzzle > 0).ravel())
        assert sudoku_key(p) == sudoku_key(puzzle)
        changed += not (p == puzzle).all()
    assert changed >= 6


def orbit_4x4(puzzle: np.ndarray) -> set:
    "All images of a 4×4 puzzle under digit relabelling and spatial symmetries, enumerated naively."
    lines = [[a, b, c, d] for first, second in itertools.permutations([(0, 1), (2, 3)])
             for a, b in itertools.permutations(first) for c, d in itertools.permutations(second)]
    images = set()
    for rows in lines:
        for cols in lines:
            for g in (puzzle[np.ix_(rows, cols)], puzzle[np.ix_(rows, cols)].T):
                for digits in itertools.permutations(range(1, 5)):
                    images.add(tuple(np.array((0,) + digits)[g].ravel()))
    return images


def test_4x4_key_is_exact_against_a_naive_orbit():
    rng = np.random.default_rng(11)
    same = differ = 0
    for _ in range(25):
        puzzle, solution, _ = make_sudoku(4, rng, clues=int(rng.integers(5, 10)))
        orbit = orbit_4x4(puzzle)
        assert len(orbit) >= 3072 // 16
        r, c = np.argwhere(puzzle > 0)[0]
        edits = [augment_sudoku(puzzle, solution, rng)[0]]
        for d in range(1, 5):                                             # change one clue to each other digit
            edit = puzzle.copy(); edit[r, c] = d; edits.append(edit)
        edit = puzzle.copy(); edit[r, c] = 0                               # move that clue to a blank cell
        rb, cb = np.argwhere(puzzle == 0)[0]; edit[rb, cb] = puzzle[r, c]; edits.append(edit)
        for edit in edits:
            equivalent = tuple(edit.ravel()) in orbit
            assert (sudoku_key(edit) == sudoku_key(puzzle)) == equivalent
            same += equivalent; differ += not equivalent
    assert same >= 25 and differ >= 50


# --- splits ---------------------------------------------------------------------------------------------------------

def test_split_is_by_key_and_leak_free(sudoku4):
    split = split_puzzles(sudoku4, 0.2, seed=0)
    train, test = split["train"], split["test"]
    assert train.n_puzzles + test.n_puzzles == 300 and test.n_puzzles == 60
    assert not set(train.keys) & set(test.keys) and leaks(train, test) == []
    assert split_puzzles(sudoku4, 0.2, seed=0)["test"].keys == test.keys


def test_augment_train_adds_copies_and_leaks_catches_a_planted_one(sudoku4, mazes):
    split = split_puzzles(sudoku4, 0.2, seed=1)
    train = augment_train(split["train"], 3, seed=0)
    assert train.n_puzzles == 4 * split["train"].n_puzzles and leaks(train, split["test"]) == []
    for x, y in zip(train.inputs[-20:], train.labels[-20:]):
        result = solve_sudoku((x - 1).reshape(4, 4).numpy())
        assert len(result.solutions) == 1 and (result.solutions[0] + 1 == y.reshape(4, 4).numpy()).all()
    copy = subset(augment_train(subset(split["test"], [5]), 1, seed=9), [1])
    assert not torch.equal(copy.inputs[0], split["test"].inputs[5])
    lying = copy._replace(keys=["not the real key"])                      # leaks recomputes keys from the puzzles
    assert leaks(concat_puzzles([train, lying]), split["test"]) == [split["test"].keys[5]]
    assert augment_train(mazes, 3, seed=0) is mazes


def test_subset_concat_and_vocab(sudoku4, mazes):
    part = subset(sudoku4, torch.tensor([2, 0]))
    assert torch.equal(part.inputs, sudoku4.inputs[[2, 0]]) and part.keys == [sudoku4.keys[2], sudoku4.keys[0]]
    both = concat_puzzles([part, sudoku4])
    assert both.n_puzzles == 302 and both.keys[2:] == sudoku4.keys
    assert vocab_size(sudoku4) == 6 and vocab_size(mazes) == 6 and mazes.vocab == MAZE_VOCAB
    with pytest.raises(PuzzleError, match="cannot concatenate"): concat_puzzles([sudoku4, mazes])


# --- mazes ----------------------------------------------------------------------------------------------------------

def bfs_distance(open_cells: np.ndarray, start, goal) -> int:
    "Independent BFS on a boolean (side, side) grid; -1 when unreachable."
    side, dist, queue = len(open_cells), {start: 0}, deque([start])
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < side and 0 <= nc < side and open_cells[nr, nc] and (nr, nc) not in dist:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist.get(goal, -1)


def test_maze_paths_are_the_unique_shortest(mazes):
    again = generate_mazes(60, 15, seed=3)
    assert torch.equal(again.inputs, mazes.inputs) and len(set(mazes.keys)) == 60
    assert not torch.equal(generate_mazes(60, 15, seed=4).inputs, mazes.inputs)
    for x, y, length in zip(mazes.inputs[:20], mazes.labels[:20], mazes.difficulty[:20]):
        x, y = x.reshape(15, 15).numpy(), y.reshape(15, 15).numpy()
        assert not (x == 5).any() and ((x == y) | ((x == 2) & (y == 5))).all()
        s, g = tuple(np.argwhere(x == 3)[0]), tuple(np.argwhere(x == 4)[0])
        walkable = x != 1
        assert bfs_distance(walkable, s, g) == length == (y == 5).sum() + 1 >= 15
        for r, c in np.argwhere(y == 5):                                  # block any path cell: strictly longer
            blocked = walkable.copy(); blocked[r, c] = False
            assert bfs_distance(blocked, s, g) == -1 or bfs_distance(blocked, s, g) > length
        assert is_shortest_path(x, y, 15)


def test_is_shortest_path_rejects_broken_and_longer_paths(mazes):
    x, y = mazes.inputs[0].clone(), mazes.labels[0].clone()
    on_path = (y == 5).nonzero().squeeze(1)
    gap = y.clone(); gap[on_path[len(on_path) // 2]] = 2
    assert not is_shortest_path(x, gap, 15)
    open_off_path = [i for i in (x == 2).nonzero().squeeze(1).tolist() if y[i] == 2]
    spur = y.clone(); spur[open_off_path[0]] = 5
    assert not is_shortest_path(x, spur, 15)
    broken_wall = y.clone(); broken_wall[(x == 1).nonzero()[0]] = 5
    assert not is_shortest_path(x, broken_wall, 15)
    assert not is_shortest_path(x, x, 15) and not is_shortest_path(x, mazes.labels[1], 15)
    with pytest.raises(PuzzleError, match="side"): is_shortest_path(x, y, 14)


def tokens(rows: list[str]) -> torch.Tensor:
    return torch.tensor([MAZE_VOCAB.index(ch) for ch in "".join(rows)])


TWO_ROUTES = ["#######", "#S   G#", "# ### #", "#     #", "#######", "#######", "#######"]


def test_is_shortest_path_rejects_a_detour():
    x = tokens(TWO_ROUTES)
    straight = tokens(["#######", "#SoooG#", "# ### #", "#     #", "#######", "#######", "#######"])
    detour = tokens(["#######", "#S   G#", "#o###o#", "#ooooo#", "#######", "#######", "#######"])
    assert is_shortest_path(x, straight, 7) and not is_shortest_path(x, detour, 7)


def test_maze_generator_rejects_even_sides():
    with pytest.raises(PuzzleError, match="odd"): generate_maze(16, np.random.default_rng(0))


# --- parsing, sources, provenance -----------------------------------------------------------------------------------

def test_parse_sudoku_rows_on_fake_rows():
    rows = [dict(question=NORVIG.replace("0", "."), answer=NORVIG_SOLUTION, rating=0),
            dict(question=INKALA, answer=INKALA_SOLUTION, rating=37)]
    parsed = parse_sudoku_rows(rows)
    assert parsed.kind == "sudoku9" and parsed.difficulty.tolist() == [0, 37]
    assert torch.equal(parsed.inputs[0] - 1, torch.from_numpy(grid(NORVIG)).reshape(-1))
    assert torch.equal(parsed.labels[1] - 1, torch.from_numpy(grid(INKALA_SOLUTION)).reshape(-1))
    assert parsed.keys[0] == sudoku_key(grid(NORVIG))
    wrong = INKALA_SOLUTION[:-2] + INKALA_SOLUTION[-1] + INKALA_SOLUTION[-2]
    with pytest.raises(PuzzleError, match="not a valid"): parse_sudoku_rows([dict(question=INKALA, answer=wrong)])
    with pytest.raises(PuzzleError, match="contradicts"):
        parse_sudoku_rows([dict(question="9" + NORVIG[1:], answer=NORVIG_SOLUTION)])
    with pytest.raises(PuzzleError, match="one size"):
        parse_sudoku_rows(rows + [dict(question="1" + "." * 15, answer="1234341221434321")])
    with pytest.raises(PuzzleError, match="'question' and 'answer'"): parse_sudoku_rows([dict(puzzle=NORVIG)])


def test_parse_maze_rows_on_fake_rows():
    answer = "".join(["#######", "#SoooG#", "# ### #", "#     #", "#######", "#######", "#######"])
    parsed = parse_maze_rows([dict(question="".join(TWO_ROUTES), answer=answer)], 7)
    assert parsed.kind == "maze7" and parsed.difficulty.tolist() == [4]
    assert is_shortest_path(parsed.inputs[0], parsed.labels[0], 7)
    with pytest.raises(PuzzleError, match="only turn open cells"):
        parse_maze_rows([dict(question="".join(TWO_ROUTES), answer="o" + answer[1:])], 7)
    with pytest.raises(PuzzleError, match="49"): parse_maze_rows([dict(question="#", answer="#")], 7)


def test_load_puzzles_generated_hub_plumbing_and_unknown_sources(monkeypatch):
    assert load_puzzles("generated:sudoku4", 20, seed=2).keys == generate_sudoku(20, 4, seed=2).keys
    assert torch.equal(load_puzzles("generated:maze9", 5, seed=2).inputs, generate_mazes(5, 9, seed=2).inputs)
    for bad in ("generated:sudoku5", "hub:someone/chess", "sudoku4", "disk:x.json"):
        with pytest.raises(PuzzleError, match="generated:sudoku4.*hub:sapientinc/sudoku-extreme"): load_puzzles(bad, 5)
    import datasets
    import jepa_lab.data
    rows = [dict(question=NORVIG, answer=NORVIG_SOLUTION, rating=0), dict(question=INKALA, answer=INKALA_SOLUTION, rating=9)]
    asked = []
    def fake_table(name, split="train", cache_dir=None):
        asked.append((name, split))
        return datasets.Dataset.from_list(rows)
    monkeypatch.setattr(jepa_lab.data, "load_table", fake_table)             # no network: the hub call is faked
    loaded = load_puzzles("hub:sapientinc/sudoku-extreme", 5, seed=0, split="test")
    assert asked == [("hub:sapientinc/sudoku-extreme", "test")] and sorted(loaded.difficulty.tolist()) == [0, 9]


def test_manifest_round_trips_with_provenance(tmp_path, sudoku4):
    path = tmp_path / "runs" / "puzzles.json"
    manifest = puzzle_manifest(sudoku4, "generated:sudoku4", 3, path, args=dict(count=300, n=4))
    assert json.loads(path.read_text()) == manifest
    assert manifest["seed"] == 3 and manifest["generator"] == "generated:sudoku4" and manifest["count"] == 300
    assert manifest["data_hash"] == data_hash(sudoku4.inputs, sudoku4.labels)
    assert sum(manifest["difficulty_histogram"].values()) == 300 and manifest["args"] == dict(count=300, n=4)
    edited = sudoku4._replace(inputs=sudoku4.inputs.clone()); edited.inputs[0, 0] = 1 if edited.inputs[0, 0] != 1 else 2
    assert puzzle_manifest(edited, "generated:sudoku4", 3)["data_hash"] != manifest["data_hash"]


def test_show_sudoku_and_grid_accuracy(sudoku4):
    text = show_sudoku(torch.tensor([2, 1, 3, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5]), 4)
    assert text.splitlines()[0] == " 1 . | 2 3 " and text.splitlines()[2] == "-----+-----" and text.endswith("4 ")
    labels = sudoku4.labels[:4]
    pred = labels.clone(); pred[0, 0] = 1; pred[1, :8] = 1
    cell, exact = grid_accuracy(pred, labels)
    assert exact == 0.5 and cell == pytest.approx(1 - 9 / 64)
