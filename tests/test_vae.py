"""Chapter 07: KL-VAE and VQ-VAE (shapes for f = 4..32, posterior maths, quantiser, the LDM detail recipe, one step of every
high-resolution recipe, exact resume, scale factor, checkpoints, latent cache, colour fidelity)."""
import json

import pytest
import torch
import torch.nn.functional as F

from ldm_course.core import read_checkpoint_metadata, save_checkpoint, torch_seeded
from ldm_course.data import GARMENT_COLOURS
from ldm_course.trainer import Trainer
from ldm_course.vae import (
    AttnBlock, ByteImages, DiagonalGaussian, GroupNorm, VAEConfig, VectorQuantizer, build_vae, code_perplexity,
    encode_dataset, estimate_scale_factor, load_vae, save_vae, set_scale_factor, vae_checkpoint_path, vae_config,
    vae_train_config,
)
from ldm_course.vae_losses import (
    VAELoss, adaptive_weight, frozen, hinge_d_loss, hinge_g_loss, patch_spectrum_distance, random_crops,
)
from ldm_course.vae_metrics import (
    colour_error, colour_fidelity, colour_preserved, dominant_colour, garment_mask, high_frequency_ratio, interpolate,
    psnr, reconstruct, ssim,
)

TINY = dict(block_out_channels=(8, 16, 16), norm_groups=4)


def tiny(kind="kl", **kw):
    torch.manual_seed(0)
    return build_vae(VAEConfig(kind=kind, **{**TINY, **kw}))


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("channels,size,latent", [((8, 16, 16), 64, 16), ((8, 16, 16, 16), 64, 8), ((8, 16, 16, 16), 128, 16),
                                                   ((8, 8, 8, 16, 16), 256, 16), ((8, 8, 8, 8, 16, 16), 512, 16)])
def test_shapes(kind, channels, size, latent):
    model = tiny(kind, block_out_channels=channels, image_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        z = model.encode_latents(x)
        assert model.decode_latents(z).shape == x.shape
    assert out.sample.shape == x.shape
    assert out.latents.shape == z.shape == (2, 4, latent, latent)
    assert model.config.latent_shape == (4, latent, latent)
    if kind == "kl": assert out.posterior.mean.shape == (2, 4, latent, latent)
    else: assert out.quantized.indices.shape == (2, latent, latent)


def test_default_config_is_the_reports_16x16_latent_and_presets_agree():
    assert VAEConfig().downsample_factor == 4 and VAEConfig().latent_shape == (4, 16, 16)
    for profile, channels in (("cpu", 4), ("gpu", 64)):   # the report's 16×16 grid; cpu: 4 channels (chapters 09/10 can generate them), gpu: Rombach et al.'s c for f = 32
        for kind in ("kl", "vq"):
            cfg = vae_config(kind, profile)
            assert cfg.kind == kind and cfg.latent_shape == (channels, 16, 16)
            assert VAEConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert [vae_config("kl", p).downsample_factor for p in ("smoke", "cpu", "gpu")] == [4, 16, 32]
    assert vae_config("kl", "gpu", factor=8).latent_shape == (4, 64, 64)
    for profile, factor, compression in (("cpu", 16, 192), ("gpu", 32, 48), ("gpu", 8, 48)):   # pixel values per latent number
        cfg = vae_config("kl", profile, factor)
        assert 3 * cfg.image_size ** 2 == compression * cfg.latent_shape[0] * cfg.latent_shape[1] * cfg.latent_shape[2]
    with pytest.raises(ValueError, match="No cpu autoencoder preset for f = 32"): vae_config("kl", "cpu", factor=32)
    assert vae_train_config("vq", "cpu").ema_decay == 0.0


@pytest.mark.parametrize("bad,match", [(dict(kind="vqgan"), "kind"), (dict(block_out_channels=(8, 8)), "f = 4, 8, 16 or 32"),
                                       (dict(image_size=66), "multiple"), (dict(norm_groups=5), "norm_groups"),
                                       (dict(recon_loss="huber"), "recon_loss"), (dict(codebook_decay=1.0), "codebook_decay"),
                                       (dict(block_out_channels=(8,) * 7), "f = 4, 8, 16 or 32"),
                                       (dict(train_crop_size=96), "train_crop_size"), (dict(train_crop_size=30), "multiple"),
                                       (dict(perceptual_weight=1.0), "needs a perceptual_loss"), (dict(disc_start=-1), "disc_start")])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match): VAEConfig(**bad)


