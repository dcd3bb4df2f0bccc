"""Tests of the training loop (ldm_course.training): learning, LR schedule, EMA, checkpoints, NaN guard, condition
dropout, exact resume in-process and after SIGKILL, and a 2-process CPU run under `accelerate launch`."""
import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm_course.core import Config, load_checkpoint, make_generator, read_checkpoint_metadata, save_checkpoint
from ldm_course.training import (
    EMA, ResumableBatchSampler, TrainConfig, drop_condition, ema_decay_at, epoch_permutation, latest_checkpoint,
    list_checkpoints, train_config, warmup_cosine,
)
from ldm_course.trainer import NonFiniteLossError, Trainer, load_trained_weights, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_worker.py"
os.environ.setdefault("LDM_COURSE_NO_PROGRESS", "1")


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models; other tests' subprocesses need the second core


def regression_data(n: int = 256) -> torch.utils.data.TensorDataset:
    g = make_generator(0)
    x, w = torch.randn(n, 8, generator=g), torch.randn(8, 2, generator=g)
    return torch.utils.data.TensorDataset(x, x @ w)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Dropout(0.1), nn.Linear(32, 2))


def noisy_mse(model, batch):
    "Draws from the global RNG (input noise, dropout) like a diffusion loss does."
    x, y = batch
    return nn.functional.mse_loss(model(x + 0.05 * torch.randn_like(x)), y)


def small_cfg(**changes) -> TrainConfig:
    base = TrainConfig(lr=1e-2, warmup_steps=5, max_steps=30, batch_size=16, ema_decay=0.9, seed=0)
    return base.replace(**changes)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- learning, schedule, EMA

def test_loss_decreases_on_tiny_data():
    history = train(mlp(), regression_data(), noisy_mse, small_cfg(max_steps=80), device="cpu")
    assert len(history) == 80 and history.step == list(range(1, 81))
    first, last = sum(history.loss[:10]) / 10, sum(history.loss[-10:]) / 10
    assert last < 0.25 * first, (first, last)
    assert all(v > 0 for v in history.images_per_s)


