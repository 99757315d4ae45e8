"A training run killed with SIGKILL mid-way and resumed ends with the weights of an uninterrupted run."
import signal
import subprocess
import sys
import time
from pathlib import Path

from jepa_lab.core import final_weights, weights_equal

SCRIPT = '''
import sys, time, torch
from pathlib import Path
from jepa_lab.core import Run, seed_everything, train_loop
out, delay = Path(sys.argv[1]), float(sys.argv[2])
seed_everything(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
w_true = torch.linspace(-1, 1, 8)
def train_step(step):
    x = torch.randn(16, 8); y = (x @ w_true).unsqueeze(1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step(); time.sleep(delay)
    return {"loss": loss}
train_loop(train_step, model=model, optimizer=opt, scheduler=sched, steps=80, run=Run(out), ckpt_every=10, log_every=1)
'''


def train(out: Path, delay: float = 0.0, kill_when=None) -> int:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), str(delay)])
    if kill_when:
        deadline = time.time() + 120
        while proc.poll() is None and not kill_when(out) and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=300)


def checkpoints_at_least(n):
    return lambda out: len(list((out / "checkpoints").glob("step-*.safetensors"))) >= n


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(straight) == 0
    assert train(killed, delay=0.03, kill_when=checkpoints_at_least(2)) == -signal.SIGKILL
    survivors = sorted(p.name for p in (killed / "checkpoints").glob("step-*.safetensors"))
    assert survivors and survivors[-1] < "step-00000080", f"killed too late to test anything: {survivors}"
    assert not weights_equal(final_weights(straight), final_weights(killed))
    assert train(killed) == 0
    assert weights_equal(final_weights(straight), final_weights(killed))
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(80)), "the resumed run must log each step exactly once"