def test_group_norm_is_torchs_and_keeps_channels_last_in_bf16():
    "The bf16 channels-last workaround changes the speed, not the values, the gradients or the memory format."
    torch.manual_seed(0)
    reference, ours = torch.nn.GroupNorm(4, 8), GroupNorm(4, 8)
    ours.load_state_dict(reference.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias"}   # checkpoints written with nn.GroupNorm load unchanged
    x = torch.randn(2, 8, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn_like(x)
    y_ref, y = reference(x), ours(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.02, rtol=0.02)
    (g_ref,), (g,) = torch.autograd.grad(y_ref, x, upstream), torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(g.float(), g_ref.float(), atol=0.05, rtol=0.05)
    x32 = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(x32), reference(x32))   # fp32: nn.GroupNorm's own path


def test_cpu_preset_latent_channels_reach_the_latent_cache(tmp_path):
    "The cpu autoencoder's 4 latent channels (reduced widths, real shapes) are what encode_dataset caches, scaled."
    real = vae_config("kl", "cpu")
    model = build_vae(real.replace(block_out_channels=(8,) * 5, norm_groups=4, disc_weight=0.0)).eval()
    set_scale_factor(model, 0.5)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    latents = encode_dataset(model, x, tmp_path / "latents.safetensors")
    assert latents.shape == (2, *real.latent_shape) == (2, 4, 16, 16)
    with torch.no_grad(): torch.testing.assert_close(latents, 0.5 * model.encode(x).mean)
    assert read_checkpoint_metadata(tmp_path / "latents.safetensors")["vae_config"]["latent_channels"] == 4


def test_attention_matches_the_formula():
    torch.manual_seed(0)
    attn, x = AttnBlock(8, groups=4), torch.randn(2, 8, 4, 4)
    q, k, v = attn.qkv(attn.norm(x)).flatten(2).chunk(3, dim=1)
    manual = v @ torch.softmax(q.transpose(1, 2) @ k / 8 ** 0.5, dim=-1).transpose(1, 2)
    torch.testing.assert_close(attn(x), x + attn.proj_out(manual.reshape(2, 8, 4, 4)))


# ---------------------------------------------------------------- Gaussian posterior
def _posterior(seed=0):
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g))


def test_kl_closed_form_matches_torch_distributions_and_monte_carlo():
    q = _posterior()
    ref, prior = torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(q.kl(), torch.distributions.kl_divergence(ref, prior).sum(dim=(1, 2, 3)))
    g = torch.Generator().manual_seed(1)
    z = torch.stack([q.sample(g) for _ in range(4000)])
    mc = (ref.log_prob(z) - prior.log_prob(z)).sum(dim=(2, 3, 4)).mean(0)
    assert torch.allclose(mc, q.kl(), rtol=0.05)
    zero = DiagonalGaussian(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    assert zero.kl().item() == 0.0


def test_reparameterised_sample_has_the_posterior_mean_and_std_and_carries_gradients():
    q = _posterior()
    g = torch.Generator().manual_seed(2)
    z = torch.stack([q.sample(g) for _ in range(4000)])
    assert ((z.mean(0) - q.mean) / q.std).abs().max() < 0.1
    assert ((z.std(0) / q.std) - 1).abs().max() < 0.1
    mean, logvar = torch.zeros(1, 4, 2, 2, requires_grad=True), torch.zeros(1, 4, 2, 2, requires_grad=True)
    DiagonalGaussian(mean, logvar).sample().sum().backward()
    assert mean.grad is not None and logvar.grad.abs().sum() > 0   # differentiable in μ and σ
    same = [DiagonalGaussian(q.mean, q.logvar).sample(torch.Generator().manual_seed(5)) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1])                   # a seeded generator reproduces the draw


