"""Lesson 11's reasoning data: the generator is deterministic by seed, the split is uncontaminated (and the report
catches planted leaks), and the exact checker accepts gold chains and rejects each kind of mistake and bad input."""
from dataclasses import replace

import pytest

from jepa_lab.reasoning import (SYMBOL, ProblemConfig, ReasoningError, apply_op, check_chain, contamination_report,
                                generate_problems, gold_chain, prompt_and_target, split_problems, structure)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(600, ProblemConfig(), seed=3)


@pytest.fixture(scope="module")
def split(problems):
    return split_problems(problems)


def test_same_seed_same_problems_other_seed_different(problems):
    again = generate_problems(600, ProblemConfig(), seed=3)
    assert [p.text for p in again] == [p.text for p in problems]
    assert [gold_chain(p) for p in again] == [gold_chain(p) for p in problems]
    other = generate_problems(600, ProblemConfig(), seed=4)
    assert sum(a.text != b.text for a, b in zip(other, problems)) > 550


def test_problems_are_exact_and_bounded(problems):
    config = ProblemConfig(min_ops=2, max_ops=4)
    assert {p.difficulty for p in problems} == {2, 3, 4}
    for p in problems:
        assert all(0 <= v <= config.max_value for v in p.values)
        for o in p.ops:
            assert p.values[o.target] == apply_op(o.op, tuple(p.values[a] for a in o.args), o.const)
        assert p.text.endswith(f"What is {p.names[p.query]}?") and len(set(p.names)) == len(p.names)
    assert len({p.template for p in problems}) == 8


def test_config_rejects_bad_settings():
    with pytest.raises(ReasoningError): ProblemConfig(min_ops=3, max_ops=2)
    with pytest.raises(ReasoningError): ProblemConfig(leaf_range=(5, 200))


def test_real_split_is_uncontaminated(split):
    assert len(split["train"]) > 200 and len(split["test"]) > 10
    assert contamination_report(split["train"], split["test"]) == {"problems": [], "structures": [], "templates": []}
    assert {p.template for p in split["test"]} <= {"T6", "T7"} and not {p.template for p in split["train"]} & {"T6", "T7"}


def test_report_catches_a_planted_duplicate_problem(split):
    train, test = split["train"], split["test"]
    leak = contamination_report(train + [test[0]], test)                       # the very problem, in train
    assert all(leak[k] for k in ("problems", "structures", "templates"))
    back = contamination_report(train, test + [train[0]])                      # and the other way
    assert all(back[k] for k in ("problems", "structures", "templates"))


def test_report_catches_a_planted_structure_alone(split):
    "A train problem linked to the test set only by its graph structure (other names, template and text)."
    target = split["test"][0]
    twin = replace(target, names=[n.replace("the number of", "the count of") for n in target.names], template="T0",
                   text="A different text.")
    leak = contamination_report(split["train"] + [twin], split["test"])
    assert leak["structures"] and leak["structures"] == contamination_report([target], split["test"])["structures"]
    assert not leak["problems"] and not leak["templates"]


def test_report_catches_a_planted_template_alone(split):
    "A train problem in a test template family, with a structure no test problem has."
    test_structures = {structure(p) for p in split["test"]}
    rephrased = next(p for p in generate_problems(50, seed=99, templates=("T6",)) if structure(p) not in test_structures)
    leak = contamination_report(split["train"] + [rephrased], split["test"])
    assert leak["templates"] and not leak["structures"] and not leak["problems"]


def test_gold_chains_pass(problems):
    for p in problems:
        c = check_chain(p, gold_chain(p))
        assert c.correct and c.answer == p.answer and not c.missing and len(c.steps) == p.difficulty


def _case(problems, difficulty=3):
    p = next(q for q in problems if q.difficulty == difficulty and q.ops[0].op != "mod")
    return p, gold_chain(p).splitlines()


def test_wrong_step_value_is_caught(problems):
    p, gold = _case(problems)
    o = p.ops[0]
    gold[0] = f"Step 1: {p.names[o.target]} = {gold[0].split(' = ')[1]} = {p.values[o.target] + 1}."
    c = check_chain(p, "\n".join(gold))
    assert not c.correct and not c.steps[0].correct and "arithmetic error" in c.steps[0].errors
    assert c.answer_correct                                                    # the answer alone does not pass a chain


def test_wrong_operation_is_caught(problems):
    p, gold = _case(problems)
    o = p.ops[0]
    other = "sub" if o.op != "sub" else "add"
    gold[0] = f"Step 1: {p.names[o.target]} = {p.names[o.args[0]]} {SYMBOL[other]} {p.names[o.args[1]]} = {p.values[o.target]}."
    c = check_chain(p, "\n".join(gold))
    assert not c.correct and "wrong operation" in c.steps[0].errors


