"""Behaviour of ldm_course.unet that later chapters depend on (shapes, sizes, conditioning hooks, learning)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_course.unet import (UNet, UNetConfig, UNET_PRESETS, count_parameters, timestep_embedding, unet_preset,
                             CrossAttentionBlock)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- helpers

class TinyCrossAttention(nn.Module):
    "Single-head cross-attention used only to exercise the UNet hook (the real block lives in a later chapter)."
    def __init__(self, channels: int, context_dim: int):
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(channels, channels), nn.Linear(context_dim, 2 * channels), nn.Linear(channels, channels)
        self.calls = 0

    def forward(self, x, context, context_mask=None):
        self.calls += 1
        q = self.q(x.flatten(2).transpose(1, 2))
        k, v = self.kv(context).chunk(2, dim=-1)
        mask = None if context_mask is None else context_mask[:, None, :]
        return x + self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).transpose(1, 2).reshape(x.shape)


def closed_form_count(c: UNetConfig) -> int:
    "Parameters of UNet(c), counted from the architecture's description (no module is built)."
    conv = lambda ci, co, k: ci * co * k * k + co
    lin = lambda ni, no: ni * no + no
    gn = lambda ch: 2 * ch
    E = c.emb_dim
    res = lambda ci, co: gn(ci) + conv(ci, co, 3) + lin(E, 2 * co) + gn(co) + conv(co, co, 3) + (conv(ci, co, 1) if ci != co else 0)
    attn = lambda ch: gn(ch) + lin(ch, 3 * ch) + lin(ch, ch)
    chs = c.block_out_channels
    n = lin(chs[0], E) + lin(E, E) + conv(c.in_channels, chs[0], 3)                  # time MLP, conv_in
    n += (c.num_classes + 1) * E if c.num_classes else 0
    n += lin(c.cond_dim, E) + lin(E, E) if c.cond_dim else 0
    skips, ch = [chs[0]], chs[0]
    for level, co in enumerate(chs):                                                # down
        for _ in range(c.layers_per_block):
            n += res(ch, co) + (attn(co) if level in c.attention_levels else 0); ch = co; skips.append(ch)
        if level < len(chs) - 1: n += conv(ch, ch, 3); skips.append(ch)
    n += 2 * res(ch, ch) + (attn(ch) if c.mid_attention else 0)                     # mid
    for level, co in reversed(list(enumerate(chs))):                                # up
        for _ in range(c.layers_per_block + 1):
            n += res(ch + skips.pop(), co) + (attn(co) if level in c.attention_levels else 0); ch = co
        if level > 0: n += conv(ch, ch, 3)
    return n + gn(ch) + conv(ch, c.out_channels, 3)                                  # norm_out, conv_out


def randomize_(model: nn.Module) -> nn.Module:
    "Give every parameter a random value, so that no zero-initialised branch hides a wiring bug."
    with torch.no_grad():
        for p in model.parameters(): p.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------- time embedding

def test_time_embedding_closed_form():
    t = torch.tensor([0, 1, 7, 500, 999])
    dim, half = 16, 8
    emb = timestep_embedding(t, dim)
    for i, tt in enumerate(t.tolist()):
        for k in range(half):
            ω = 10000 ** (-k / half)
            assert emb[i, k].item() == pytest.approx(math.sin(tt * ω), abs=1e-5)
            assert emb[i, half + k].item() == pytest.approx(math.cos(tt * ω), abs=1e-5)
    assert torch.equal(timestep_embedding(torch.tensor([0]), 6), torch.tensor([[0., 0, 0, 1, 1, 1]]))
    # real-valued timesteps are allowed (continuous-time schedulers)
    assert torch.allclose(timestep_embedding(torch.tensor([2.5]), 4)[0, 0], torch.tensor(math.sin(2.5)))
    with pytest.raises(ValueError, match="even dim"): timestep_embedding(t, 5)


# ---------------------------------------------------------------- shapes and sizes

@pytest.mark.parametrize("name,shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32)), ("latent", (4, 16, 16))])
@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_output_shapes(name, shape, profile):
    model = UNet(unet_preset(name, profile)).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad(): out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(28, 28), (30, 22), (17, 9), (1, 1)])
def test_odd_sizes_with_four_levels(hw):
    model = UNet(UNetConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, attention_levels=(3,),
                            attention_head_dim=8)).eval()
    with torch.no_grad(): assert model(torch.randn(2, 1, *hw), 5).shape == (2, 1, *hw)


@pytest.mark.parametrize("config", [
    UNetConfig(),
    UNetConfig(3, 3, (32, 64, 128), attention_levels=(2,)),
    UNetConfig(4, 4, (64, 128, 128), attention_levels=(1, 2), num_classes=10, cond_dim=384),
    UNetConfig(2, 5, (16, 32, 32, 48), layers_per_block=1, attention_levels=(0, 3), mid_attention=False,
               attention_head_dim=16, time_embed_dim=40),
])
def test_parameter_count_closed_form(config):
    assert count_parameters(UNet(config)) == closed_form_count(config)


def test_parameter_counts_are_stable():
    # pinned numbers of the networks chapters 05, 06 and 09 train on the cpu profile (tests/test_chapter_configs.py checks
    # that they are): a change here changes every checkpoint of the course
    assert {name: count_parameters(UNet(unet_preset(name, "cpu"))) for name in UNET_PRESETS} == \
        {"mnist": 1_124_161, "cifar10": 1_175_619, "latent": 1_125_892}


# ---------------------------------------------------------------- the same function as diffusers' UNet2DModel

def diffusers_twin(c: UNetConfig):
    "A diffusers UNet2DModel with the architecture of UNet(c) (attention on the same levels, FiLM scale-shift)."
    diffusers = pytest.importorskip("diffusers")
    n = c.num_levels
    return diffusers.UNet2DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups, attn_norm_num_groups=c.norm_num_groups,
        norm_eps=c.norm_eps, attention_head_dim=c.attention_head_dim, add_attention=c.mid_attention,
        resnet_time_scale_shift="scale_shift", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("AttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(range(n))))


def load_from_diffusers(ours: UNet, theirs) -> None:
    "Copy the weights of a diffusers twin into our UNet (names differ, tensors are the same up to qkv fusion)."
    sd = theirs.state_dict()
    half = ours.config.block_out_channels[0] // 2
    res = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "skip": "conv_shortcut"}
    new = {}
    for name in ours.state_dict():
        parts = name.split(".")
        leaf = parts[-1]
        if parts[0] == "embedding":  # embedding.time_mlp.{0,2}
            src = f"time_embedding.linear_{1 if parts[2] == '0' else 2}.{leaf}"
            w = sd[src]
            if parts[2] == "0" and leaf == "weight": w = torch.cat([w[:, half:], w[:, :half]], dim=1)  # [cos|sin] -> [sin|cos]
            new[name] = w; continue
        if parts[0] in ("conv_in", "conv_out"): new[name] = sd[name]; continue
        if parts[0] == "norm_out": new[name] = sd[f"conv_norm_out.{leaf}"]; continue
        if parts[0] in ("down", "up"):
            block = f"{parts[0]}_blocks.{parts[1]}"
            if parts[2] == "resample":
                new[name] = sd[f"{block}.{'downsamplers' if parts[0] == 'down' else 'upsamplers'}.0.conv.{leaf}"]; continue
            j, kind, sub = parts[3], parts[4], parts[5]
        elif parts[0] == "mid":
            block, j, kind, sub = "mid_block", "0", parts[1], parts[2]
        elif parts[0] == "mid_res":
            block, j, kind, sub = "mid_block", "1", "res", parts[1]
        if kind == "res":
            new[name] = sd[f"{block}.resnets.{j}.{res[sub]}.{leaf}"]
        elif kind == "attn":
            a = f"{block}.attentions.{j}"
            if sub == "norm": new[name] = sd[f"{a}.group_norm.{leaf}"]
            elif sub == "qkv": new[name] = torch.cat([sd[f"{a}.to_{p}.{leaf}"] for p in "qkv"])
            elif sub == "proj_out": new[name] = sd[f"{a}.to_out.0.{leaf}"]
        assert name in new, f"no diffusers tensor for {name}"
    ours.load_state_dict(new)


@pytest.mark.parametrize("config,hw", [
    (UNetConfig(1, 1, (32, 64, 64), attention_levels=(2,)), (28, 28)),
    (UNetConfig(3, 3, (16, 32, 32), layers_per_block=1, attention_levels=(1, 2), attention_head_dim=16), (16, 16)),
])
def test_same_function_as_diffusers_unet2d(config, hw):
    theirs = diffusers_twin(config).eval()
    ours = UNet(config).eval()
    assert count_parameters(ours) == count_parameters(theirs)
    randomize_(theirs)
    load_from_diffusers(ours, theirs)
    x, t = torch.randn(2, config.in_channels, *hw), torch.tensor([3, 870])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- learning

def test_tiny_unet_overfits_one_batch():
    x0 = torch.rand(8, 1, 16, 16).round() * 2 - 1
    ε, t = torch.randn_like(x0), torch.randint(0, 1000, (8,))
    ᾱ = torch.cos(t / 1000 * math.pi / 2)[:, None, None, None] ** 2
    x_t = ᾱ.sqrt() * x0 + (1 - ᾱ).sqrt() * ε
    model = UNet(UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x_t, t), ε)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, losses[::10]


def test_every_parameter_gets_a_gradient():
    config = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(0, 1), attention_head_dim=8,
                        num_classes=3, cond_dim=5, cross_attention_levels=(0, 1), context_dim=6)
    model = randomize_(UNet(config, cross_attention_block=TinyCrossAttention))
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), class_labels=torch.tensor([0, 2]),
                cond=torch.randn(2, 5), context=torch.randn(2, 4, 6))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], missing


# ---------------------------------------------------------------- additive conditioning

def small(**kw) -> UNetConfig:
    return UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=8, **kw)


def test_class_conditioning_and_null_label():
    model = randomize_(UNet(small(num_classes=10))).eval()
    x, t = torch.randn(3, 1, 12, 12), torch.tensor([5, 50, 500])
    with torch.no_grad():
        uncond = model(x, t)
        assert torch.equal(model(x, t, class_labels=torch.full((3,), 10)), uncond)     # ∅ is the unconditional path
        a, b = model(x, t, class_labels=torch.tensor([0, 1, 2])), model(x, t, class_labels=torch.tensor([3, 1, 2]))
        assert not torch.allclose(a[0], b[0], atol=1e-4) and torch.equal(a[1:], b[1:])  # per-sample labels
        assert not torch.allclose(a, uncond, atol=1e-4)
    with pytest.raises(ValueError, match=r"in \[0, 10\]"): model(x, t, class_labels=torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="integers"): model(x, t, class_labels=torch.zeros(3))
    with pytest.raises(ValueError, match="num_classes is None"): UNet(small())(x, t, class_labels=torch.tensor([0, 1, 2]))


def test_cond_vector_changes_output():
    model = randomize_(UNet(small(cond_dim=7))).eval()
    x, t = torch.randn(2, 1, 12, 12), torch.tensor([5, 500])
    c = torch.randn(2, 7)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond=torch.zeros(2, 7)), model(x, t))            # None means the zero vector
        assert not torch.allclose(model(x, t, cond=c), model(x, t, cond=c + 1), atol=1e-4)
        assert torch.equal(model(x, t, cond=c), model(x, t, cond=c.clone()))
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 7\)"): model(x, t, cond=torch.randn(2, 6))
    with pytest.raises(ValueError, match="cond_dim is None"): UNet(small())(x, t, cond=c)


# ---------------------------------------------------------------- cross-attention hook

def test_cross_attention_hook():
    config = small(cross_attention_levels=(1,), context_dim=12)
    model = randomize_(UNet(config, cross_attention_block=TinyCrossAttention)).eval()
    blocks = [m for m in model.modules() if isinstance(m, TinyCrossAttention)]
    # level 1 is the lowest of 2 levels: 1 layer down, the mid layer, 2 layers up
    assert len(blocks) == 4 and all(isinstance(b, CrossAttentionBlock) for b in blocks)
    x, t = torch.randn(2, 1, 12, 12), torch.tensor([5, 500])
    ctx = torch.randn(2, 3, 12)
    with torch.no_grad():
        out = model(x, t, context=ctx)
        assert all(b.calls == 1 for b in blocks)
        assert not torch.allclose(out, model(x, t, context=torch.randn(2, 3, 12)), atol=1e-4)
        assert not torch.allclose(out, model(x, t), atol=1e-4)                          # None: blocks skipped
        assert all(b.calls == 2 for b in blocks)
        mask = torch.tensor([[True, True, False], [True, True, True]])
        padded = ctx.clone(); padded[0, 2] = 100.0
        torch.testing.assert_close(model(x, t, context=padded, context_mask=mask), model(x, t, context=ctx, context_mask=mask))
    with pytest.raises(ValueError, match=r"context must have shape \(2, L, 12\)"): model(x, t, context=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="context_mask must be bool"): model(x, t, context=ctx, context_mask=mask.float())
    with pytest.raises(ValueError, match="needs a cross_attention_block factory"): UNet(config)


def test_context_ignored_without_cross_attention_levels():
    model = randomize_(UNet(small(), cross_attention_block=TinyCrossAttention)).eval()
    assert not any(isinstance(m, TinyCrossAttention) for m in model.modules())
    x, t = torch.randn(2, 1, 12, 12), torch.tensor([5, 500])
    with torch.no_grad():
        assert torch.equal(model(x, t, context=torch.randn(2, 3, 12)), model(x, t))


def test_cross_attention_block_must_keep_shape():
    class Bad(nn.Module):
        def __init__(self, channels, context_dim): super().__init__()
        def forward(self, x, context, context_mask): return x[:, :1]
    model = UNet(small(cross_attention_levels=(0,), context_dim=4), cross_attention_block=Bad)
    with pytest.raises(RuntimeError, match="returned shape"): model(torch.randn(1, 1, 8, 8), 1, context=torch.randn(1, 2, 4))


# ---------------------------------------------------------------- memory format, config, errors

def test_channels_last_matches_contiguous():
    config = UNetConfig(3, 3, (16, 32), layers_per_block=1, attention_levels=(0, 1), attention_head_dim=16,
                        num_classes=4, cross_attention_levels=(1,), context_dim=8)
    model = randomize_(UNet(config, cross_attention_block=TinyCrossAttention)).eval()
    x, t, y, ctx = torch.randn(2, 3, 20, 14), torch.tensor([1, 600]), torch.tensor([0, 3]), torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = model(x, t, class_labels=y, context=ctx)
        model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t, class_labels=y, context=ctx)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_config_json_round_trip_and_validation(tmp_path):
    config = UNetConfig(4, 4, (64, 128, 128), attention_levels=(1, 2), num_classes=10, cross_attention_levels=(2,),
                        context_dim=512)
    path = config.save_json(tmp_path / "unet.json")
    assert UNetConfig.load_json(path) == config
    assert "block_out_channels" in repr(config)
    with pytest.raises(ValueError, match="does not divide"): UNetConfig(block_out_channels=(32, 36))
    with pytest.raises(ValueError, match="outside 0..2"): UNetConfig(attention_levels=(3,))
    with pytest.raises(ValueError, match="needs context_dim"): UNetConfig(cross_attention_levels=(0,))
    with pytest.raises(ValueError, match="positive int"): UNetConfig(layers_per_block=0)
    with pytest.raises(ValueError, match="expected one of"): unet_preset("imagenet")


def test_bad_inputs_raise_clear_errors():
    model = UNet(small())
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"): model(torch.randn(2, 3, 8, 8), 1)
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or have shape \(2,\)"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------- the sizes the chapters train (issue 15.1)
# "Where is the size of chapter N's model for profile P?": `pipeline.chapter_configs(N, P)`, which calls chapter N's
# own config function. These pins are the networks the checkpoints of a cpu run hold (a change here changes every cpu
# checkpoint of that chapter); tests/test_end_to_end.py checks that a run trains exactly these configs.
CHAPTER_SIZES_CPU = {"05_ddpm_mnist": 1_125_569, "06_ddpm_cifar10": 1_177_027, "07_vae": 771_842,
                     "09_ldm_additive": 1_191_684, "10_cross_attention": 2_052_804}
CHAPTER_FUNCTIONS = {"05_ddpm_mnist": "ddpm_config(", "06_ddpm_cifar10": "ddpm_training_config(", "07_vae": "vae_chapter_configs(",
                     "09_ldm_additive": "ldm_chapter_configs(", "10_cross_attention": "cross_attention_chapter_configs("}


def _chapter_parameters(chapter: str, profile: str) -> int:
    from ldm_course.ldm import build_ldm_unet
    from ldm_course.pipeline import chapter_configs
    from ldm_course.vae import build_vae
    configs = chapter_configs(chapter, profile)
    if chapter == "07_vae":   # the autoencoder that chapter 09 loads (its critic is dropped after training)
        model = build_vae(configs["autoencoder"])
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("discriminator"))
    experiment = configs["experiment"]
    return count_parameters(UNet(experiment.unet) if chapter.startswith("0") else build_ldm_unet(experiment))


def test_the_chapters_cpu_models_have_the_pinned_sizes():
    assert {c: _chapter_parameters(c, "cpu") for c in CHAPTER_SIZES_CPU} == CHAPTER_SIZES_CPU


@pytest.mark.parametrize("chapter,builder", list(CHAPTER_FUNCTIONS.items()))
def test_each_chapter_builds_its_sizes_with_its_config_function(chapter, builder):
    "The notebook builds its sizes with the function `chapter_configs` calls (the end-to-end test checks the values)."
    import nbformat
    from pathlib import Path
    nb = nbformat.read(str(Path(__file__).resolve().parents[1] / "nbs" / f"{chapter}.ipynb"), as_version=4)
    run_cells = [c.source for c in nb.cells if c.cell_type == "code" and not c.source.lstrip().startswith("#| export")]
    assert any(builder in s for s in run_cells), f"{chapter} does not call {builder}...) outside its exported cells"