# ---------------------------------------------------------------- vector quantiser
def _quantizer(**kw):
    vq = VectorQuantizer(num_codes=4, code_dim=2, **kw)
    vq.codebook.copy_(torch.tensor([[0., 0.], [1., 0.], [0., 1.], [10., 10.]]))
    vq.embed_sum.copy_(vq.codebook); vq.cluster_size.fill_(1.0); vq.steps_unused.zero_()
    return vq


def test_quantises_to_the_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=32, code_dim=4).eval()
    z_e = torch.randn(3, 4, 5, 5)
    q = vq(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, vq.codebook).argmin(1)
    assert torch.equal(q.indices.flatten(), expected)
    torch.testing.assert_close(q.z_q.permute(0, 2, 3, 1).reshape(-1, 4), vq.codebook[expected])


def test_commitment_loss_value_and_straight_through_gradient():
    vq = _quantizer().eval()
    z_e = torch.tensor([[0.1, -0.2], [0.9, 0.2], [0.2, 0.7], [0.6, 0.45]]).T.reshape(1, 2, 2, 2).requires_grad_()
    q = vq(z_e)
    assert q.indices.flatten().tolist() == [0, 1, 2, 1]
    expected = (0.01 + 0.04 + 0.01 + 0.04 + 0.04 + 0.09 + 0.16 + 0.2025) / 8
    assert q.commitment_loss.item() == pytest.approx(expected, abs=1e-6)
    upstream = torch.randn(1, 2, 2, 2)
    (q.z_q * upstream).sum().backward()
    torch.testing.assert_close(z_e.grad, upstream)                 # ∂L/∂z_e = ∂L/∂z_q
    z_e.grad = None
    q.commitment_loss.backward()                                   # commitment: 2(z_e − e)/n, codebook untouched
    torch.testing.assert_close(z_e.grad, 2 * (z_e - q.z_q).detach() / 8)


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny("vq", num_codes=16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    F.l1_loss(model(x).sample, x).backward()   # reconstruction only: the only path to the encoder is straight-through
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantizer.codebook.grad is None      # the codebook is a buffer, updated by EMA


def test_ema_codebook_update_follows_the_formula():
    vq = _quantizer(decay=0.5, dead_code_steps=0).train()
    z = torch.tensor([[0.2, 0.0], [0.8, 0.2], [1.0, 0.2]]).T.reshape(1, 2, 1, 3)
    vq(z)                                                 # codes 0, 1, 1
    n = torch.tensor([0.5 + 0.5, 0.5 + 1.0, 0.5, 0.5])    # N_k = γN_k + (1−γ)n_k
    m1 = 0.5 * torch.tensor([1., 0.]) + 0.5 * torch.tensor([1.8, 0.4])
    torch.testing.assert_close(vq.cluster_size, n)
    smoothed = (n[1] + vq.eps) / (n.sum() + 4 * vq.eps) * n.sum()
    torch.testing.assert_close(vq.codebook[1], m1 / smoothed)


def test_dead_code_restart_reinitialises_unused_codes_from_encoder_outputs():
    vq = _quantizer(decay=0.9, dead_code_steps=3).train()
    batch = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.1], [0.05, 0.05]]).T.reshape(1, 2, 2, 2)
    rows = batch.flatten(2)[0].T
    torch.manual_seed(0)
    assert [vq(batch).restarted for _ in range(3)] == [0, 0, 1]   # code 3 unused for 3 batches
    assert any(torch.allclose(vq.codebook[3], r) for r in rows)
    assert int(vq.num_restarts) == 1 and vq.steps_unused.tolist() == [0, 0, 0, 0]
    off = _quantizer(dead_code_steps=0).train()
    assert [off(batch).restarted for _ in range(5)] == [0] * 5
    torch.testing.assert_close(off.codebook[3], torch.tensor([10., 10.]), atol=1e-3, rtol=0)   # unused: it stays dead
    ev = _quantizer(dead_code_steps=1).eval()                     # never in eval mode
    assert ev(batch).restarted == 0