def test_lr_schedule_closed_form():
    # warm-up: (s+1)/W; cosine: ½(1+cos(π(s-W)/(T-W))) down to min_lr_ratio
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(4, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(85, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert warmup_cosine(110, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(60, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0)  # no warm-up


def test_lr_used_by_training_follows_the_schedule():
    cfg = small_cfg(lr=2e-3, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)
    history = train(mlp(), regression_data(), noisy_mse, cfg, device="cpu")
    expected = [cfg.lr * warmup_cosine(s, 4, 12, 0.1) for s in range(12)]
    assert history.lr == pytest.approx(expected, rel=1e-9)


def test_ema_closed_form():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.9) == pytest.approx(0.9)
    assert ema_decay_at(3, 0.9, warmup=False) == 0.9
    w = nn.Linear(1, 1, bias=False)
    nn.init.constant_(w.weight, 4.0)
    ema = EMA(w, decay=0.5, warmup=True)
    for value in (0.0, 10.0, -2.0):
        w.weight.data.fill_(value)
        ema.update(w)
    # β_0 = 1/10, β_1 = 2/11, β_2 = 3/12: θ̄ ← βθ̄ + (1-β)θ from θ̄ = 4
    e = 0.1 * 4.0 + 0.9 * 0.0
    e = 2 / 11 * e + 9 / 11 * 10.0
    e = 3 / 12 * e + 9 / 12 * -2.0
    assert ema.model.weight.item() == pytest.approx(e, abs=1e-6)
    assert ema.num_updates == 3 and w.weight.item() == -2.0  # the trained model is untouched
    no_warmup = EMA(w, decay=0.5, warmup=False)
    w.weight.data.fill_(0.0)
    no_warmup.update(w)
    assert no_warmup.model.weight.item() == pytest.approx(-1.0)  # 0.5·(-2) + 0.5·0


def test_ema_inside_training_tracks_the_weights():
    trainer = Trainer(mlp(), regression_data(), noisy_mse, small_cfg(max_steps=5, ema_decay=0.0), device="cpu")
    trainer.fit()
    assert trainer.ema.num_updates == 5
    assert_same_tensors(trainer.ema_model.state_dict(), trainer.unwrapped_model.state_dict())  # β = 0: a copy


# ---------------------------------------------------------------- condition dropout, data order, config

def test_drop_condition():
    labels = torch.arange(1000) % 10
    assert torch.equal(drop_condition(labels, 0.0, 10), labels)
    assert (drop_condition(labels, 1.0, 10) == 10).all()
    dropped = drop_condition(labels, 0.25, 10, generator=make_generator(3))
    frac = (dropped == 10).float().mean().item()
    assert 0.2 < frac < 0.3
    assert torch.equal(drop_condition(labels, 0.25, 10, generator=make_generator(3)), dropped)
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    emb, null = torch.randn(6, 4, 3), torch.full((4, 3), -7.0)
    mask = torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool)
    out = drop_condition(emb, 0.5, null, dropped=mask)
    assert torch.equal(out[mask], null.expand(3, 4, 3)) and torch.equal(out[~mask], emb[~mask])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        drop_condition(labels, -0.1, 10)
    with pytest.raises(ValueError, match="does not broadcast"):
        drop_condition(emb, 0.5, torch.zeros(4, 2))


def test_data_order_is_resumable_and_split_between_processes():
    full = ResumableBatchSampler(50, 4, seed=7)
    it = iter(full)
    batches = [next(it) for _ in range(30)]  # 12 batches per epoch: crosses two epoch boundaries
    epoch0 = sum(batches[:12], [])
    assert len(set(epoch0)) == 48 and set(epoch0) <= set(range(50))
    assert epoch0 == epoch_permutation(50, 7, 0)[:48].tolist()
    resumed = iter(ResumableBatchSampler(50, 4, seed=7, start=17))
    assert [next(resumed) for _ in range(13)] == batches[17:]
    r0, r1 = (iter(ResumableBatchSampler(50, 4, seed=7, rank=r, world_size=2)) for r in (0, 1))
    a, b = next(r0), next(r1)
    assert a + b == epoch_permutation(50, 7, 0)[:8].tolist()
    assert full.position(30) == {"epoch": 2, "batch": 6, "batches_per_epoch": 12, "num_samples": 50, "global_batch": 4}


def test_train_config_presets_and_validation():
    assert train_config("smoke").max_steps < train_config("cpu").max_steps < train_config("gpu").max_steps
    assert train_config("gpu").mixed_precision in ("bf16", "fp16")
    assert train_config("cpu", lr=5e-4).lr == 5e-4
    cfg = small_cfg(betas=(0.8, 0.99), clip_grad_norm=None)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"lr": 0}, {"grad_accum": 0}, {"ema_decay": 1.0}, {"mixed_precision": "fp8"}, {"keep_last": -1},
                {"clip_grad_norm": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            small_cfg(**bad)


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_layout_and_keep_last(tmp_path):
    cfg = small_cfg(max_steps=20, checkpoint_every=3, keep_last=2)
    trainer = Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path, device="cpu", metadata={"model": "mlp"})
    trainer.fit()
    # saved at 3, 6, ..., 18 and where training stopped (20); only the last two remain
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000018.safetensors", "step_0000020.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000018.safetensors", "step_0000020.safetensors"]
    state, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert set(state) == {"model", "ema", "optimizer", "lr_scheduler", "rng", "history"}
    assert meta["step"] == 20 and meta["extra"] == {"model": "mlp"} and meta["num_processes"] == 1
    assert TrainConfig.from_dict(meta["train_config"]) == cfg
    assert meta["data_position"] == {"epoch": 1, "batch": 4, "batches_per_epoch": 16, "num_samples": 256,
                                     "global_batch": 16}
    assert_same_tensors(state["model"], trainer.unwrapped_model.state_dict())
    assert_same_tensors(state["ema"]["model"], trainer.ema_model.state_dict())
    assert len(state["history"]["loss"]) == 20
    ema_copy = load_trained_weights(mlp(seed=5), latest_checkpoint(tmp_path))
    assert_same_tensors(ema_copy.state_dict(), trainer.ema_model.state_dict())


