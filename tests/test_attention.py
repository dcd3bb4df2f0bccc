"""Chapter 10 (cross-attention): the attention against torch.nn.MultiheadAttention, the padding mask, the zero-initialised
identity, gradients, and the SpatialTransformer inside the U-Net and inside a saved pipeline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from ldm_course.attention import Attention, SpatialTransformer, to_multihead_attention
from ldm_course.cross_attention import cross_attention_config, denoising_losses, spatial_transformer_spec, spatial_transformers
from ldm_course.core import make_generator
from ldm_course.ldm import LDMConfig, build_ldm_scheduler, build_ldm_unet, cross_attention_factory
from ldm_course.ldm_pipeline import LatentDiffusionPipeline
from ldm_course.text import load_text_encoder
from ldm_course.vae import build_vae, vae_config

MASK = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])


def _trained_like(block: SpatialTransformer, seed: int = 0) -> SpatialTransformer:
    "Give the zero-initialised output projection (and the norms) random values, as after training."
    g = make_generator(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if not (name.startswith("proj_out") or "norm" in name): continue
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0   # norm scales around 1
            p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g))
    return block


def _mha_reference(block: SpatialTransformer, x, context, mask):
    "SpatialTransformer recomputed from primitives, with nn.MultiheadAttention (copied weights) for both attentions."
    B, C, H, W = x.shape
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    h = torch.einsum("oc,bchw->bhwo", block.proj_in.weight[:, :, 0, 0], h).reshape(B, H * W, C) + block.proj_in.bias
    for blk in block.blocks:
        self_mha, cross_mha = to_multihead_attention(blk.attn1), to_multihead_attention(blk.attn2)
        n = F.layer_norm(h, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        h = h + self_mha(n, n, n, need_weights=False)[0]
        n = F.layer_norm(h, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        kpm = None if mask is None else ~mask
        h = h + cross_mha(n, context, context, key_padding_mask=kpm, need_weights=False)[0]
        n = F.layer_norm(h, (C,), blk.norm3.weight, blk.norm3.bias, blk.norm3.eps)
        geglu, out = blk.ff[0], blk.ff[1]
        value, gate = F.linear(n, geglu.proj.weight, geglu.proj.bias).chunk(2, -1)
        h = h + F.linear(value * F.gelu(gate), out.weight, out.bias)
    h = h.transpose(1, 2).reshape(B, C, H, W)
    return x + F.conv2d(h, block.proj_out.weight, block.proj_out.bias)


@pytest.mark.parametrize("context_dim", [12, None], ids=["cross", "self"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
def test_attention_matches_multihead_attention(context_dim, with_mask):
    torch.manual_seed(0)
    ours = Attention(16, context_dim, heads=4, head_dim=4)
    mha = to_multihead_attention(ours)
    x = torch.randn(2, 5, 16)
    context = torch.randn(2, 7, context_dim) if context_dim else torch.randn(2, 7, 16)
    mask = MASK if with_mask else None
    with torch.no_grad():
        expected = mha(x, context, context, key_padding_mask=None if mask is None else ~mask, need_weights=False)[0]
        torch.testing.assert_close(ours(x, context, mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
def test_spatial_transformer_matches_multihead_attention_reference(with_mask):
    torch.manual_seed(0)
    block = _trained_like(SpatialTransformer(32, context_dim=12, head_dim=8, depth=2, groups=8))
    x, context = torch.randn(2, 32, 4, 3), torch.randn(2, 7, 12)
    mask = MASK if with_mask else None
    with torch.no_grad():
        torch.testing.assert_close(block(x, context, mask), _mha_reference(block, x, context, mask), atol=1e-5, rtol=0)


def test_padding_mask_is_respected():
    torch.manual_seed(0)
    block = _trained_like(SpatialTransformer(32, context_dim=12, head_dim=16))
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 7, 12)
    changed = context.clone()
    changed[0, 4:] = torch.randn(3, 12) * 100        # only padded tokens of sample 0
    with torch.no_grad():
        torch.testing.assert_close(block(x, changed, MASK), block(x, context, MASK), atol=1e-5, rtol=0)
        assert (block(x, changed) - block(x, context)).abs().max() > 1e-3, "without the mask the same change matters"
        real = context.clone(); real[0, 1] += 5.0        # a real token does matter
        assert (block(x, real, MASK)[0] - block(x, context, MASK)[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="at least one real token"):
        block(x, context, torch.zeros(2, 7, dtype=torch.bool))


def test_new_block_is_the_identity_in_the_unet_too():
    torch.manual_seed(0)
    block = SpatialTransformer(32, context_dim=12, head_dim=16)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 7, 12), MASK), x)
    net = build_ldm_unet(cross_attention_config("smoke", context_dim=12)).eval()
    assert sum(isinstance(m, SpatialTransformer) for m in net.modules()) >= 2
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(net(z, t, context=torch.randn(2, 7, 12), context_mask=MASK), net(z, t))


def test_gradient_flows_to_every_weight_and_to_the_text():
    torch.manual_seed(0)
    block = SpatialTransformer(32, context_dim=12, head_dim=16)
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 7, 12, requires_grad=True)
    block(x, context, MASK).pow(2).sum().backward()
    assert block.proj_out.weight.grad.abs().sum() > 0, "the zero-initialised projection learns from the first step"
    _trained_like(block)
    block.zero_grad(); context.grad = None
    block(x, context, MASK).pow(2).sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert context.grad[:, :4].abs().sum() > 0 and context.grad[0, 4:].abs().sum() == 0, "no gradient to padding"


def test_spec_rebuilds_the_block_and_a_saved_pipeline_reloads_it(tmp_path):
    spec = spatial_transformer_spec(head_dim=16, groups=4)
    assert spec["block"] == "spatial_transformer"   # a name of chapter 03's registry, not an importable path
    assert isinstance(cross_attention_factory(spec)(32, 12), SpatialTransformer)
    legacy = {"class": "ldm_course.attention.SpatialTransformer", "kwargs": spec["kwargs"]}   # files saved before the registry
    assert isinstance(cross_attention_factory(legacy)(32, 12), SpatialTransformer)
    encoder = load_text_encoder("minilm", device="cpu", verbose=False)
    cfg = cross_attention_config("smoke", context_dim=encoder.token_dim, num_inference_steps=3)
    assert LDMConfig.from_dict(cfg.to_dict()) == cfg and cfg.unet.cond_dim is None
    torch.manual_seed(0)
    unet = build_ldm_unet(cfg)
    for m in unet.modules():
        if isinstance(m, SpatialTransformer): _trained_like(m)
    pipe = LatentDiffusionPipeline(build_vae(vae_config("kl", "smoke")), unet, encoder, build_ldm_scheduler(cfg), cfg)
    images = pipe(["a red dress", "blue T-Shirt"], seed=2).images
    assert (pipe(["black dress", "blue T-Shirt"], seed=2).images[0] - images[0]).abs().max() > 1e-4, "the text matters"
    again = LatentDiffusionPipeline.load(pipe.save(tmp_path / "ldm.safetensors"), device="cpu", text_encoder=encoder)
    assert sum(isinstance(m, SpatialTransformer) for m in again.unet.modules()) == sum(isinstance(m, SpatialTransformer) for m in unet.modules())
    assert torch.equal(again(["a red dress", "blue T-Shirt"], seed=2).images, images)


@pytest.mark.parametrize("B,C,H,W,L,context_dim,head_dim,depth", [
    (1, 8, 1, 1, 1, 4, 8, 1),     # one position, one token, one head
    (2, 32, 4, 3, 7, 12, 8, 2),   # non-square map, four heads, two blocks
    (3, 64, 8, 8, 77, 512, 32, 1),  # FashionCLIP-sized context
])
def test_spatial_transformer_shapes(B, C, H, W, L, context_dim, head_dim, depth):
    torch.manual_seed(0)
    block = _trained_like(SpatialTransformer(C, context_dim, head_dim=head_dim, depth=depth, groups=min(8, C // 2)))
    assert (block.heads, block.head_dim) == (max(1, C // head_dim), C // max(1, C // head_dim))
    x, context = torch.randn(B, C, H, W), torch.randn(B, L, context_dim)
    mask = torch.ones(B, L, dtype=torch.bool); mask[0, L // 2 + 1:] = False
    with torch.no_grad():
        assert block(x, context, mask).shape == (B, C, H, W)
        assert block(x, context).shape == (B, C, H, W)
        assert block.blocks[0].attn1(torch.randn(B, H * W, C)).shape == (B, H * W, C)


def test_bad_inputs_give_clear_errors():
    block = SpatialTransformer(32, context_dim=12, head_dim=16)
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 7, 12)
    with pytest.raises(ValueError, match=r"context must be \(B=2, L, 12\).*got \(2, 7, 10\)"):
        block(x, torch.randn(2, 7, 10), MASK)                       # tokens of another text encoder
    with pytest.raises(ValueError, match=r"context must be \(B=2, L, 12\).*got \(3, 7, 12\)"):
        block(x, torch.randn(3, 7, 12))                             # batch sizes differ
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 7\).*got \(2, 5\)"):
        block(x, context, MASK[:, :5])
    with pytest.raises(TypeError, match="bool tensor"):
        block(x, context, MASK.float())                             # SDPA would add a float mask to the scores
    with pytest.raises(ValueError, match=r"\(B, 32, H, W\), got \(2, 16, 4, 4\)"):
        block(torch.randn(2, 16, 4, 4), context, MASK)
    with pytest.raises(ValueError, match="query_dim=16"):
        Attention(16, 12, heads=2, head_dim=8)(torch.randn(2, 5, 10), context)
    with pytest.raises(ValueError, match="groups=8 must divide channels=12"):
        SpatialTransformer(12, 4)
    with pytest.raises(ValueError, match="Unknown SpatialTransformer arguments"):
        spatial_transformer_spec(heads=4)


def _trained_like_unet(context_dim: int = 12):
    torch.manual_seed(0)
    net = build_ldm_unet(cross_attention_config("smoke", context_dim=context_dim)).eval()
    for m in spatial_transformers(net): _trained_like(m)
    return net


def test_unet_with_cross_attention_reads_the_context():
    net = _trained_like_unet()
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context, other = torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    with torch.no_grad():
        out = net(z, t, context=context, context_mask=MASK)
        assert out.shape == z.shape
        assert (net(z, t, context=other, context_mask=MASK) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-4, \
            "each sample's output must depend on its context"
        padded = context.clone(); padded[0, 4:] = 50.0
        torch.testing.assert_close(net(z, t, context=padded, context_mask=MASK), out, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="context must"):
            net(z, t, context=torch.randn(2, 7, 10), context_mask=MASK)


def test_cross_attention_config_keeps_chapter_09_budget():
    from ldm_course.ldm import ldm_config
    for profile in ("smoke", "cpu", "gpu"):
        cfg, base = cross_attention_config(profile, context_dim=512), ldm_config(profile)
        assert (cfg.train, cfg.num_inference_steps, cfg.guidance_scale, cfg.held_out_pairs) == \
               (base.train, base.num_inference_steps, base.guidance_scale, base.held_out_pairs)
        assert cfg.conditioning == "cross_attention" and cfg.unet.context_dim == 512 and cfg.unet.cond_dim is None
    both = cross_attention_config("cpu", context_dim=512, cond_dim=256)
    assert both.conditioning == "additive+cross_attention" and both.unet.cond_dim == 256


def test_denoising_losses_measure_what_the_text_brings():
    encoder = load_text_encoder("minilm", device="cpu", verbose=False)
    cfg = cross_attention_config("smoke", context_dim=encoder.token_dim)
    vae = build_vae(vae_config("kl", "smoke"))
    torch.manual_seed(0)
    fresh = LatentDiffusionPipeline(vae, build_ldm_unet(cfg), encoder, build_ldm_scheduler(cfg), cfg)
    latents = torch.randn(6, *vae.config.latent_shape)
    emb = encoder.encode(["a red dress", "blue T-Shirt", "black dress", "a yellow jean", "pink tshirt", "grey trousers"])
    first = denoising_losses(fresh, latents, emb, seed=3, repeats=2, batch_size=4)
    assert first == denoising_losses(fresh, latents, emb, seed=3, repeats=2, batch_size=4), "same seed, same draws"
    assert first == pytest.approx(denoising_losses(fresh, latents, emb, seed=3, repeats=2, batch_size=5), rel=1e-6)
    assert first["num_draws"] == 12 and first["text_gain"] == 0.0, "fresh blocks are the identity: the text brings nothing"
    for m in spatial_transformers(fresh.unet): _trained_like(m)
    trained = denoising_losses(fresh, latents, emb, seed=3, repeats=2)
    assert trained["text_gain"] != 0.0
    assert abs(trained["text_gain"] - (trained["null_prompt"] - trained["with_text"])) < 1e-12
    with pytest.raises(ValueError, match="6 latents but 2 caption embeddings"):
        denoising_losses(fresh, latents, emb[[0, 1]])