def test_perplexity():
    assert code_perplexity(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(4.0, rel=1e-5)
    assert code_perplexity(torch.tensor([7, 0, 0, 0])).item() == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------- losses and training
def test_kl_loss_is_reconstruction_plus_beta_kl_per_value():
    model = tiny("kl")
    loss_fn = VAELoss(model.config.replace(kl_weight=1e-2, recon_loss="mse"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(3); loss = loss_fn(model, (x, ["caption", "caption"]))
        torch.manual_seed(3); out = model(x)
    expected = F.mse_loss(out.sample, x) + 1e-2 * out.posterior.kl().mean() / x[0].numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(loss_fn.terms) == {"loss", "reconstruction", "kl"}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_tiny_autoencoder_learns_a_fixed_batch(kind):
    model = tiny(kind, num_codes=16, dead_code_steps=2)
    x = torch.ones(8, 3, 32, 32)
    for i in range(8): x[i, i % 3, 6 + i // 2:26 - i // 2, 10:22] = -1
    loss_fn, opt = VAELoss(model.config), torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        opt.zero_grad(); loss_fn(model, x).backward(); opt.step()
    rec = loss_fn.terms["reconstruction"]
    assert rec[-1] < 0.6 * rec[0]


def test_scale_factor_gives_unit_std_latents():
    model = tiny("kl")
    with torch.no_grad(): model.encoder.conv_out.weight.mul_(5)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    s = estimate_scale_factor(model, x, generator=torch.Generator().manual_seed(0))
    set_scale_factor(model, s)
    z = model.encode_latents(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="positive"): set_scale_factor(model, 0.0)


# ---------------------------------------------------------------- checkpoints and cache
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_save_load_round_trip_keeps_weights_config_and_scale_factor(tmp_path, kind):
    model = tiny(kind, num_codes=16)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model(x)                                          # a training step moves the VQ codebook buffers
    set_scale_factor(model, 0.37)
    model.eval()
    path = save_vae(tmp_path / "vae.safetensors", model, {"psnr": 12.5})
    loaded = load_vae(path)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    assert float(loaded.scale_factor) == pytest.approx(0.37)
    meta = read_checkpoint_metadata(path)
    assert meta["scale_factor"] == pytest.approx(0.37) and meta["psnr"] == 12.5
    with torch.no_grad():
        z = model.encode_latents(x)
        assert torch.equal(loaded.encode_latents(x), z)
        assert torch.equal(loaded.decode_latents(z), model.decode_latents(z))


def test_load_vae_refuses_other_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {"step": 1})
    with pytest.raises(ValueError, match="not an autoencoder checkpoint"): load_vae(tmp_path / "other.safetensors")
    assert vae_checkpoint_path("kl", "cpu").parts[-3:] == ("checkpoints", "07_vae_kl", "vae.safetensors")


def test_latent_cache_round_trip_and_invalidation(tmp_path):
    model = tiny("kl").eval()
    set_scale_factor(model, 0.5)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    cache = tmp_path / "latents.safetensors"
    latents = encode_dataset(model, x, cache, batch_size=2)
    torch.testing.assert_close(latents, model.encode_latents(x))      # scaled by s
    stamp = cache.stat().st_mtime_ns
    assert torch.equal(encode_dataset(model, x, cache), latents) and cache.stat().st_mtime_ns == stamp   # cache hit
    assert read_checkpoint_metadata(cache)["scale_factor"] == 0.5
    other = encode_dataset(model, x.flip(0), cache)                   # other images: recomputed
    torch.testing.assert_close(other, latents.flip(0))
    set_scale_factor(model, 1.0)                                       # other VAE state: recomputed
    torch.testing.assert_close(encode_dataset(model, x.flip(0), cache), 2 * latents.flip(0))
    items = [(img, "caption") for img in x]                            # a Dataset of (image, caption)
    with pytest.raises(ValueError, match="data_key"): encode_dataset(model, items, tmp_path / "ds.safetensors")
    torch.testing.assert_close(encode_dataset(model, items, tmp_path / "ds.safetensors", data_key="five"), 2 * latents)
    sampled = encode_dataset(model, x, tmp_path / "s.safetensors", sample=True, seed=1)
    assert not torch.equal(sampled, 2 * latents)


def test_reconstruct_psnr_and_interpolation():
    model = tiny("kl").eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert psnr(x, x).min().item() == pytest.approx(100.0)
    assert psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.2)).item() == pytest.approx(20.0, abs=1e-4)
    green, navy = torch.ones(1, 3, 8, 8), torch.ones(1, 3, 8, 8)          # on a white background
    green[:, :, 2:6, 2:6] = (torch.tensor([38., 142., 68.]) / 127.5 - 1).view(1, 3, 1, 1)
    navy[:, :, 2:6, 2:6] = (torch.tensor([30., 40., 88.]) / 127.5 - 1).view(1, 3, 1, 1)
    assert colour_error(navy, green).item() == pytest.approx((8 ** 2 + 102 ** 2 + 20 ** 2) ** 0.5 / 255, abs=1e-4)
    assert colour_error(green, green).item() == pytest.approx(0.0, abs=1e-6)
    rec = reconstruct(model, x, batch_size=3)
    assert rec.shape == x.shape and rec.abs().max() <= 1
    path = interpolate(model, x[0], x[1], num_steps=4)
    assert path.shape == (4, 3, 32, 32)
    torch.testing.assert_close(path[0], rec[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(path[-1], rec[1], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- colour shortcut and colour fidelity
def test_colour_shortcut_carries_the_patch_mean_colour_through_both_halves():
    cfg = VAEConfig(**TINY, colour_shortcut=True)
    model = build_vae(cfg).eval()
    with torch.no_grad():
        for conv in (model.encoder.conv_out, model.decoder.conv_out): conv.weight.zero_(); conv.bias.zero_()
        for conv, eye in ((model.encoder.shortcut, (slice(0, 3), slice(None))), (model.decoder.shortcut, (slice(None), slice(0, 3)))):
            conv.weight.zero_(); conv.bias.zero_(); conv.weight[eye[0], eye[1], 0, 0] = torch.eye(3)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        patch_means = F.avg_pool2d(x, cfg.downsample_factor)
        torch.testing.assert_close(model.encode(x).mean[:, :3], patch_means)
        torch.testing.assert_close(model.decode_latents(model.encode_latents(x)), F.interpolate(patch_means, scale_factor=4))
    assert build_vae(VAEConfig(**TINY)).encoder.shortcut is None          # default off: older checkpoints still load
    for profile in ("smoke", "cpu", "gpu"): assert vae_config("kl", profile).colour_shortcut


def test_colour_shortcut_round_trips_through_a_checkpoint(tmp_path):
    model = tiny("kl", colour_shortcut=True).eval()
    loaded = load_vae(save_vae(tmp_path / "vae.safetensors", model))
    assert loaded.config.colour_shortcut and loaded.decoder.shortcut is not None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad(): assert torch.equal(loaded.decode_latents(loaded.encode_latents(x)), model.decode_latents(model.encode_latents(x)))


def _garments_on_white(names=tuple(GARMENT_COLOURS), size=16):
    "One square garment per named palette colour, with a dark seam and a white stripe, on a white background."
    palette = torch.tensor([GARMENT_COLOURS[n] for n in names], dtype=torch.float32) / 255
    x = torch.ones(len(palette), 3, size, size)
    x[:, :, 3:13, 3:13] = (palette * 2 - 1).view(-1, 3, 1, 1)
    x[:, :, 3, 3:13] = -0.9                                                # a dark seam
    x[:, :, 7, 3:13] = 1.0                                                 # a white stripe
    return x, list(names)

CHROMATIC = [n for n in GARMENT_COLOURS if n not in ("White", "Black", "Grey")]


def test_dominant_colour_is_the_palette_colour_of_the_cloth():
    names = [n for n in GARMENT_COLOURS if n != "White"]                 # white cloth on white is background
    x, _ = _garments_on_white(names)
    assert dominant_colour(x, garment_mask(x)).tolist() == [list(GARMENT_COLOURS).index(n) for n in names]
    assert garment_mask(x)[0, 0, 0].item() is False and garment_mask(x)[0, 5, 5].item() is True
    with pytest.raises(ValueError, match="RGB"): dominant_colour(x[:, :1], garment_mask(x))


def test_colour_preserved_scores_identity_100_and_colour_swaps_low():
    x, names = _garments_on_white(CHROMATIC)
    mask = garment_mask(x).unsqueeze(1)
    assert colour_preserved(x, x).all()
    swapped = torch.where(mask, x[:, [1, 2, 0]], x)                       # R -> G -> B -> R: green becomes blue...
    greyed = torch.where(mask, x.mean(1, keepdim=True).expand_as(x), x)   # colours washed out
    mid_grey = x.clone(); mid_grey[:, :, 4:7, 3:13] = mid_grey[:, :, 8:13, 3:13] = 0.0   # every cloth turned mid-grey
    for decoded in (swapped, greyed, mid_grey):
        assert colour_preserved(decoded, x).float().mean() <= 0.25
    slightly_off = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert colour_preserved(slightly_off, x).all()                        # small errors keep the colour


def test_colour_fidelity_table_per_label():
    x, names = _garments_on_white(CHROMATIC)
    mask = garment_mask(x).unsqueeze(1)
    decoded = x.clone()
    green = names.index("Green")
    decoded[green] = torch.where(mask[green], torch.tensor([30., 40., 88.]).view(3, 1, 1) / 127.5 - 1, x[green])  # green -> navy
    table = colour_fidelity(decoded, x, names)
    assert set(table) == set(names) | {"all"} and table["all"]["images"] == len(names)
    assert table["Green"]["colour_preserved"] == 0.0 and table["Green"]["colour_error"] > 0.3
    assert table["Red"]["colour_preserved"] == 1.0 and table["Red"]["colour_error"] == 0.0
    assert table["all"]["colour_preserved"] == pytest.approx((len(names) - 1) / len(names), abs=1e-4)
    with pytest.raises(ValueError, match="labels"): colour_fidelity(x, x, names[:2])


# ---------------------------------------------------------------- the LDM detail recipe
def test_hinge_losses_and_adaptive_weight_in_closed_form():
    assert hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])).item() == pytest.approx(0.75)
    assert hinge_d_loss(torch.tensor([1.0]), torch.tensor([-1.0])).item() == 0.0
    assert hinge_g_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)
    w, h = torch.tensor([1.0, 2.0, 2.0], requires_grad=True), torch.tensor([0.5, -1.0, 3.0])
    y = (w * h).sum()                                                  # a one-layer "decoder": ∇_w y = h
    rec, g = (y - 1.0) ** 2, -3.0 * y
    expected = 2 * abs(y.item() - 1.0) * h.norm() / (3 * h.norm() + 1e-4)
    assert adaptive_weight(rec, g, w).item() == pytest.approx(expected.item(), rel=1e-5)
    assert adaptive_weight(rec, 1e-9 * g, w, max_weight=10.0).item() == 10.0


