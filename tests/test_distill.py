"Distillation (jepa_lab.distill): a small student distilled from the dreaming MoE matches its teacher, is smaller and faster, keeps its dreams' provenance; bad input."
import pytest
import torch
import torch.nn.functional as F

from jepa_lab.core import CheckpointError, Run, load_checkpoint, seed_everything
from jepa_lab.dream_learning import DreamLearningError, dream_provenance, read_provenance
from jepa_lab.distill import (DistillConfig, DistillError, DistillSet, benchmark_distill, compare_distill, distill_data, distill_loss,
                              evaluate_transition, param_count, real_data, situation_kl, summarise, train_student)
from jepa_lab.dreams import DreamingMoE, MoEConfig, MoETrainConfig, train_moe, walk_transitions
from jepa_lab.world_model import LatentTransition

STEPS, N, LABELLED = 8, 40, 15   # actions per walk, bank walks, labelled walks
MARGIN = 1.2                     # the bar: distilled held-out MSE <= MARGIN x the teacher's


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "Tiny ops throughout: one torch thread (see conftest)."


@pytest.fixture(scope="module")
def lab(tmp_path_factory, small_lab):
    "A bank of 40 walks, the first 15 labelled; 15 held-out walks from other worlds; a teacher MoE trained on the labelled ones."
    small = small_lab(N, STEPS, test_walks=15)
    bank = small.bank
    labelled = walk_transitions(small.latents[:LABELLED], small.walks.actions[:LABELLED])
    test_set = walk_transitions(small.test_latents, small.test_walks.actions)
    seed_everything(0)
    teacher = DreamingMoE(MoEConfig(bank.dim))
    train_moe(teacher, labelled, MoETrainConfig(steps=300, batch_size=64), Run(tmp_path_factory.mktemp("teacher")))
    return bank, labelled, test_set, teacher


SMALL = DistillConfig(hidden=32, steps=600, batch_size=128)
DRAWS = 8                        # one-step dreams per bank situation


@pytest.fixture(scope="module")
def students(lab, tmp_path_factory):
    "A student distilled from the teacher (labelled inputs + 8 one-step dreams per situation) and one trained from scratch, seed 0."
    bank, labelled, _, teacher = lab
    data, dreams = distill_data(teacher, labelled, bank, list(range(len(bank.scenes))) * DRAWS, seed=1, run_id="test")
    folder = tmp_path_factory.mktemp("students")
    seed_everything(0)
    distilled = train_student(data, SMALL, Run(folder / "distilled"), dream_provenance(dreams))
    seed_everything(0)
    scratch = train_student(real_data(labelled), SMALL, Run(folder / "scratch"), [])
    return distilled, scratch, folder


def test_distilled_student_matches_its_teacher_and_is_smaller_and_faster(lab, students):
    "The bar: distilled held-out MSE <= 1.2 x the teacher's (this seed gives 1.11; teacher and student seeds 1, 2 gave 0.96, 1.02), ~10x fewer parameters."
    _, _, test_set, teacher = lab
    distilled, scratch, _ = students
    teacher_mse, student_mse = evaluate_transition(teacher, test_set), evaluate_transition(distilled, test_set)
    copy_last = F.mse_loss(test_set.z, test_set.z_next).item()
    print(f"held-out MSE teacher {teacher_mse:.4f}, distilled {student_mse:.4f}, scratch {evaluate_transition(scratch, test_set):.4f}, "
          f"copy-last {copy_last:.4f}")
    assert teacher_mse < 0.5 * copy_last                                          # a teacher worth distilling
    assert student_mse <= MARGIN * teacher_mse, (student_mse, teacher_mse)
    assert param_count(distilled) < param_count(teacher) / 5
    speed = benchmark_distill(teacher, distilled, batch=1024, steps=5)
    assert speed["speedup"] > 1.5 and speed["student_params"] == param_count(distilled)


def test_student_learns_from_the_soft_targets(lab, students):
    "The distilled student follows its teacher on held-out inputs: closer to the teacher's predictions than the scratch student."
    _, _, test_set, teacher = lab
    distilled, scratch, _ = students
    with torch.no_grad():
        t = teacher.eval()(test_set.z, test_set.a).z_next
        to_teacher = {k: F.mse_loss(m(test_set.z, test_set.a), t).item() for k, m in (("distilled", distilled), ("scratch", scratch))}
    print(to_teacher)
    assert to_teacher["distilled"] < 0.5 * to_teacher["scratch"]