def test_commuted_arguments_are_accepted_only_for_commutative_ops(problems):
    p = next(q for q in problems if q.ops[0].op in ("add", "mul"))
    o, gold = p.ops[0], gold_chain(p).splitlines()
    gold[0] = f"Step 1: {p.names[o.target]} = {p.names[o.args[1]]} {SYMBOL[o.op]} {p.names[o.args[0]]} = {p.values[o.target]}."
    assert check_chain(p, "\n".join(gold)).correct
    q = next(q for q in problems if q.ops[0].op == "sub" and q.values[q.ops[0].args[0]] != q.values[q.ops[0].args[1]])
    o, gold = q.ops[0], gold_chain(q).splitlines()
    gold[0] = f"Step 1: {q.names[o.target]} = {q.names[o.args[1]]} - {q.names[o.args[0]]} = {q.values[o.target]}."
    assert not check_chain(q, "\n".join(gold)).steps[0].correct


def test_missing_step_is_caught(problems):
    p, gold = _case(problems)
    c = check_chain(p, "\n".join(gold[1:]))
    assert not c.correct and c.missing == [p.names[p.ops[0].target]]
    assert c.answer_correct


def test_wrong_final_answer_is_caught(problems):
    p, gold = _case(problems)
    c = check_chain(p, "\n".join(gold[:-1] + [f"Answer: {p.answer + 1}"]))
    assert c.steps_correct and not c.answer_correct and not c.correct


def test_mod_zero_step_is_an_arithmetic_error_not_a_crash(problems):
    "A model can write `x mod 0`; the checker must score it wrong, not raise ZeroDivisionError."
    assert all(o.const >= 2 for q in problems for o in q.ops if o.op == "mod")   # the generator never draws mod 0
    assert apply_op("mod", (30,), 0) is None
    with pytest.raises(ReasoningError, match="moduli"): ProblemConfig(moduli=(0, 7))
    p = next(q for q in problems if q.ops[0].op == "mod")
    o, gold = p.ops[0], gold_chain(p).splitlines()
    gold[0] = f"Step 1: {p.names[o.target]} = {p.names[o.args[0]]} mod 0 = {p.values[o.target]}."
    c = check_chain(p, "\n".join(gold))
    assert not c.correct and not c.steps[0].correct and "arithmetic error" in c.steps[0].errors
    q, gold = _case(problems)                                                  # also where the true step is not a mod
    o = q.ops[0]
    gold[0] = f"Step 1: {q.names[o.target]} = {q.names[o.args[0]]} mod 0 = {q.values[o.target]}."
    c = check_chain(q, "\n".join(gold))
    assert not c.steps[0].correct and {"wrong operation", "arithmetic error"} <= set(c.steps[0].errors)


def test_bad_inputs_raise(problems):
    p, gold = _case(problems)
    with pytest.raises(ReasoningError, match="Step"): check_chain(p, f"Answer: {p.answer}")
    with pytest.raises(ReasoningError, match="Step"): check_chain(p, "")
    with pytest.raises(ReasoningError, match="Answer"): check_chain(p, "\n".join(gold[:-1]))
    with pytest.raises(ReasoningError, match="Answer"): check_chain(p, "\n".join(gold[:-1] + ["Answer: seven"]))
    garbled = check_chain(p, "\n".join(["Step 1: nonsense"] + gold[1:]))
    assert not garbled.correct and garbled.steps[0].errors == ["unparseable step"]


def test_prompt_and_target_round_trip(split):
    for p in split["test"][:20]:
        prompt, target = prompt_and_target(p)
        assert prompt.startswith("Problem: ") and prompt.endswith("Solution:\n") and p.text in prompt
        assert (prompt + target).isascii() and target.endswith(f"Answer: {p.answer}\n")
        assert check_chain(p, target).correct


def test_structure_is_the_same_for_every_isomorphic_copy():
    "Relabel the quantities and swap the arguments of + and × at random: the canonical form must not change."
    import random
    from jepa_lab.reasoning import COMMUTATIVE, Operation
    rng = random.Random(0)
    graphs = generate_problems(300, ProblemConfig(min_ops=4, max_ops=6), seed=5)
    changed = 0
    for p in graphs:
        perm = list(range(len(p.values))); rng.shuffle(perm)
        ops = [Operation(perm[o.target], o.op, tuple(perm[a] for a in (o.args[::-1] if o.op in COMMUTATIVE and rng.random() < .5
                                                                        else o.args)), o.const) for o in p.ops]
        copy = replace(p, ops=ops, query=perm[p.query])
        assert structure(copy) == structure(p), (p.ops, ops)
        changed += ops != list(p.ops)
    assert changed > 250                                              # the copies really differ
    different = generate_problems(50, ProblemConfig(min_ops=4, max_ops=6), seed=6)
    assert len({structure(p) for p in different}) > 25               # and the form still tells graphs apart