def test_patch_spectrum_prefers_sharp_shifted_stripes_to_a_blur_where_l1_does_not():
    y = torch.arange(64.0).view(1, 1, 64, 1).expand(2, 3, 64, 64)
    stripes = torch.where(((y / 9.5) % 1) < 0.3, 1.0, -0.6)
    flat = stripes.mean((2, 3), keepdim=True).expand_as(stripes)
    shifted = torch.roll(stripes, 4, dims=2)
    assert patch_spectrum_distance(stripes, stripes).item() == pytest.approx(0.0, abs=1e-6)
    assert patch_spectrum_distance(shifted, stripes) < 0.5 * patch_spectrum_distance(flat, stripes)
    assert (shifted - stripes).abs().mean() > (flat - stripes).abs().mean()      # L1 prefers the flat colour
    assert high_frequency_ratio(flat, stripes).max() < 0.01 and ssim(stripes, stripes).min() > 0.999


def test_random_crops_are_windows_drawn_from_the_global_generator():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10)
    with torch_seeded(1): a = random_crops(x, 4)
    with torch_seeded(1): b = random_crops(x, 4)
    assert torch.equal(a, b) and a.shape == (2, 3, 4, 4)
    for image, crop in zip(x, a):
        t, l = [int(i) for i in (image[0] == crop[0, 0, 0]).nonzero()[0]]
        assert torch.equal(crop, image[:, t:t + 4, l:l + 4])
    with pytest.raises(ValueError, match="crop size"): random_crops(x, 11)