def test_keep_last_zero_keeps_everything(tmp_path):
    train(mlp(), regression_data(), noisy_mse, small_cfg(max_steps=9, checkpoint_every=3, keep_last=0), tmp_path,
          device="cpu")
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_000000{s}.safetensors" for s in (3, 6, 9)]


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []
    def exploding(model, batch):
        calls.append(1)  # grad_accum = 1: call k is step k
        loss = noisy_mse(model, batch)
        return loss * float("nan") if len(calls) >= 8 else loss
    trainer = Trainer(mlp(), regression_data(), exploding, small_cfg(checkpoint_every=5), tmp_path, device="cpu")
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert "at step 8" in message and "weights are those of step 7" in message
    assert str(tmp_path / "step_0000005.safetensors") in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005.safetensors"]
    state, meta = load_checkpoint(tmp_path / "step_0000005.safetensors")
    assert meta["step"] == 5
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped_model.parameters())  # the NaN update never happened
    assert trainer.step == 7


def test_nan_guard_before_any_checkpoint(tmp_path):
    nan_loss = lambda model, batch: noisy_mse(model, batch) * float("nan")  # noqa: E731
    with pytest.raises(NonFiniteLossError, match="at step 1: .*none written yet"):
        train(mlp(), regression_data(), nan_loss, small_cfg(), tmp_path, device="cpu")
    assert list_checkpoints(tmp_path) == []


def test_never_writes_a_checkpoint_with_nan_weights(tmp_path):
    trainer = Trainer(mlp(), regression_data(), noisy_mse, small_cfg(max_steps=4), tmp_path, device="cpu")
    trainer.fit()
    good = latest_checkpoint(tmp_path)
    with torch.no_grad(): next(trainer.unwrapped_model.parameters())[0, 0] = float("inf")
    trainer.step += 1
    with pytest.raises(NonFiniteLossError, match="Refusing to write step_0000005.*0.weight"):
        trainer.save()
    assert list_checkpoints(tmp_path) == [good]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_loss_fn_must_return_a_scalar():
    with pytest.raises(TypeError, match="scalar tensor"):
        train(mlp(), regression_data(), lambda m, b: m(b[0]), small_cfg(max_steps=1), device="cpu")


# ---------------------------------------------------------------- exact resume, in-process

def test_resume_in_process_gives_the_same_weights(tmp_path):
    cfg = small_cfg(max_steps=24, grad_accum=2, checkpoint_every=10)
    full = Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path / "full", device="cpu")
    full.fit()
    part = Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path / "part", device="cpu")
    part.fit(until_step=13)  # an odd step: mid-epoch, between two periodic checkpoints
    assert latest_checkpoint(tmp_path / "part").name == "step_0000013.safetensors"
    resumed = Trainer(mlp(seed=99), regression_data(), noisy_mse, cfg, tmp_path / "part", device="cpu")
    history = resumed.fit()
    assert_same_tensors(resumed.unwrapped_model.state_dict(), full.unwrapped_model.state_dict())
    assert_same_tensors(resumed.ema_model.state_dict(), full.ema_model.state_dict())
    assert history.loss == full.history.loss and history.lr == full.history.lr
    # without restoring the RNG the trajectory differs: the test above can fail
    fresh = Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path / "other", device="cpu")
    fresh.fit(until_step=13)
    torch.manual_seed(12345)
    fresh.fit(resume=False)
    assert not torch.equal(fresh.unwrapped_model[0].weight, full.unwrapped_model[0].weight)


def test_sampling_does_not_change_the_trajectory():
    def sample_fn(model, step):
        torch.randn(1000)  # a sampler draws noise from the global RNG
        return torch.rand(4, 1, 4, 4) * 2 - 1
    cfg = small_cfg(max_steps=12, sample_every=4)
    with_samples = Trainer(mlp(), regression_data(), noisy_mse, cfg, sample_fn=sample_fn, device="cpu")
    with_samples.fit()
    without = Trainer(mlp(), regression_data(), noisy_mse, cfg, device="cpu")
    without.fit()
    assert [s for s, _ in with_samples.history.samples] == [4, 8, 12]
    assert with_samples.history.samples[0][1].shape[0] in (1, 3)  # a grid (C, H, W) in [0, 1]
    assert_same_tensors(with_samples.unwrapped_model.state_dict(), without.unwrapped_model.state_dict())