def test_provenance_round_trip(lab, students, tmp_path):
    bank, labelled, _, teacher = lab
    sources = [0, 3, 7, 11]
    data, dreams = distill_data(teacher, labelled, bank, sources, seed=5, run_id="prov-run")
    assert len(data.z) == len(labelled.z) + 4 and int(data.labelled.sum()) == len(labelled.z)
    assert torch.equal(data.soft[len(labelled.z):], data.real[len(labelled.z):])   # a dream has no real next latent
    seed_everything(0)
    cfg = DistillConfig(hidden=8, steps=5, batch_size=8)
    student = train_student(data, cfg, Run(tmp_path / "d"), dream_provenance(dreams))
    rows = read_provenance(tmp_path / "d" / "student.safetensors")
    assert [r["source"] for r in rows] == sources
    assert all(r["seed"] == 5 and r["step"] == 0 and r["run"] == "prov-run" and 0 <= r["expert"] < 4 for r in rows)
    again = LatentTransition(bank.dim, data.a.shape[1], 8, 2)
    ckpt = load_checkpoint(tmp_path / "d" / "student.safetensors", again, restore_rng=False)
    assert ckpt.step == 5 and all(torch.equal(p, q) for p, q in zip(student.state_dict().values(), again.state_dict().values()))
    assert read_provenance(students[2] / "scratch" / "student.safetensors") == []  # no dreams used, and it says so
    assert len(read_provenance(students[2] / "distilled" / "student.safetensors")) == DRAWS * len(bank.scenes)
    with pytest.raises(DreamLearningError, match="lacks"):
        train_student(data, cfg, Run(tmp_path / "bad"), [{"expert": 0, "step": 0, "seed": 1, "source": 0}])   # no run
    assert not (tmp_path / "bad" / "student.safetensors").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        read_provenance(tmp_path / "missing.safetensors")


def test_compare_distill_rows(lab, tmp_path):
    bank, labelled, test_set, _ = lab
    rows = compare_distill(labelled, test_set, bank, range(20), MoEConfig(bank.dim, hidden=16), MoETrainConfig(steps=20, batch_size=32),
                           DistillConfig(hidden=8, steps=20, batch_size=32), seeds=[0, 1], folder=tmp_path, run_id="r")
    table = summarise(rows)
    assert list(table) == ["teacher MoE", "student distilled", "student from scratch", "copy-last"]
    assert all(n == 2 for _, _, n in table.values()) and table["copy-last"][1] == 0
    assert len(read_provenance(tmp_path / "seed1" / "distilled" / "student.safetensors")) == 20


def test_temperature_shapes_the_softmax_term():
    g = torch.Generator().manual_seed(0)
    cands = torch.randn(30, 8, generator=g)
    teacher = cands[:5] + 0.05 * torch.randn(5, 8, generator=g)
    student = teacher + 0.5 * torch.randn(5, 8, generator=g)
    assert situation_kl(teacher, teacher, cands, 1.0).abs() < 1e-6
    kl = [situation_kl(student, teacher, cands, T).item() for T in (0.1, 1.0, 10.0)]
    assert all(k > 0 for k in kl) and len(set(round(k, 6) for k in kl)) == 3
    loss, terms = distill_loss(student, teacher, cands[:5], torch.ones(5, dtype=torch.bool), DistillConfig(kd_weight=1.0, temperature=2.0), cands)
    assert torch.isclose(loss, terms["soft_mse"] + terms["kl"]) and torch.isclose(terms["kl"], situation_kl(student, teacher, cands, 2.0))
    mixed, t = distill_loss(student, teacher, cands[:5], torch.tensor([True, False, True, False, False]), DistillConfig(alpha=0.25))
    assert torch.isclose(t["real_mse"], F.mse_loss(student[[0, 2]], cands[[0, 2]]))
    assert torch.isclose(mixed, 0.75 * t["soft_mse"] + 0.25 * t["real_mse"])


def test_bad_input_raises_clear_errors(lab, tmp_path):
    bank, labelled, _, teacher = lab
    for bad, match in [(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"), (dict(alpha=1.5), "alpha"),
                       (dict(hidden=0), "sizes"), (dict(mse_weight=0.0), "not both 0")]:
        with pytest.raises(DistillError, match=match):
            DistillConfig(**bad)
    assert issubclass(DistillError, ValueError)
    x = torch.randn(4, 8)
    with pytest.raises(DistillError, match="temperature"):
        situation_kl(x, x, torch.randn(10, 8), 0.0)
    with pytest.raises(DistillError, match="candidates"):
        situation_kl(x, x, torch.randn(10, 7), 1.0)
    with pytest.raises(DistillError, match="must match"):
        distill_loss(x, torch.randn(4, 7), x, torch.ones(4, dtype=torch.bool), DistillConfig())
    with pytest.raises(DistillError, match="needs candidates"):
        distill_loss(x, x, x, torch.ones(4, dtype=torch.bool), DistillConfig(kd_weight=1.0))
    with pytest.raises(DistillError, match="loss is nan"):
        distill_loss(x, x * float("nan"), x, torch.ones(4, dtype=torch.bool), DistillConfig())
    good = real_data(labelled)
    nan = good.soft.clone(); nan[2, 3] = float("nan")
    with pytest.raises(DistillError, match="soft holds NaN"):
        train_student(good._replace(soft=nan), SMALL, Run(tmp_path / "nan"), [])
    with pytest.raises(DistillError, match="must match z"):
        train_student(good._replace(real=good.real[:, :-1]), SMALL, Run(tmp_path / "shape"), [])
    with pytest.raises(DistillError, match="at least one"):
        train_student(DistillSet(*(t[:0] for t in good)), SMALL, Run(tmp_path / "empty"), [])
    with pytest.raises(DistillError, match="labelled must be"):
        train_student(good._replace(labelled=good.labelled.float()), SMALL, Run(tmp_path / "mask"), [])
    assert not any(tmp_path.glob("*/student.safetensors"))                        # nothing written by a refused run
    with pytest.raises(Exception, match=r"latents z must be"):
        distill_data(teacher, labelled._replace(z=labelled.z[:, :-1]), bank, [0], seed=0, run_id="r")
