"""Behaviour of `ldm_course.ddpm` that the MNIST / CIFAR10 chapters and the later latent chapters rely on:
the L_simple loss, condition dropout, classifier-free guidance, model files and the judge classifier."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_course.core import make_generator, save_checkpoint
from ldm_course.ddpm import (
    ClassifierConfig, DDPMConfig, DiffusionLoss, build_scheduler, build_unet, class_guidance, classifier_accuracy,
    classifier_free_guidance, ddpm_config, diffusion_loss, load_ddpm, sample_images, save_ddpm, train_classifier,
)
from ldm_course.scheduler import NoiseScheduler
from ldm_course.training import TrainConfig

torch.set_num_threads(1)


class Recorder(nn.Module):
    "Returns a fixed function of its inputs and remembers them."
    def forward(self, x_t, t, class_labels=None):
        self.x_t, self.t, self.class_labels = x_t, t, class_labels
        return torch.tanh(x_t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_uses_add_noise_and_the_scheduler_target(prediction_type):
    scheduler = NoiseScheduler(1000, "linear", prediction_type=prediction_type)
    x0 = torch.rand(16, 1, 6, 6) * 2 - 1
    model = Recorder()
    loss = diffusion_loss(model, x0, scheduler, generator=make_generator(3))
    g = make_generator(3)  # replay the draws: t first, then ε
    t = torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(model.t, t)
    torch.testing.assert_close(model.x_t, scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(loss, F.mse_loss(torch.tanh(model.x_t), scheduler.get_target(x0, noise, t)))
    assert loss.shape == ()


def test_loss_rejects_a_model_of_the_wrong_shape():
    with pytest.raises(ValueError, match="expected the input shape"):
        diffusion_loss(lambda x, t: x[:, :, :3], torch.zeros(2, 1, 4, 4), NoiseScheduler())


def test_loss_decreases_when_training_on_a_tiny_batch():
    torch.manual_seed(0)
    cfg = ddpm_config("mnist", "smoke")
    model, scheduler = build_unet(cfg), build_scheduler(cfg)
    loss_fn = DiffusionLoss(scheduler, null_class=cfg.null_class, cond_drop_prob=0.1)
    x = torch.zeros(8, 1, 28, 28) - 1
    x[:, :, 8:20, 12:16] = 1  # a bar: easy to learn
    batch = (x, torch.arange(8) % 10)
    def fixed_loss():
        with torch.no_grad(): return float(loss_fn(model, batch, generator=make_generator(0)))
    before = fixed_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = loss_fn(model, batch)
        opt.zero_grad(); loss.backward(); opt.step()
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)


def test_condition_dropout_rate_and_null_label():
    model = Recorder()
    labels = torch.arange(10).repeat(2000)
    for p in (0.0, 0.1, 0.5, 1.0):
        DiffusionLoss(NoiseScheduler(), null_class=10, cond_drop_prob=p)(model, (torch.zeros(len(labels), 1, 2, 2), labels))
        dropped = model.class_labels == 10
        assert abs(dropped.float().mean().item() - p) < 0.015, (p, dropped.float().mean())
        assert torch.equal(model.class_labels[~dropped], labels[~dropped])  # the others are untouched
    DiffusionLoss(NoiseScheduler(), null_class=None)(model, (torch.zeros(4, 1, 2, 2), torch.arange(4)))
    assert model.class_labels is None  # unconditional model: labels are not passed
    with pytest.raises(ValueError, match="cond_drop_prob"):
        DiffusionLoss(NoiseScheduler(), null_class=10, cond_drop_prob=1.5)


class Stub(nn.Module):
    "ε̂ = label/10 + x·(1 + t/1000); counts its forwards."
    def __init__(self):
        super().__init__(); self.calls = 0
    def forward(self, x_t, t, class_labels):
        self.calls += 1
        return class_labels.view(-1, 1, 1, 1) / 10 + x_t * (1 + t.view(-1, 1, 1, 1) / 1000)


def test_classifier_free_guidance_closed_form():
    stub, x, t, c = Stub(), torch.randn(4, 1, 3, 3), torch.tensor([10, 200, 500, 999]), torch.tensor([0, 3, 7, 9])
    e_cond, e_null = stub(x, t, c), stub(x, t, torch.full_like(c, 10))
    torch.testing.assert_close(class_guidance(stub, c, 0.0, null_class=10)(x, t), e_null)
    torch.testing.assert_close(class_guidance(stub, c, 1.0, null_class=10)(x, t), e_cond)
    for w in (0.5, 2.0, 7.5):
        stub.calls = 0
        torch.testing.assert_close(class_guidance(stub, c, w, null_class=10)(x, t), e_null + w * (e_cond - e_null))
        assert stub.calls == 1, "cond and ∅ must go through one batched forward"
    generic = classifier_free_guidance(stub, 3.0, {"class_labels": c}, {"class_labels": torch.full_like(c, 10)})
    torch.testing.assert_close(generic(x, t), e_null + 3.0 * (e_cond - e_null))
    with pytest.raises(ValueError, match="same keys"):
        classifier_free_guidance(stub, 2.0, {"class_labels": c}, {"context": c})


def test_checkpoint_round_trip_reproduces_samples(tmp_path):
    torch.manual_seed(0)
    cfg = ddpm_config("mnist", "smoke")
    model = build_unet(cfg)
    with torch.no_grad():  # move away from the initialisation, so that a load that forgot the weights would differ
        for p in model.parameters(): p.add_(0.05 * torch.randn_like(p))
    path = save_ddpm(tmp_path / "ddpm.safetensors", model, cfg, {"step": 7})
    loaded = load_ddpm(path)
    assert loaded.config == cfg and isinstance(loaded.config, DDPMConfig) and loaded.metadata["step"] == 7
    def draw(m, seed):
        return sample_images(m, build_scheduler(cfg), cfg.image_shape, class_labels=torch.arange(4), guidance_scale=2.0,
                             null_class=cfg.null_class, num_inference_steps=5, eta=cfg.ddim_eta, generator=make_generator(seed))
    assert torch.equal(draw(loaded.model, 1), draw(model, 1))
    assert torch.equal(loaded.generate(class_labels=torch.arange(4), guidance_scale=2.0, num_inference_steps=5, seed=1),
                       draw(model, 1))  # what `ldm-course sample` calls
    assert not torch.equal(draw(build_unet(cfg), 1), draw(model, 1))
    with pytest.raises(ValueError, match="not a DDPM model file"):
        load_ddpm(save_checkpoint(tmp_path / "other.safetensors", {"a": torch.zeros(1)}))


def test_config_presets_round_trip_and_build():
    for dataset in ("mnist", "cifar10"):
        for profile in ("smoke", "cpu", "gpu"):
            cfg = ddpm_config(dataset, profile)
            assert DDPMConfig.from_dict(cfg.to_dict()) == cfg
    cfg = ddpm_config("cifar10", "smoke")
    assert build_unet(cfg)(torch.zeros(2, *cfg.image_shape), torch.tensor([0, 999]), class_labels=torch.tensor([1, 10])).shape == (2, 3, 32, 32)


def quadrant_images(n, seed):
    "Noisy 16×16 images whose class is the quadrant (0-3) holding a bright square."
    g = make_generator(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = -1 + 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    for i, q in enumerate(labels.tolist()):
        r, c = 1 + 8 * (q // 2), 1 + 8 * (q % 2)
        x[i, :, r:r + 6, c:c + 6] += 2
    return x.clamp(-1, 1), labels


def test_judge_classifier_learns_an_easy_task():
    torch.manual_seed(0)
    x, y = quadrant_images(1024, 0)
    config = ClassifierConfig(in_channels=1, num_classes=4, channels=(8, 16), feature_dim=32)
    judge, history = train_classifier(x, y, config, TrainConfig(lr=3e-3, warmup_steps=5, max_steps=40, batch_size=32,
                                                                ema_decay=0.9), device="cpu")
    xt, yt = quadrant_images(256, 1)
    assert classifier_accuracy(judge, xt, yt) > 0.95
    assert history.loss[-1] < history.loss[0]
    assert judge.features(xt[:3]).shape == (3, 32)
    with pytest.raises(ValueError, match="expected images"):
        judge.features(torch.zeros(2, 3, 16, 16))