def test_trainers_with_different_grad_accum_do_not_interfere():
    # Accelerate shares the accumulation count between all Accelerators of a process
    cfg = small_cfg(max_steps=6, grad_accum=1)
    reference = Trainer(mlp(), regression_data(), noisy_mse, cfg, device="cpu")
    reference.fit()
    first = Trainer(mlp(), regression_data(), noisy_mse, cfg, device="cpu")
    Trainer(mlp(), regression_data(), noisy_mse, cfg.replace(grad_accum=3), device="cpu")  # built later
    first.unwrapped_model.eval()  # fit() must put the model back in training mode (dropout on)
    first.fit()
    assert_same_tensors(first.unwrapped_model.state_dict(), reference.unwrapped_model.state_dict())


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    cfg = small_cfg(max_steps=6)
    train(mlp(), regression_data(), noisy_mse, cfg, tmp_path, device="cpu")
    mtime = latest_checkpoint(tmp_path).stat().st_mtime_ns
    history = train(mlp(seed=3), regression_data(), lambda m, b: 1 / 0, cfg, tmp_path, device="cpu")
    assert len(history) == 6 and latest_checkpoint(tmp_path).stat().st_mtime_ns == mtime


def test_checkpoint_without_identity_still_checks_data_size_and_recipe(tmp_path):
    # a checkpoint written before checkpoints recorded their identity: what it does record is still compared
    cfg = small_cfg(max_steps=6)
    train(mlp(), regression_data(), noisy_mse, cfg, tmp_path, until_step=3, device="cpu")
    path = latest_checkpoint(tmp_path)
    state, meta = load_checkpoint(path)
    del meta["identity"]
    save_checkpoint(path, state, meta)
    with pytest.warns(UserWarning, match="records no identity"), \
         pytest.raises(ValueError, match="data.size: 256 in the checkpoint, 128 now"):
        train(mlp(), regression_data(128), noisy_mse, cfg, tmp_path, device="cpu")
    with pytest.warns(UserWarning, match="records no identity"), \
         pytest.raises(ValueError, match="recipe.lr: 0.01 in the checkpoint, 0.001 now"):
        train(mlp(), regression_data(), noisy_mse, cfg.replace(lr=1e-3), tmp_path, device="cpu")
    with pytest.warns(UserWarning, match="records no identity"):
        history = train(mlp(), regression_data(), noisy_mse, cfg, tmp_path, device="cpu")
    assert len(history) == 6


# ---------------------------------------------------------------- subprocesses: SIGKILL, accelerate launch

def _env() -> dict:
    return {**os.environ, "LDM_COURSE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _worker(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_sigkill_mid_run_resumes_to_the_same_weights(tmp_path):
    args = ["--max-steps", "40", "--checkpoint-every", "5", "--grad-accum", "2"]
    uninterrupted = _worker(str(tmp_path / "full"), "--final", str(tmp_path / "full.safetensors"), *args)
    victim = _worker(str(tmp_path / "killed"), *args, "--step-delay", "0.1")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and victim.poll() is None:
        latest = latest_checkpoint(tmp_path / "killed")
        if latest is not None and read_checkpoint_metadata(latest)["step"] >= 10: break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = read_checkpoint_metadata(latest_checkpoint(tmp_path / "killed"))["step"]
    assert 10 <= killed_at < 40
    out = _finish(_worker(str(tmp_path / "killed"), "--final", str(tmp_path / "resumed.safetensors"), *args))
    assert f"from=step_{killed_at:07d}.safetensors" in out and "step=40" in out
    _finish(uninterrupted)
    (a, meta_a), (b, meta_b) = load_checkpoint(tmp_path / "full.safetensors"), load_checkpoint(tmp_path / "resumed.safetensors")
    assert_same_tensors(a["model"], b["model"])  # bitwise
    assert_same_tensors(a["ema"], b["ema"])
    for k, state in a["optimizer"]["state"].items():
        assert_same_tensors(state, b["optimizer"]["state"][k])
    assert meta_a["loss"] == meta_b["loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_under_accelerate_launch(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process without mpirun; --multi_gpu goes through
    # torchrun, and ACCELERATE_USE_CPU=1 makes it a 2-process CPU (gloo) run.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(WORKER), str(tmp_path / "ckpt"), "--max-steps", "12",
           "--checkpoint-every", "6", "--expect-processes", "2", "--final", str(tmp_path / "final_{rank}.safetensors")]
    run = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("DONE") == 2 and "processes=2" in run.stdout
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == ["step_0000006.safetensors", "step_0000012.safetensors"]
    state, meta = load_checkpoint(tmp_path / "ckpt" / "step_0000012.safetensors")
    assert meta["num_processes"] == 2 and meta["data_position"]["global_batch"] == 16  # batch_size is global: 8 per process
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    (r0, m0), (r1, _) = load_checkpoint(tmp_path / "final_0.safetensors"), load_checkpoint(tmp_path / "final_1.safetensors")
    assert_same_tensors(r0["model"], r1["model"])  # gradients were averaged: both processes hold the same weights
    assert_same_tensors(r0["model"], state["model"])
    assert sum(m0["loss"][-3:]) < sum(m0["loss"][:3])


def test_bf16_mixed_precision_on_cpu(tmp_path):
    # a subprocess: Accelerate fixes the mixed precision of a whole process at its first Accelerator
    out = _finish(_worker(str(tmp_path / "bf16"), "--max-steps", "10", "--checkpoint-every", "0", "--mixed-precision",
                          "bf16", "--final", str(tmp_path / "final.safetensors")))
    assert "DONE" in out
    state, meta = load_checkpoint(latest_checkpoint(tmp_path / "bf16"))
    assert meta["mixed_precision"] == "bf16" and meta["step"] == 10
    assert all(t.dtype == torch.float32 for t in state["model"].values())  # weights stay fp32 under autocast
    assert all(math.isfinite(v) for v in state["history"]["loss"].tolist())


# ---------------------------------------------------------------- checkpoint identity and clean-up (issue 14, items 2 and 8)

def linear_loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def pair_data(seed: int, n: int = 64) -> torch.utils.data.TensorDataset:
    g = make_generator(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g))


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(2, 1)