def _gan_config(**kw):
    return VAEConfig(**{**TINY, "image_size": 32, "train_crop_size": 16, "perceptual_loss": "patch_spectrum",
                        "perceptual_weight": 1.0, "disc_weight": 0.5, "disc_channels": 4, "disc_layers": 2, **kw})


def test_one_backward_gives_each_network_only_its_own_objective():
    cfg = _gan_config()
    torch.manual_seed(0)
    model, x = build_vae(cfg), torch.rand(3, 3, 32, 32) * 2 - 1
    with torch_seeded(5): loss = VAELoss(cfg)(model, x)
    loss.backward()
    critic, ae_params = model.discriminator, [p for n, p in model.named_parameters() if not n.startswith("discriminator.")]
    with torch_seeded(5): crops = random_crops(x, 16); out = model(crops)
    nll = (out.sample - crops).abs().mean() + patch_spectrum_distance(out.sample, crops)
    with frozen(critic): g = -critic(out.sample).mean()
    ae_loss = nll + cfg.kl_weight * out.posterior.kl().mean() / crops[0].numel() + 0.5 * adaptive_weight(nll, g, model.last_layer) * g
    d_loss = hinge_d_loss(critic(crops), critic(out.sample.detach()))
    for p, ref in zip(ae_params, torch.autograd.grad(ae_loss, ae_params, retain_graph=True, allow_unused=True)):
        if ref is not None: torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)
    for p, ref in zip(critic.parameters(), torch.autograd.grad(d_loss, list(critic.parameters()))):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in critic.parameters())


