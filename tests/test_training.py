"""The one training loop (diffprobe.training) the three trainers share: checkpoints by step, by time, at the end
and on Ctrl-C; a deadline; one resume rule."""

import pytest
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.training import run_steps


def _loop(total, start=0, every=2, minutes=60.0, stop_at=None, deadline=None):
    applied, saved = [], []

    def step(i):
        if i == stop_at:
            raise KeyboardInterrupt
        return (lambda: applied.append(i)), {"loss": float(i)}

    try:
        done = run_steps("test", start, total, step, lambda n, scheduled: saved.append((n, scheduled)), every, minutes,
                         progress=False, deadline=deadline)
    except KeyboardInterrupt:
        done = None
    return done, applied, saved


def test_checkpoints_come_every_n_steps_at_the_end_and_on_ctrl_c():
    assert _loop(5) == (5, [0, 1, 2, 3, 4], [(2, True), (4, True), (5, True)])
    assert _loop(5, start=3) == (5, [3, 4], [(4, True), (5, True)])  # resumed at step 3
    done, applied, saved = _loop(5, stop_at=3)
    assert done is None and applied == [0, 1, 2] and saved == [(2, True), (3, False)]  # the last whole step kept
    assert _loop(5, minutes=0.0)[2] == [(1, False), (2, True), (3, False), (4, True), (5, True)]  # by time too
    assert _loop(5, deadline=0.0) == (0, [], [])  # the deadline had passed: nothing done, nothing to save


def test_one_checkpoint_format_restores_the_optimiser_and_refuses_other_settings_but_not_another_schedule(tmp_path):
    from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint

    net = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = {"lr": 0.1, "steps": 100, "fit": {"sigma": 1.0, "checkpoint_every": 5}}
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": net.weight}, opt, 7, {"loss": [1.5]}, saved)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=0.5)
    back = load_checkpoint(path, fresh, {"lr": 0.1, "steps": 200, "fit": {"sigma": 1.0, "checkpoint_every": 9}})
    assert back.step == 7 and back.history == {"loss": [1.5]} and list(back.tensors) == ["w"]
    torch.testing.assert_close(back.tensors["w"], net.weight.detach())
    assert fresh.param_groups[0]["lr"] == 0.1                     # the saved optimiser numbers, not the fresh ones
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
    with pytest.raises(DiffprobeError, match=r"other settings: fit.sigma \(1.0 there, 2.0 now\), lr"):
        load_checkpoint(path, fresh, {"lr": 0.2, "steps": 100, "fit": {"sigma": 2.0, "checkpoint_every": 5}})
    (tmp_path / "old.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes().replace(b"diffprobe-checkpoint-1",
                                                                                              b"diffprobe-checkpoint-0"))
    with pytest.raises(DiffprobeError, match="earlier release"):
        load_checkpoint(tmp_path / "old.safetensors", fresh, saved)


def test_mini_training_resumes_exactly_and_refuses_a_work_dir_of_other_settings(tmp_path):
    from diffprobe.training.mini import MiniTrainSettings, _run_phase

    def phase(cfg, steps, folder):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)

        def step_fn(i):
            opt.zero_grad()
            loss = net(torch.full((1, 3), float(i))).pow(2).sum()
            loss.backward()
            return {"loss": loss.item()}

        losses, done = _run_phase("net", folder, {"net": net}, opt, steps, step_fn, cfg)
        return done, net.weight.detach().clone(), losses

    cfg = MiniTrainSettings(lr=1e-2, checkpoint_every=2)
    assert phase(cfg, 3, tmp_path / "a")[0] == 3
    done, resumed, losses = phase(cfg, 5, tmp_path / "a")  # more steps: continues at step 3
    _, straight, straight_losses = phase(cfg, 5, tmp_path / "b")
    assert done == 5 and torch.equal(resumed, straight) and losses == straight_losses
    with pytest.raises(DiffprobeError, match=r"other settings: lr \(0.01 there, 0.05 now\)"):
        phase(MiniTrainSettings(lr=5e-2, checkpoint_every=2), 6, tmp_path / "a")