def test_resume_refuses_a_checkpoint_trained_on_other_data_of_the_same_size(tmp_path):
    # the repro of issue 14.2: same config, same number of samples, other tensors, same folder
    cfg = TrainConfig(lr=1e-2, warmup_steps=1, max_steps=5, batch_size=16, ema_decay=0.9)
    first = train(linear(), pair_data(0), linear_loss, cfg, tmp_path, device="cpu")
    with pytest.raises(ValueError) as err:
        second = train(linear(), pair_data(1), linear_loss, cfg, tmp_path, device="cpu")
        assert second.loss != first.loss, "the second run resumed the first one's finished checkpoint"
    message = str(err.value)
    assert "step_0000005.safetensors" in message and "data.fingerprint" in message, message
    saved = read_checkpoint_metadata(tmp_path / "step_0000005.safetensors")["identity"]["data"]["fingerprint"]
    assert saved in message  # both identities are named
    assert list_checkpoints(tmp_path) == [tmp_path / "step_0000005.safetensors"]  # nothing was overwritten


def test_resume_refuses_another_model_or_recipe_and_names_the_tensors(tmp_path):
    cfg = small_cfg(max_steps=6)
    train(mlp(), regression_data(), noisy_mse, cfg, tmp_path, until_step=3, device="cpu")
    wider = nn.Sequential(nn.Linear(8, 48), nn.SiLU(), nn.Dropout(0.1), nn.Linear(48, 2))
    with pytest.raises(ValueError, match=r"step_0000003\.safetensors.*0\.weight.*\(32, 8\).*\(48, 8\)"):
        train(wider, regression_data(), noisy_mse, cfg, tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"recipe\.lr: 0\.01 in the checkpoint, 0\.001 now"):
        train(mlp(), regression_data(), noisy_mse, cfg.replace(lr=1e-3), tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"data\.size: 256 in the checkpoint, 128 now"):
        train(mlp(), regression_data(128), noisy_mse, cfg, tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"model\.config\.width: None in the checkpoint, 32 now"):
        Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path, device="cpu", model_config={"width": 32}).fit()
    # what does not change the trajectory may change
    history = train(mlp(), regression_data(), noisy_mse, cfg.replace(checkpoint_every=2, keep_last=5), tmp_path,
                    device="cpu")
    assert len(history) == 6