def test_detail_terms_switch_on_at_their_start_counted_in_the_model():
    cfg = _gan_config(perceptual_start=1, disc_start=2)
    model, loss_fn, x = build_vae(cfg), VAELoss(cfg), torch.rand(2, 3, 32, 32) * 2 - 1
    seen = []
    for _ in range(3):
        loss_fn(model, x).backward()
        seen.append(sorted(k for k in ("perceptual", "generator", "discriminator") if len(loss_fn.terms[k]) == len(loss_fn.terms["loss"])))
        loss_fn.terms = type(loss_fn.terms)(list)
    assert seen == [[], ["perceptual"], ["discriminator", "generator", "perceptual"]]
    assert int(model.train_batches) == 3
    with torch.no_grad(): loss_fn(model, x)                           # evaluation calls do not count
    assert int(model.train_batches) == 3


HIRES = [("cpu", 16, 256, 128, (4, 16, 16)), ("gpu", 32, 512, 256, (64, 16, 16)), ("gpu", 8, 512, 256, (4, 64, 64))]


@pytest.mark.parametrize("profile,factor,size,crop,latent", HIRES)
def test_one_training_step_of_every_hires_recipe_at_reduced_width(profile, factor, size, crop, latent, one_thread):
    "The real recipe (crops, every term on, the critic) and the real shapes, with 8-channel levels: it runs on a CPU."
    real = vae_config("kl", profile, factor)
    assert (real.image_size, real.train_crop_size, real.latent_shape) == (size, crop, latent)
    levels = len(real.block_out_channels)
    cfg = real.replace(block_out_channels=(8,) * levels, layers_per_block=1, norm_groups=4, disc_channels=4,
                       perceptual_start=0, disc_start=0)
    train_cfg = vae_train_config("kl", profile, batch_size=2, max_steps=1, warmup_steps=0, mixed_precision="no",
                                 num_workers=0, checkpoint_every=0)
    images = ByteImages.from_dataset(torch.rand(2, 3, size, size) * 2 - 1)
    trainer = Trainer(build_vae(cfg), images, VAELoss(cfg), train_cfg, device="cpu")
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    trainer.fit(resume=False)
    terms = trainer.loss_fn.terms
    assert {"reconstruction", "kl", "perceptual", "generator", "discriminator", "adaptive_weight"} <= set(terms)
    after = trainer.unwrapped_model.state_dict()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "discriminator.layers.0.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
    model = trainer.unwrapped_model.eval()
    with torch.no_grad():
        z = model.encode_latents(images[0][0][None])                   # whole images, once trained on crops
        assert z.shape == (1, *latent)
        assert model.decode_latents(z).shape == (1, 3, size, size)


