"""Chapter 09 (latent diffusion, additive text conditioning): conditioning, condition dropout, classifier-free guidance,
pipeline save/load and the held-out (type, colour) pairs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ldm_course.core import load_checkpoint, make_generator, runs_dir, save_checkpoint
from ldm_course.data import SEED_PROMPTS
from ldm_course.fashion import load_fashion
from ldm_course.ddpm import diffusion_loss
from ldm_course.ldm import (
    HELD_OUT_PAIRS, CaptionedLatents, fallback_vae_path, load_or_train_vae, LDMConfig, TextDiffusionLoss,
    build_ldm_scheduler, build_ldm_unet, cross_attention_factory, fit_length, held_out_mask, ldm_checkpoint_path,
    ldm_config, pair_prompt, short_captions, split_catalogue, text_condition, text_guidance, trim_padding,
)
from ldm_course.ldm_pipeline import LatentDiffusionPipeline
from ldm_course.scheduler import DDIMSampler, DDPMSampler, DPMSolverMultistepSampler, NoiseScheduler
from ldm_course.text import TextEmbeddings, load_text_encoder
from ldm_course.vae import build_vae, encode_dataset, save_vae, vae_checkpoint_path, vae_config


def _embeddings(B: int, d: int = 8, L: int = 6, real: int = 3, seed: int = 0) -> TextEmbeddings:
    g = make_generator(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :real] = True
    tokens = torch.randn(B, L, d, generator=g) * mask.unsqueeze(-1)
    return TextEmbeddings(torch.randn(B, d, generator=g), tokens, mask)


def _tiny_unet(cond_dim: int = 8):
    torch.manual_seed(0)
    unet = build_ldm_unet(ldm_config("smoke", cond_dim=cond_dim)).eval()
    with torch.no_grad():  # move away from the init so that every path matters
        for p in unet.parameters(): p.add_(0.05 * torch.randn_like(p))
    return unet


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("minilm", device="cpu", verbose=False)


def test_additive_conditioning_changes_the_output_and_null_path_works():
    unet = _tiny_unet()
    z, t = torch.randn(2, 4, 8, 8, generator=make_generator(1)), torch.tensor([400, 400])
    a, b, null = _embeddings(1, seed=1).pooled, _embeddings(1, seed=2).pooled, _embeddings(1, seed=3).pooled
    with torch.no_grad():
        out_a, out_b = unet(z, t, cond=a.expand(2, -1)), unet(z, t, cond=b.expand(2, -1))
        out_null = unet(z, t, cond=null.expand(2, -1))
        # the text vector is projected and added to the time embedding
        e = unet.embedding
        difference = e(t, cond=a.expand(2, -1)) - e(t, cond=b.expand(2, -1))
        torch.testing.assert_close(difference, e.cond_mlp(a.expand(2, -1)) - e.cond_mlp(b.expand(2, -1)), atol=1e-5, rtol=0)
    assert (out_a - out_b).abs().mean() > 1e-4, "a different text vector must change the prediction"
    assert (out_a - out_null).abs().mean() > 1e-4, "the null embedding is a condition like the others"
    assert out_null.shape == z.shape and torch.isfinite(out_null).all()


def test_condition_dropout_uses_the_null_embedding():
    scheduler = NoiseScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet = _tiny_unet()
    null = _embeddings(1, seed=9)
    emb = _embeddings(8, seed=4)
    batch = [torch.randn(8, 4, 16, 16, generator=make_generator(5)), emb.pooled, emb.tokens, emb.mask]
    with torch.no_grad():
        all_dropped = TextDiffusionLoss(scheduler, null, cond_drop_prob=1.0)(unet, batch, make_generator(6))
        none_dropped = TextDiffusionLoss(scheduler, null, cond_drop_prob=0.0)(unet, batch, make_generator(6))
        g = make_generator(6)
        torch.rand(8, generator=g)  # the loss draws its dropout mask first, then t and ε
        ref_null = diffusion_loss(unet, batch[0], scheduler, {"cond": null.pooled.expand(8, -1)}, g)
        g = make_generator(6)
        torch.rand(8, generator=g)
        ref_cond = diffusion_loss(unet, batch[0], scheduler, {"cond": emb.pooled}, g)
    torch.testing.assert_close(all_dropped, ref_null)
    torch.testing.assert_close(none_dropped, ref_cond)
    assert not torch.isclose(all_dropped, none_dropped)
    # tokens and mask are dropped together with the vector (one draw per sample)
    kw = TextDiffusionLoss(scheduler, null, 0.5, use_tokens=True).model_kwargs(batch, make_generator(0))
    dropped = (kw["cond"] == null.pooled).all(1)
    assert 0 < int(dropped.sum()) < 8
    assert torch.equal(kw["context_mask"][dropped], null.mask.expand(int(dropped.sum()), -1))
    assert torch.equal(kw["context"][~dropped], emb.tokens[~dropped])


def test_guidance_one_is_the_conditional_prediction_and_the_formula_holds():
    unet = _tiny_unet()
    emb, null = _embeddings(3, seed=1), _embeddings(1, seed=2, real=2)
    z, t = torch.randn(3, 4, 16, 16, generator=make_generator(3)), torch.full((3,), 650)
    with torch.no_grad():
        cond = unet(z, t, cond=emb.pooled)
        uncond = unet(z, t, cond=null.pooled.expand(3, -1))
        torch.testing.assert_close(text_guidance(unet, emb, null, 1.0)(z, t), cond, atol=1e-6, rtol=0)
        torch.testing.assert_close(text_guidance(unet, emb, null, 0.0)(z, t), uncond, atol=1e-6, rtol=0)
        # w > 1 goes through the batched (uncond, cond) forward
        torch.testing.assert_close(text_guidance(unet, emb, null, 4.0)(z, t), uncond + 4.0 * (cond - uncond), atol=1e-4, rtol=0)


def test_trim_padding_keeps_real_tokens_and_common_length():
    a, b = _embeddings(2, real=3, L=10), _embeddings(1, real=5, L=10)
    ta, tb = trim_padding(a, b)
    assert ta.tokens.shape[1] == tb.tokens.shape[1] == 5
    assert torch.equal(ta.tokens[:, :3], a.tokens[:, :3]) and torch.equal(fit_length(ta, 10).tokens, a.tokens)
    with pytest.raises(ValueError, match="real tokens"): fit_length(b, 4)


def test_pipeline_save_load_gives_identical_images(tmp_path, text_encoder):
    torch.manual_seed(0)
    cfg = ldm_config("smoke", cond_dim=text_encoder.dim, num_inference_steps=4, guidance_scale=3.0)
    unet = build_ldm_unet(cfg)
    with torch.no_grad():
        for p in unet.parameters(): p.add_(0.02 * torch.randn_like(p))
    vae = build_vae(vae_config("kl", "smoke"))
    S = vae.config.image_size
    pipe = LatentDiffusionPipeline(vae, unet, text_encoder, build_ldm_scheduler(cfg), cfg)
    prompts = ["a red dress", "pink tshirt"]
    images = pipe(prompts, seed=7).images
    assert images.shape == (2, 3, S, S) and images.abs().max() <= 1
    path = pipe.save(tmp_path / "ldm.safetensors", {"data_source": {"name": "fashion"}})
    again = LatentDiffusionPipeline.load(path, device="cpu")           # the text encoder is reloaded by name
    assert again.text_encoder.name == "minilm"
    assert again.config == cfg and again.held_out_pairs == HELD_OUT_PAIRS
    assert again.metadata["held_out_pairs"] == [list(p) for p in HELD_OUT_PAIRS]
    assert torch.equal(again(prompts, seed=7).images, images)
    assert not torch.equal(again(prompts, seed=8).images, images)
    out = again(prompts, seed=7, return_trajectory=True, n_snapshots=3)
    assert torch.equal(out.images, images) and out.trajectory.x_t.shape == (3, 2, 3, S, S)
    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a latent diffusion pipeline"):
        LatentDiffusionPipeline.load(tmp_path / "other.safetensors")


def test_held_out_pairs_are_absent_from_the_training_set():
    dataset, _ = load_fashion(source="synthetic", profile="smoke", verbose=False)
    records = dataset.records
    train_idx, held_idx = split_catalogue(records, HELD_OUT_PAIRS)
    pairs = lambda idx: set(zip(records["articleType"].iloc[idx], records["baseColour"].iloc[idx]))
    assert held_idx, "the catalogue must contain the held-out pairs for the test to mean something"
    assert pairs(held_idx) == set(HELD_OUT_PAIRS)
    assert not pairs(train_idx) & set(HELD_OUT_PAIRS)
    assert sorted(train_idx + held_idx) == list(range(len(records)))
    # the types and colours of the held-out pairs are still seen, in other combinations
    seen = pairs(train_idx)
    for article_type, colour in HELD_OUT_PAIRS:
        assert any(a == article_type for a, _ in seen) and any(c == colour for _, c in seen)
    # none of the report's prompts is held out, and the default config records the pairs
    assert not set(HELD_OUT_PAIRS) & set(SEED_PROMPTS.values())
    assert ldm_config("cpu").held_out_pairs == HELD_OUT_PAIRS
    assert [pair_prompt(p) for p in HELD_OUT_PAIRS] == ["a green skirt", "purple jeans"]
    with pytest.raises(ValueError, match="report's prompts"): held_out_mask(["Dresses"], ["Red"], [("Dresses", "Red")])


def test_captioned_latents_share_one_embedding_per_caption():
    emb = _embeddings(2)
    ds = CaptionedLatents(torch.randn(3, 4, 2, 2), torch.tensor([1, 0, 1]), emb)
    latent, pooled, tokens, mask = ds[2]
    assert torch.equal(pooled, emb.pooled[1]) and torch.equal(tokens, emb.tokens[1]) and torch.equal(mask, emb.mask[1])
    assert len(CaptionedLatents(torch.randn(3, 4, 2, 2), torch.tensor([1, 0, 1]), emb, with_tokens=False)[0]) == 2
    with pytest.raises(ValueError, match="caption_ids"): CaptionedLatents(torch.randn(1, 4, 2, 2), torch.tensor([5]), emb)
    # two captions per item (product name, short caption), drawn with the given probabilities
    two = CaptionedLatents(torch.randn(3, 4, 2, 2), torch.tensor([[0, 1]] * 3), emb, caption_probs=(0.75, 0.25))
    torch.manual_seed(0)
    share = sum(torch.equal(two[1][1], emb.pooled[1]) for _ in range(800)) / 800
    assert 0.2 < share < 0.3
    with pytest.raises(ValueError, match="summing to 1"):
        CaptionedLatents(torch.randn(3, 4, 2, 2), torch.tensor([[0, 1]] * 3), emb, caption_probs=(0.5, 0.6))


def test_short_captions_come_from_the_catalogue_columns():
    import pandas as pd
    records = pd.DataFrame({"baseColour": ["Red", None], "articleType": ["Dresses", "Jeans"],
                            "caption": ["Roadster Women Red Dress", "Blue Slim Fit Jeans"]})
    assert short_captions(records) == ["Red Dresses", "Blue Slim Fit Jeans"]


def test_config_round_trip_and_block_spec_is_checked():
    cfg = ldm_config("cpu")
    assert LDMConfig.from_dict(cfg.to_dict()) == cfg and cfg.conditioning == "additive"
    with pytest.raises(ValueError, match="names no registered block"): cross_attention_factory({"class": "os.system", "kwargs": {}})
    with pytest.raises(ValueError, match="unknown cross-attention block 'os.system'"): cross_attention_factory({"block": "os.system"})
    assert cross_attention_factory(None) is None


@pytest.fixture(scope="module")
def tiny_pipeline(text_encoder):
    torch.manual_seed(0)
    cfg = ldm_config("smoke", cond_dim=text_encoder.dim, num_inference_steps=3, guidance_scale=3.0)
    unet = build_ldm_unet(cfg)
    with torch.no_grad():
        for p in unet.parameters(): p.add_(0.02 * torch.randn_like(p))
    return LatentDiffusionPipeline(build_vae(vae_config("kl", "smoke")), unet, text_encoder, build_ldm_scheduler(cfg), cfg)


@pytest.mark.parametrize("eta", [0.0, 1.0])   # deterministic DDIM, and the pipeline's default (stochastic, eta = 1)
def test_pipeline_guidance_one_is_plain_conditional_sampling(tiny_pipeline, eta):
    pipe, prompts = tiny_pipeline, ["a red dress", "black dress"]
    emb = pipe.encode_prompts(prompts)
    cond = text_condition(pipe.unet.config, emb, pipe.config.pooled_scale)
    sampler = DDIMSampler(pipe.scheduler, eta=eta, clip_sample=False, timestep_spacing=pipe.config.timestep_spacing)
    shape = (2, *pipe.latent_shape)
    with torch.no_grad():   # the conditional model alone, no null prompt anywhere; same generator for z_T and the step noise
        z0 = sampler.sample(lambda x, t: pipe.unet(x, t, **cond), shape, make_generator(5), num_inference_steps=3)
        expected = pipe.decode(z0).cpu()
    out = pipe(prompts, guidance_scale=1.0, num_inference_steps=3, seed=5, eta=None if eta == pipe.config.eta else eta)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(pipe(prompts, guidance_scale=3.0, num_inference_steps=3, seed=5, eta=eta).images, expected, atol=1e-4)


CHAPTER_02_SAMPLERS = {   # what each pipeline sampler name must be, built here by hand from chapter 02's classes
    "ddpm": lambda s, spacing: DDPMSampler(s, clip_sample=False, timestep_spacing=spacing),
    "dpm++": lambda s, spacing: DPMSolverMultistepSampler(s, solver_order=2, timestep_spacing=spacing),
    "sde-dpm++": lambda s, spacing: DPMSolverMultistepSampler(s, solver_order=2, algorithm_type="sde-dpmsolver++",
                                                               timestep_spacing=spacing),
}


@pytest.mark.parametrize("name", list(CHAPTER_02_SAMPLERS))
def test_pipeline_samplers_apply_guidance_like_ddim(tiny_pipeline, name):
    # the same guided model_fn as DDIM's, the same generator for z_T and for the step noise
    pipe, prompts = tiny_pipeline, ["a red dress", "black dress"]
    model_fn = text_guidance(pipe.unet, pipe.encode_prompts(prompts), pipe.null_embedding, 3.0, pipe.config.pooled_scale)
    sampler = CHAPTER_02_SAMPLERS[name](pipe.scheduler, pipe.config.timestep_spacing)
    with torch.no_grad():
        z0 = sampler.sample(model_fn, (2, *pipe.latent_shape), make_generator(5), num_inference_steps=5)
    out = pipe(prompts, guidance_scale=3.0, num_inference_steps=5, seed=5, sampler=name)
    torch.testing.assert_close(out.latents, z0.cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.images, pipe.decode(z0).cpu(), atol=1e-5, rtol=0)
    assert not torch.allclose(pipe(prompts, guidance_scale=1.0, num_inference_steps=5, seed=5, sampler=name).images, out.images, atol=1e-4)
    with pytest.raises(ValueError, match="eta is DDIM's"):
        pipe(prompts, num_inference_steps=5, sampler=name, eta=0.0)


def test_pipeline_sampler_is_saved_and_older_files_load_as_ddim(tiny_pipeline, tmp_path):
    pipe, prompts = tiny_pipeline, ["pink tshirt"]
    dpm_pipe = LatentDiffusionPipeline(pipe.vae, pipe.unet, pipe.text_encoder, pipe.scheduler, pipe.config.replace(sampler="dpm++"))
    again = LatentDiffusionPipeline.load(dpm_pipe.save(tmp_path / "dpm.safetensors"), device="cpu", text_encoder=pipe.text_encoder)
    assert again.config.sampler == "dpm++"
    assert torch.equal(again(prompts, seed=2).images, pipe(prompts, seed=2, sampler="dpm++").images)
    # a file written before the field existed: its ldm_config has no "sampler"
    state, meta = load_checkpoint(pipe.save(tmp_path / "ldm.safetensors"))
    del meta["ldm_config"]["sampler"]
    old = LatentDiffusionPipeline.load(save_checkpoint(tmp_path / "old.safetensors", state, meta), device="cpu",
                                       text_encoder=pipe.text_encoder)
    assert old.config.sampler == "ddim" and torch.equal(old(prompts, seed=2).images, pipe(prompts, seed=2).images)
    with pytest.raises(ValueError, match="Unknown sampler 'euler'"):
        pipe.config.replace(sampler="euler")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompts=[]), ValueError, "prompts is empty"),
    (dict(prompts="a red dress"), TypeError, "list of strings"),
    (dict(prompts=["a red dress", 3]), TypeError, r"prompts\[1\]"),
    (dict(num_inference_steps=0), ValueError, "positive int"),
    (dict(num_inference_steps=2.5), ValueError, "positive int"),
    (dict(num_inference_steps=5000), ValueError, "num_train_timesteps"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(return_trajectory=True, n_snapshots=1), ValueError, "n_snapshots"),
    (dict(sampler="euler"), ValueError, r"expected one of \('ddim', 'ddpm', 'dpm\+\+', 'sde-dpm\+\+'\)"),
])
def test_pipeline_rejects_bad_input_with_a_clear_error(tiny_pipeline, kwargs, error, match):
    kwargs = {"prompts": ["a red dress"], **kwargs}
    with pytest.raises(error, match=match): tiny_pipeline(**kwargs)


def test_load_refuses_a_different_text_encoder(tiny_pipeline, tmp_path):
    from types import SimpleNamespace
    path = tiny_pipeline.save(tmp_path / "ldm.safetensors")
    other = SimpleNamespace(name="minilm", fingerprint="sha256-0000", dim=tiny_pipeline.text_encoder.dim)
    with pytest.raises(ValueError, match="not the one the pipeline was trained with"):
        LatentDiffusionPipeline.load(path, device="cpu", text_encoder=other)


def test_checkpoint_path_is_the_documented_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path))
    for profile in ("smoke", "cpu", "gpu"):
        path = ldm_checkpoint_path("09_ldm_additive", profile)
        assert path == tmp_path / profile / "checkpoints" / "09_ldm_additive" / "ldm.safetensors" == \
            runs_dir(profile) / "checkpoints" / "09_ldm_additive" / "ldm.safetensors"
    assert ldm_checkpoint_path("10_cross_attention", "cpu").parent.name == "10_cross_attention"


def test_vae_is_chapter_07s_when_present_else_a_fallback_trained_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path))
    calls = []
    def images_fn(size):
        calls.append(size)
        return torch.rand(32, 3, size, size, generator=make_generator(0)) * 2 - 1
    vae, path, trained = load_or_train_vae(images_fn, "smoke", "cpu", seed=0)
    assert trained and path == fallback_vae_path("smoke") and path.is_file() and calls == [vae.config.image_size]
    assert not any(p.requires_grad for p in vae.parameters()) and float(vae.scale_factor) != 1.0
    assert not vae_checkpoint_path("kl", "smoke").exists(), "the fallback never writes into chapter 07's folder"
    again, path2, trained2 = load_or_train_vae(images_fn, "smoke", "cpu")
    assert (path2, trained2, len(calls)) == (path, False, 1)          # found, not retrained
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), vae.state_dict().values()))
    chapter_07 = save_vae(vae_checkpoint_path("kl", "smoke"), vae, {"chapter": "07_vae"})
    assert load_or_train_vae(images_fn, "smoke", "cpu")[1:] == (chapter_07, False)   # chapter 07's VAE comes first


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_unet_reads_the_latent_channels_of_chapter_07s_preset(profile):
    cfg = ldm_config(profile)
    assert cfg.unet.in_channels == cfg.unet.out_channels == vae_config("kl", profile).latent_channels


def test_cpu_latents_go_from_the_vae_cache_through_the_unet_and_back_to_images(tmp_path, text_encoder):
    "The cpu preset's 4×16×16 latents: cached by encode_dataset, denoised by the profile's U-Net, decoded by the pipeline."
    real = vae_config("kl", "cpu")
    vae = build_vae(real.replace(block_out_channels=(8,) * 5, norm_groups=4, disc_weight=0.0)).eval()   # narrow, same shapes
    images = torch.rand(2, 3, real.image_size, real.image_size, generator=make_generator(0)) * 2 - 1
    latents = encode_dataset(vae, images, tmp_path / "latents.safetensors")
    assert latents.shape == (2, 4, 16, 16) == (2, *real.latent_shape)
    cfg = ldm_config("cpu", cond_dim=text_encoder.dim, num_inference_steps=2)
    unet = build_ldm_unet(cfg)
    loss = diffusion_loss(unet, latents, build_ldm_scheduler(cfg), {"cond": text_encoder.encode(["a red dress"] * 2).pooled})
    assert torch.isfinite(loss)
    pipe = LatentDiffusionPipeline(vae, unet, text_encoder, build_ldm_scheduler(cfg), cfg)
    assert pipe(["a red dress"], seed=0).images.shape == (1, 3, real.image_size, real.image_size)
    other = build_vae(real.replace(latent_channels=8, block_out_channels=(8,) * 5, norm_groups=4, disc_weight=0.0))
    with pytest.raises(ValueError, match="4-channel inputs but the VAE's latents have 8 channels"):
        LatentDiffusionPipeline(other, unet, text_encoder, build_ldm_scheduler(cfg), cfg)