def test_identity_is_stored_and_explicit_data_identity_is_used(tmp_path):
    ident = {"source": "mnist real", "size": 256, "fingerprint": "abc"}
    trainer = Trainer(mlp(), regression_data(), noisy_mse, small_cfg(max_steps=2), tmp_path, device="cpu",
                      data_identity=ident, model_config={"width": 32})
    trainer.fit()
    identity = read_checkpoint_metadata(latest_checkpoint(tmp_path))["identity"]
    assert identity["data"] == ident
    assert identity["model"]["class"] == "Sequential" and identity["model"]["config"] == {"width": 32}
    assert identity["model"]["num_parameters"] == sum(p.numel() for p in mlp().parameters())
    assert identity["recipe"]["lr"] == 1e-2 and "checkpoint_every" not in identity["recipe"]
    with pytest.raises(ValueError, match="describes 100 samples but the dataset has 256"):
        Trainer(mlp(), regression_data(), noisy_mse, small_cfg(), device="cpu", data_identity={**ident, "size": 100})


@dataclasses.dataclass
class MLPConfig(Config):
    widths: tuple[int, ...] = (32,)  # a tuple: stored as a JSON list, must still compare equal on resume


def test_a_config_object_survives_the_round_trip_through_the_checkpoint(tmp_path):
    cfg = small_cfg(max_steps=4)
    Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path, device="cpu", model_config=MLPConfig()).fit(until_step=2)
    resumed = Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path, device="cpu", model_config=MLPConfig())
    assert len(resumed.fit()) == 4
    with pytest.raises(ValueError, match=r"model\.config\.widths: \[32\] in the checkpoint, \[64\] now"):
        Trainer(mlp(), regression_data(), noisy_mse, cfg.replace(max_steps=6), tmp_path, device="cpu",
                model_config=MLPConfig((64,))).fit()


def test_fresh_run_never_deletes_what_it_writes(tmp_path):
    # the repro of issue 14.8: an older, longer run in the folder, then a fresh shorter one
    cfg = small_cfg(max_steps=40, checkpoint_every=10, keep_last=2)
    train(mlp(), regression_data(), noisy_mse, cfg, tmp_path, device="cpu")
    with pytest.warns(UserWarning, match="moved .*2 checkpoints.* to .*previous-"):
        trainer = Trainer(mlp(), regression_data(), noisy_mse, cfg.replace(max_steps=20), tmp_path, device="cpu")
        trainer.fit(resume=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010.safetensors", "step_0000020.safetensors"]
    assert read_checkpoint_metadata(latest_checkpoint(tmp_path))["step"] == 20
    assert trainer.last_checkpoint.is_file()
    aside = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(aside) == 1 and aside[0].name.startswith("previous-")
    assert [p.name for p in list_checkpoints(aside[0])] == ["step_0000030.safetensors", "step_0000040.safetensors"]


def test_orphaned_temporary_files_are_removed_at_start(tmp_path):
    for name in (".step_0000010.safetensors.a1b2.tmp", ".step_0000020.safetensors.zz.tmp"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    with pytest.warns(UserWarning, match="[Rr]emoved 2 unfinished checkpoint"):
        train(mlp(), regression_data(), noisy_mse, small_cfg(max_steps=2), tmp_path, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "step_0000002.safetensors"]


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = small_cfg(max_steps=12, checkpoint_every=4, keep_last=3)
    full = Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path / "full", device="cpu")
    full.fit()
    Trainer(mlp(), regression_data(), noisy_mse, cfg, tmp_path / "part", device="cpu").fit(until_step=8)
    latest = tmp_path / "part" / "step_0000008.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])  # a disk that filled up, a copy that stopped half-way
    resumed = Trainer(mlp(seed=7), regression_data(), noisy_mse, cfg, tmp_path / "part", device="cpu")
    with pytest.warns(UserWarning, match="step_0000008.safetensors.*unreadable.*step_0000004.safetensors"):
        resumed.fit()
    assert_same_tensors(resumed.unwrapped_model.state_dict(), full.unwrapped_model.state_dict())
    assert read_checkpoint_metadata(latest_checkpoint(tmp_path / "part"))["step"] == 12


def test_loading_weights_into_another_architecture_names_the_file_and_tensors(tmp_path):
    train(mlp(), regression_data(), noisy_mse, small_cfg(max_steps=2), tmp_path, device="cpu")
    path = latest_checkpoint(tmp_path)
    other = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Dropout(0.1), nn.Linear(16, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError) as err:
        load_trained_weights(other, path)
    message = str(err.value)
    assert str(path) in message and "0.weight" in message and "(32, 8)" in message and "(16, 8)" in message
    assert "4.weight" in message  # missing from the checkpoint