def test_resume_after_interruption_equals_the_uninterrupted_run(tmp_path, one_thread):
    "Across the switch-on of the critic: weights, critic, EMA, optimizer, counter and data order all come back."
    cfg = _gan_config(perceptual_start=2, disc_start=2)
    train_cfg = vae_train_config("kl", "smoke", max_steps=5, batch_size=2, checkpoint_every=0)
    data = ByteImages.from_dataset(torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    def trainer(folder): return Trainer(build_vae(cfg), data, VAELoss(cfg), train_cfg, folder, device="cpu", model_config=cfg)
    full = trainer(tmp_path / "full"); full.fit(resume=False)
    part = trainer(tmp_path / "part"); part.fit(resume=False, until_step=3)
    resumed = trainer(tmp_path / "part"); resumed.fit()                 # a new process would do the same: read the checkpoint
    assert resumed.step == full.step == 5
    for a, b in ((resumed.unwrapped_model, full.unwrapped_model), (resumed.ema_model, full.ema_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "resumed run differs"
    assert int(resumed.unwrapped_model.train_batches) == 5


def test_latent_cache_key_covers_vae_weights_data_and_image_size(tmp_path):
    model = tiny("kl", colour_shortcut=True).eval()
    small = [(torch.rand(3, 32, 32) * 2 - 1, "c") for _ in range(3)]
    large = [(F.interpolate(x[None], scale_factor=2)[0], c) for x, c in small]   # the same items at twice the size
    cache = tmp_path / "latents.safetensors"
    a = encode_dataset(model, small, cache, data_key="catalogue")
    key = read_checkpoint_metadata(cache)["cache_key"]
    assert key["image_shape"] == [3, 32, 32] and key["data"] == "catalogue" and key["vae"]
    b = encode_dataset(model, large, cache, data_key="catalogue")    # same name, other size: recomputed
    assert b.shape[-1] == 2 * a.shape[-1] and read_checkpoint_metadata(cache)["cache_key"]["image_shape"] == [3, 64, 64]
    stamp = cache.stat().st_mtime_ns
    encode_dataset(model, large, cache, data_key="catalogue")
    assert cache.stat().st_mtime_ns == stamp                         # a hit
    with torch.no_grad(): model.decoder.conv_out.bias.add_(0.1)      # other VAE weights: recomputed
    encode_dataset(model, large, cache, data_key="catalogue")
    assert cache.stat().st_mtime_ns != stamp


def test_byte_images_round_trip_and_older_checkpoints_without_the_counter_load(tmp_path):
    x = torch.randint(0, 256, (4, 3, 8, 8)).float() / 127.5 - 1
    stored = ByteImages.from_dataset(x, batch_size=3)
    assert stored.images.dtype == torch.uint8 and torch.equal(torch.stack([stored[i][0] for i in range(4)]), x)
    model = tiny("kl")
    state = {k: v for k, v in model.state_dict().items() if k != "train_batches"}   # as chapter 07 wrote them before
    path = save_checkpoint(tmp_path / "old.safetensors", {"model": state},
                           {"format": "ldm_course.vae/1", "vae_config": model.config.to_dict(), "scale_factor": 1.0})
    assert int(load_vae(path).train_batches) == 0
