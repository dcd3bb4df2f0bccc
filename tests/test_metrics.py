"""Tests of ldm_course.metrics (chapter 11): FID/KID through torchmetrics with in-domain features, the three-headed
clothing judge (type, colour, pattern on a full-resolution crop), the reconstruction check, prompt sets and
prompt-alignment accounting with standard errors, and the judge cache. Each test fails if the behaviour it names breaks."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ldm_course.core import make_generator
from ldm_course.ddpm import ClassifierConfig, ImageClassifier
from ldm_course.judge import (
    GarmentJudge, GarmentJudgeConfig, GarmentJudgeLoss, GarmentLogits, cached_judge, garment_accuracy,
    judge_checkpoint_path, judge_inputs, load_judge, predict_garments, random_backdrop, save_judge, train_garment_judge,
)
from ldm_course.metrics import (
    ClassifierFeatures, EvalConfig, catalogue_fingerprint, eval_config, fid_kid, judge_pattern_labels,
    pattern_scales, real_baseline, reconstruction_check, steps_sweep, texture_period,
)
from ldm_course.alignment import (
    PromptSpec, evaluation_prompts, prompt_alignment, prompt_subset, proportion_se, samples_per_prompt, targets_met,
)
from ldm_course.training import TrainConfig


class Identity(nn.Module):
    "Features = the flattened input: (N, d, 1, 1) 'images' of Gaussian vectors."
    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.flatten(1).float()


def gaussians(n: int, d: int = 6, seed: int = 0, shift: float = 0.0):
    return torch.randn(n, d, 1, 1, generator=make_generator(seed)) + shift


# ---------------------------------------------------------------- FID / KID

def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = gaussians(500)
    fids = [fid_kid(x, x + s, Identity(6))["fid"] for s in (0.0, 0.25, 0.5, 1.0)]
    assert abs(fids[0]) < 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    # same covariance: FID = |δ·1|² = d·δ² exactly (up to numerical error)
    assert fids[-1] == pytest.approx(6 * 1.0**2, abs=1e-2)


def test_fid_with_classifier_features_detects_a_shifted_set():
    torch.manual_seed(0)
    feature = ClassifierFeatures(ImageClassifier(ClassifierConfig(in_channels=1, channels=(8, 16), feature_dim=16)))
    x = torch.rand(64, 1, 16, 16, generator=make_generator(1)) * 2 - 1
    same, shifted = fid_kid(x, x, feature), fid_kid(x, (x + 0.8).clamp(-1, 1), feature)
    spread = feature(x).var(0).sum().item()   # a random CNN's features are small: compare with their own spread
    assert abs(same["fid"]) < 1e-6 * shifted["fid"]
    assert shifted["fid"] > 5 * spread


def test_kid_is_unbiased_for_same_distribution_sets_while_fid_is_biased():
    kids, fids = [], []
    for k in range(12):
        s = fid_kid(gaussians(60, seed=2 * k), gaussians(60, seed=2 * k + 1), Identity(6), kid_subsets=10, seed=k)
        kids.append(s["kid"]); fids.append(s["fid"])
    kids = np.array(kids)
    assert abs(kids.mean()) < 3 * kids.std(ddof=1) / np.sqrt(len(kids)) + 1e-4
    assert np.mean(fids) > 0.2   # about (2d + d(d+1)/2) / N = 0.55 for d = 6, N = 60
    shifted = fid_kid(gaussians(60, seed=100), gaussians(60, seed=101, shift=1.0), Identity(6), kid_subsets=10)
    assert shifted["kid"] > 10 * kids.std(ddof=1)


def test_fid_kid_reports_sample_counts_and_real_baseline_uses_disjoint_subsets():
    real = gaussians(40)
    s = fid_kid(real[:10], gaussians(7, seed=3), Identity(6))
    assert (s["num_real"], s["num_fake"], s["kid_subset_size"]) == (10, 7, 3)
    floor = real_baseline(real, 20, Identity(6))
    assert (floor["num_real"], floor["num_fake"]) == (20, 20)
    assert floor["fid"] > 0.1   # two disjoint draws: never the zero of a set against itself
    with pytest.raises(ValueError, match="two disjoint subsets"): real_baseline(real, 21, Identity(6))
    with pytest.raises(ValueError, match="at least 2 images"): fid_kid(real[:1], real, Identity(6))


def test_feature_module_output_is_accepted_by_torchmetrics():
    judge = ImageClassifier(ClassifierConfig(in_channels=1, channels=(4, 8), feature_dim=12))
    feature = ClassifierFeatures(judge, batch_size=5)
    x = torch.rand(11, 1, 28, 28) * 2 - 1
    assert feature(x).shape == (11, 12)
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    fid = FrechetInceptionDistance(feature=feature)   # reads num_features: no 299×299 RGB probe of a 1-channel CNN
    fid.update(x, real=True); fid.update(x.flip(-1), real=False)
    assert fid.real_features_sum.shape == (12,) and int(fid.real_features_num_samples) == 11
    assert torch.isfinite(fid.compute())
    kid = KernelInceptionDistance(feature=feature, subset_size=5, subsets=3)
    kid.update(x, real=True); kid.update(x, real=False)
    assert all(torch.isfinite(v) for v in kid.compute())
    garment = GarmentJudge(GarmentJudgeConfig(("a", "b"), ("c", "d", "e"), image_size=16, channels=(4,), feature_dim=7))
    assert ClassifierFeatures(garment)(torch.zeros(3, 3, 40, 40)).shape == (3, 7)
    with pytest.raises(TypeError, match="features"): ClassifierFeatures(nn.Linear(2, 2), num_features=2)


# ---------------------------------------------------------------- the clothing judge

@pytest.fixture(scope="module")
def catalogue_judge(tmp_path_factory):
    "A three-headed clothing judge trained briefly on a small synthetic catalogue drawn at 128 px, with its held-out photos."
    from ldm_course.fashion import load_fashion
    root = tmp_path_factory.mktemp("data")
    ds, source = load_fashion(root, source="synthetic", size=CATALOGUE_SIZE, image_size=128, profile="smoke", verbose=False)
    types, type_names = ds.labels("articleType")
    colours, colour_names = ds.labels("baseColour")
    patterns, pattern_names = judge_pattern_labels(ds.records, source.source)
    cfg = GarmentJudgeConfig(tuple(type_names), tuple(colour_names), image_size=24, channels=(8, 16, 32),
                             pattern_names=tuple(pattern_names), pattern_crop=0.25, pattern_size=32, pattern_channels=(8, 16))
    inputs = judge_inputs(cfg, ds)   # 32 px crops of 128 px photos: native pixels
    order = torch.randperm(len(ds), generator=make_generator(0))
    test, train = order[:200], order[200:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny CNN: one thread is faster, and much faster on a busy machine
    try: judge, _ = train_garment_judge(inputs.select(train), types[train], colours[train], cfg, JUDGE_RECIPE, pattern_labels=patterns[train], device="cpu")
    finally: torch.set_num_threads(threads)
    images = torch.stack([ds[i][0] for i in test.tolist()])
    return judge, images, types[test], colours[test], patterns[test]


CATALOGUE_SIZE = 1000
# 300 steps: at 200 the pattern accuracy varied from 0.87 to 0.96 between training seeds (measured with seeds 0-2);
# at 300 every seed cleared the thresholds below (pattern 0.925-0.97, each class at least 0.8)
JUDGE_RECIPE = TrainConfig(lr=3e-3, max_steps=300, warmup_steps=10, batch_size=64, ema_decay=0.95)


def test_judge_reaches_high_accuracy_on_the_synthetic_catalogue(catalogue_judge):
    judge, images, types, colours, patterns = catalogue_judge
    acc = garment_accuracy(judge, images, types, colours, patterns)
    assert acc["num_both"] == acc["num_pattern"] == len(images)
    assert acc["colour"] > 0.85, acc
    assert acc["type"] > 0.5, acc   # 10 garment types: chance is 10 % (about 0.8 after this small run)
    assert acc["pattern"] > 0.9, acc   # 3 patterns, 64 % solid: stripes and checks must be seen (about 0.95)
    assert all(v["accuracy"] > 0.75 for v in acc["pattern_by_class"].values()), acc["pattern_by_class"]
    solid = judge.config.pattern_names.index("solid")
    assert acc["num_pattern_non_solid"] == int((patterns != solid).sum()) and acc["pattern_non_solid"] > 0.8   # stripes and checks alone


def test_judge_reads_photos_on_an_uneven_backdrop_as_on_white(catalogue_judge):
    "Trained with random backdrops, the judge gives the same verdicts when every held-out photo gets a stained backdrop."
    judge, images, types, colours, patterns = catalogue_judge
    stained = random_backdrop(images, GarmentJudgeLoss().backdrop, p=1.0, generator=make_generator(7))
    assert (stained - images).abs().amax() > 0.05   # the backdrops did change
    white, uneven = (garment_accuracy(judge, x, types, colours, patterns) for x in (images, stained))
    for head in ("type", "colour", "pattern"):
        assert abs(uneven[head] - white[head]) <= 0.05, (head, white[head], uneven[head])


def test_pattern_needs_the_full_resolution_crop(catalogue_judge):
    "The same photos reduced to the trunk's 24 px and back: the pattern branch loses the stripes, the colour stays."
    judge, images, types, colours, patterns = catalogue_judge
    small = torch.nn.functional.interpolate(images, size=(24, 24), mode="bilinear", antialias=True)
    blurred = torch.nn.functional.interpolate(small, size=images.shape[-2:], mode="bilinear")
    sharp, soft = garment_accuracy(judge, images, types, colours, patterns), garment_accuracy(judge, blurred, types, colours, patterns)
    assert soft["pattern_by_class"]["striped"]["accuracy"] < sharp["pattern_by_class"]["striped"]["accuracy"] - 0.3, (sharp, soft)
    assert soft["colour"] > sharp["colour"] - 0.1


def test_reconstruction_check_of_an_identity_autoencoder_gives_the_judges_own_accuracy(catalogue_judge):
    judge, images, types, colours, patterns = catalogue_judge
    periods = texture_period(judge.prepare(images).crops, judge.config.pattern_crop)
    strata = pattern_scales([judge.config.pattern_names[k] for k in patterns], periods)
    check = reconstruction_check(judge, lambda x: x.clone(), images, types, colours, patterns, strata, batch_size=64)
    assert check["reconstruction"] == check["original"] == garment_accuracy(judge, images, types, colours, patterns)
    assert check["agreement"] == {"type": 1.0, "colour": 1.0, "pattern": 1.0} and check["pattern_lost"] == []
    assert check["psnr"] >= 99 and check["ssim"] == pytest.approx(1.0, abs=1e-4)   # vae.psnr caps a zero error at 100 dB
    assert (check["num_images"], check["image_size"]) == (len(images), 128)
    assert sum(v["num"] for v in check["pattern_by_stratum"].values()) == len(images)
    assert {"solid", "striped fine", "striped wide", "checked fine", "checked wide"} >= set(check["pattern_by_stratum"])
    grey = reconstruction_check(judge, lambda x: torch.zeros_like(x), images, types, colours, patterns)
    assert grey["psnr"] < 15 and grey["agreement"]["colour"] < 0.5 and len(grey["pattern_lost"]) > 0


def test_alignment_accounting_with_catalogue_images_of_the_right_or_wrong_class(catalogue_judge):
    judge, images, types, colours, _ = catalogue_judge
    names_t, names_c = judge.config.type_names, judge.config.colour_names
    pred_t, pred_c, _ = predict_garments(judge, images)
    ok = (pred_t == types) & (pred_c == colours)
    pool = {}
    for i in torch.nonzero(ok).flatten().tolist(): pool.setdefault((names_t[types[i]], names_c[colours[i]]), images[i])
    specs = [PromptSpec(f"{c} {t}", t, c) for t, c in list(pool)[:3]]
    assert len(specs) == 3

    def catalogue_generator(wrong: bool):
        def generate(prompts, seed):
            out = []
            for p in prompts:
                t, c = next((s.article_type, s.colour) for s in specs if s.prompt == p)
                if wrong: t, c = next(k for k in pool if k[0] != t and k[1] != c)
                out.append(pool[(t, c)])
            return torch.stack(out)
        return generate

    right = prompt_alignment(catalogue_generator(False), specs, judge, num_samples=2, batch_size=4)
    wrong = prompt_alignment(catalogue_generator(True), specs, judge, num_samples=2, batch_size=4)
    assert right.summary().loc["overall", ["type", "colour", "both"]].tolist() == [1.0, 1.0, 1.0]
    assert wrong.summary().loc["overall", ["type", "colour", "both"]].tolist() == [0.0, 0.0, 0.0]
    assert int(right.summary().loc["overall", "num_images"]) == 6 and right.per_prompt["num_images"].tolist() == [2, 2, 2]


class OracleJudge(GarmentJudge):
    "Reads the class from the image: type, colour, pattern = round(10 · pixel[k, 0, 0]) for channels k = 0, 1, 2."
    def forward(self, x):
        t, c, p = ((x[:, k, 0, 0] * 10).round().long() for k in range(3))
        eye = lambda names: torch.eye(len(names)) if names else None
        pattern = eye(self.config.pattern_names)
        return GarmentLogits(eye(self.config.type_names)[t], eye(self.config.colour_names)[c], None if pattern is None else pattern[p])


def test_alignment_counts_type_colour_and_both_separately_per_group_with_fixed_seeds():
    judge = OracleJudge(GarmentJudgeConfig(("Dresses", "Jeans"), ("Red", "Blue", "Green"), image_size=8, channels=(4,), feature_dim=4))
    specs = [PromptSpec("a red dress", "Dresses", "Red", "seed"), PromptSpec("green jeans", "Jeans", "Green", "held-out")]
    seeds = []

    def generate(prompts, seed):   # per image k of a call: right type always, right colour on even k
        seeds.append(seed)
        x = torch.zeros(len(prompts), 3, 8, 8)
        for k, p in enumerate(prompts):
            s = next(s for s in specs if s.prompt == p)
            x[k, 0] = judge.config.type_names.index(s.article_type) / 10
            x[k, 1] = (judge.config.colour_names.index(s.colour) if k % 2 == 0 else 1 - (s.colour == "Blue")) / 10
        return x

    res = prompt_alignment(generate, specs, judge, num_samples=4, seed=7, batch_size=4)
    assert seeds == [7, 8]   # one call per batch, seed + batch index
    summary = res.summary()
    assert list(summary.index) == ["seed", "held-out", "overall"]
    assert summary.loc["overall", "type"] == 1.0 and summary.loc["overall", "colour"] == 0.5 and summary.loc["overall", "both"] == 0.5
    assert summary.loc["seed", "num_images"] == 4 and summary.loc["overall", "num_prompts"] == 2
    assert [x.shape for x in res.samples] == [(4, 3, 8, 8)] * 2
    d = res.to_dict()
    assert d["summary"]["held-out"]["both"] == 0.5 and len(d["per_prompt"]) == 2
    assert d["summary"]["overall"]["num_images"] == 8 and isinstance(d["summary"]["overall"]["num_images"], int)
    json.dumps(d)   # what the chapter writes to its metrics file
    with pytest.raises(ValueError, match="unknown to the judge"):
        prompt_alignment(generate, [PromptSpec("x", "Skirts", "Red")], judge)
    with pytest.raises(ValueError, match="expected a \\(B, 3, H, W\\) tensor"):
        prompt_alignment(lambda p, s: torch.zeros(1, 3, 8, 8), specs, judge, num_samples=2)


def test_evaluation_prompts_groups():
    pairs = [("Dresses", "Red"), ("Dresses", "Black"), ("Tshirts", "Blue"), ("Skirts", "Red"), ("Jeans", "Blue"), ("Shirts", "Grey")]
    specs = evaluation_prompts(pairs, held_out=[("Skirts", "Green")], num_catalogue=2, seed=0)
    groups = [s.group for s in specs]
    assert groups.count("held-out") == 1 and groups.count("catalogue") == 2
    assert {s.prompt for s in specs if s.group == "seed"} == {"a red dress", "blue T-Shirt", "black dress"}  # known type and colour only
    assert ("Skirts", "Green") in {(s.article_type, s.colour) for s in specs if s.group == "held-out"}
    assert specs == evaluation_prompts(pairs, held_out=[("Skirts", "Green")], num_catalogue=2, seed=0)   # seeded


def test_pattern_and_everyday_prompts_cover_the_catalogue_and_only_its_combinations():
    from ldm_course.data import GARMENT_COLOURS, GARMENT_TYPES
    from ldm_course.ldm import HELD_OUT_PAIRS
    pairs = [(t, c) for t in GARMENT_TYPES for c in GARMENT_COLOURS]
    triples = [(t, c, p) for t, kind in GARMENT_TYPES.items() for c in GARMENT_COLOURS for p in set(kind.patterns)]
    specs = evaluation_prompts(pairs, HELD_OUT_PAIRS, 16, 0, held_out_wordings=4, catalogue_triples=triples, num_everyday=32)
    groups = pd.Series([s.group for s in specs]).value_counts().to_dict()
    assert groups == {"everyday": 32, "catalogue": 16, "pattern": 16, "held-out": 8, "seed": 5}
    everyday, pattern = [s for s in specs if s.group == "everyday"], [s for s in specs if s.group == "pattern"]
    assert {s.article_type for s in everyday} == set(GARMENT_TYPES) and {s.colour for s in everyday} == set(GARMENT_COLOURS)
    assert all(s.pattern in GARMENT_TYPES[s.article_type].patterns for s in pattern)
    assert sum(s.pattern == "solid" for s in pattern) == 3 and all(s.pattern is None for s in specs if s.group != "pattern")
    assert not {(s.article_type, s.colour) for s in pattern + everyday} & set(HELD_OUT_PAIRS)
    assert len({s.prompt for s in specs}) == len(specs)
    assert {"a green skirt", "a skirt in green"} <= {s.prompt for s in specs if s.group == "held-out"}
    # a catalogue without checked trousers gets no checked-trousers prompt
    fewer = evaluation_prompts(pairs, catalogue_triples=[x for x in triples if x[::2] != ("Trousers", "checked")])
    assert not any(s.article_type == "Trousers" and s.pattern == "checked" for s in fewer)
    assert samples_per_prompt(specs, 64) == {"seed": 13, "held-out": 8, "catalogue": 4, "pattern": 4, "everyday": 2}
    sub = prompt_subset(specs, 8, seed=0)
    assert pd.Series([s.group for s in sub]).value_counts().max() == 8 and sub == prompt_subset(specs, 8, seed=0)


def test_standard_errors_binomial_and_by_prompt():
    p, binomial, clustered = proportion_se([3, 4], [4, 4])
    assert p == 7 / 8 and binomial == pytest.approx(np.sqrt(7 / 8 / 8 / 8))
    assert clustered == pytest.approx(np.sqrt(2 * (0.5 ** 2 + 0.5 ** 2)) / 8)
    _, binomial, clustered = proportion_se([0, 8], [8, 8])   # one prompt always fails, the other never: prompts, not images, vary
    assert clustered > 2 * binomial
    assert np.isnan(proportion_se([3], [4])[2])   # one prompt: no spread to measure


def test_alignment_scores_pattern_with_standard_errors_and_targets():
    judge = OracleJudge(GarmentJudgeConfig(("Dresses", "Shirts"), ("Red", "Blue"), image_size=8, channels=(4,), feature_dim=4,
                                           pattern_names=("checked", "solid", "striped")))
    specs = [PromptSpec("a red striped shirt", "Shirts", "Red", "pattern", "striped"), PromptSpec("a red dress", "Dresses", "Red", "seed")]

    def generate(prompts, seed):   # right type and colour; for the shirt, striped on 3 images of 4
        x = torch.zeros(len(prompts), 3, 8, 8)
        for k, p in enumerate(prompts):
            x[k, 0] = (1 if "shirt" in p else 0) / 10
            x[k, 2] = (2 if k % 4 else 1) / 10
        return x

    res = prompt_alignment(generate, specs, judge, num_samples={"pattern": 4, "seed": 2}, batch_size=16)
    s = res.summary()
    assert res.per_prompt["num_images"].tolist() == [4, 2] and s.loc["pattern", "pattern"] == 0.75
    assert pd.isna(s.loc["seed", "pattern"]) and s.loc["overall", "num_pattern_images"] == 4   # only prompts that ask for a pattern
    assert s.loc["pattern", "pattern_se"] == pytest.approx(np.sqrt(0.75 * 0.25 / 4))
    d = res.to_dict()
    json.dumps(d, allow_nan=False)   # NaN written as null
    assert d["summary"]["seed"]["pattern"] is None and d["per_prompt"][1]["pattern"] is None
    verdict = targets_met(res.summary_dict(), {"pattern": {"pattern": 0.8}, "seed": {"type": 0.9}})
    assert verdict["pattern"]["pattern"]["met"] is False and verdict["seed"]["type"] == {"value": 1.0, "se": 0.0, "num_images": 2, "target": 0.9, "met": True}


def test_pattern_labels_of_real_products_are_unknown_unless_the_name_says_so(tmp_path):
    records = pd.DataFrame({"pattern": ["solid", "solid", "striped", "checked", "solid"],
                            "caption": ["Men Solid Blue Shirt", "Floral Print Dress", "Striped Tee", "Checked Shirt", "Plain Black Top"],
                            "path": [str(tmp_path / f"{i}.jpg") for i in range(5)]})
    real, names = judge_pattern_labels(records, "real")
    assert names == ["checked", "solid", "striped"] and real.tolist() == [1, -1, 2, 0, 1]
    assert judge_pattern_labels(records, "synthetic")[0].tolist() == [1, 1, 2, 0, 1]   # the generator draws every item's pattern
    for i in range(5): (tmp_path / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    first = catalogue_fingerprint(records, [real])
    assert first == catalogue_fingerprint(records, [real.clone()])
    assert first != catalogue_fingerprint(records, [torch.tensor([1, 1, 2, 0, 1])])   # another label
    (tmp_path / "3.jpg").write_bytes(b"changed photo")
    assert first != catalogue_fingerprint(records, [real])   # another image file


def test_judge_checkpoint_round_trip_and_cache_key(tmp_path):
    cfg = GarmentJudgeConfig(("a", "b"), ("c", "d"), image_size=8, channels=(4,), feature_dim=6)
    torch.manual_seed(0)
    judge = GarmentJudge(cfg).eval()
    again, meta = load_judge(save_judge(tmp_path / "j.safetensors", judge, {"note": 1}))
    x = torch.randn(2, 3, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), judge.state_dict().values()))
    # same weights; reloaded in channels_last (the training format), so the sums may be ordered differently
    assert torch.allclose(again(x)[1], judge(x)[1], atol=1e-6) and meta["note"] == 1 and again.config == cfg
    calls = []
    def train():
        calls.append(1)
        return GarmentJudge(cfg), {}
    for key in ({"v": (1, 2)}, {"v": (1, 2)}, {"v": 3}):
        cached_judge(tmp_path / "c.safetensors", key, train)
    assert len(calls) == 2   # tuples compare equal to the lists they become in JSON
    three = GarmentJudge(cfg.replace(pattern_names=("solid", "striped"), pattern_size=8, pattern_channels=(4,))).eval()
    again, _ = load_judge(save_judge(tmp_path / "three.safetensors", three))
    x = torch.randn(2, 3, 32, 32)
    assert again.config == three.config and torch.allclose(again(x).pattern, three(x).pattern, atol=1e-6)
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("pattern_")}   # a file written before the pattern head
    assert GarmentJudgeConfig.from_dict(old).has_pattern is False


# ---------------------------------------------------------------- bad inputs, sweeps and configs

def test_bad_inputs_raise_clear_errors(tmp_path):
    from ldm_course.core import save_checkpoint
    x = gaussians(10)
    with pytest.raises(ValueError, match="kid_subset_size must be in \\[2, 10\\]"): fid_kid(x, x, Identity(6), kid_subset_size=11)
    with pytest.raises(ValueError, match="num_features must be a positive int"): ClassifierFeatures(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2 distinct"): GarmentJudgeConfig(("a", "a"), ("b", "c"))
    with pytest.raises(ValueError, match="image_size must be in"): GarmentJudgeConfig(("a", "b"), ("c", "d"), image_size=4)
    with pytest.raises(ValueError, match="Unknown prompt group 'seen'"): PromptSpec("a red dress", "Dresses", "Red", "seen")
    cfg = GarmentJudgeConfig(("a", "b"), ("c", "d"), image_size=8, channels=(4,), feature_dim=4)
    images = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match="4 images but 3 type"):
        train_garment_judge(images, torch.zeros(3), torch.zeros(4), cfg, JUDGE_RECIPE)
    with pytest.raises(ValueError, match="colour labels must be in \\[-1, 2\\)"):
        train_garment_judge(images, torch.zeros(4), torch.tensor([0, 1, 2, 0]), cfg, JUDGE_RECIPE)
    with pytest.raises(ValueError, match="expected RGB images"): GarmentJudge(cfg).features(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        prompt_alignment(lambda p, s: None, [PromptSpec("x", "a", "c")], GarmentJudge(cfg), num_samples=0)
    with pytest.raises(ValueError, match="prompts is empty"): prompt_alignment(lambda p, s: None, [], GarmentJudge(cfg))
    with pytest.raises(ValueError, match="Unknown pattern 'dotted'"): PromptSpec("a dotted dress", "Dresses", "Red", "pattern", "dotted")
    with pytest.raises(ValueError, match="pattern_labels must be given"):
        train_garment_judge(images, torch.zeros(4), torch.zeros(4), cfg.replace(pattern_names=("solid", "striped")), JUDGE_RECIPE)
    with pytest.raises(ValueError, match="pattern_names must list at least 2"): GarmentJudgeConfig(("a", "b"), ("c", "d"), pattern_names=("solid",))
    other = save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {"format": "something-else"})
    with pytest.raises(ValueError, match="is not a judge file"): load_judge(other)
    with pytest.raises(TypeError, match="ImageClassifier or a GarmentJudge"): save_judge(tmp_path / "j.safetensors", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="plain non-empty name"): judge_checkpoint_path("a/b", "smoke")


def test_steps_sweep_times_each_point_and_checks_the_image_count():
    calls = []
    def sample(sampler, steps, n):
        calls.append((sampler, steps, n))
        return torch.full((n, 1, 2, 2), float(steps)), torch.zeros(n, dtype=torch.long)
    table = steps_sweep(sample, [("ddim", 10, 3), ("ddpm", 1000, 2)], lambda x, y: {"mean": float(x.mean())}, progress_fn=None)
    assert calls == [("ddim", 10, 3), ("ddpm", 1000, 2)]
    assert list(table.columns) == ["sampler", "steps", "num_images", "seconds", "seconds_per_image", "mean"]
    assert table["mean"].tolist() == [10.0, 1000.0] and table["num_images"].tolist() == [3, 2]
    assert (table["seconds_per_image"] * table["num_images"] - table["seconds"]).abs().max() < 1e-12
    with pytest.raises(ValueError, match="returned 1 images, expected 3"):
        steps_sweep(lambda s, t, n: (torch.zeros(1, 1, 2, 2), None), [("ddim", 5, 3)], lambda x, y: {}, progress_fn=None)


def test_eval_config_presets_round_trip_and_scale_with_the_profile():
    configs = {p: eval_config(p) for p in ("smoke", "cpu", "gpu")}
    for c in configs.values(): assert EvalConfig.from_dict(json.loads(c.to_json())) == c
    assert configs["smoke"].num_fid_samples < configs["cpu"].num_fid_samples < configs["gpu"].num_fid_samples
    assert configs["gpu"].steps_curve == (10, 20, 50, 100, 1000)   # the curve the issue asks for
    assert configs["cpu"].judge_image_size == 64                    # 32 px cannot tell jeans from trousers
    assert configs["cpu"].images_per_group >= 64 > configs["smoke"].images_per_group   # issue 16: 64 images resolve 10 points
    assert configs["cpu"].judge_pattern_size == 64 and configs["cpu"].judge_pattern_crop * 256 == 64   # native pixels at 256 px
    assert eval_config("smoke", images_per_group=7).images_per_group == 7
    with pytest.raises(ValueError, match="heldout_fraction"): EvalConfig(heldout_fraction=1.0)
