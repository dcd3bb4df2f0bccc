"""The report (chapter 13): built from a temporary metrics + figures folder, it must be a self-contained French HTML
page and a non-blank PDF that show the measured numbers, say "non mesuré" for the missing ones, and fail clearly."""
import json
import re
import shutil

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from ldm_course.benchmarks import BENCHMARKS
from ldm_course.core import figures_dir, load_metrics, repo_root, runs_dir, save_figure, save_metrics
from ldm_course.diagrams import draw_unet
from ldm_course.report import read_benchmarks
from ldm_course.report_build import FIG1_NAME, FIG3_NAME, ReportBuildError, build_report, draw_report_figures, report_dir
from ldm_course.report_format import format_value, missing

HAS_TEX = shutil.which("latexmk") is not None

DATA_SOURCE = {"name": "mnist", "source": "synthetic", "root": "/data/synthetic/mnist-seed0-n600", "split": "train",
               "num_items": 600, "seed": 0, "skipped": {}, "note": "no network"}
FASHION_SOURCE = {"name": "fashion", "source": "real", "root": "/data/fashion-product-images", "split": "all",
                  "num_items": 44419, "seed": None, "skipped": {"malformed_line": 22, "missing_image": 5}, "note": ""}
MNIST_METRICS = {"data_source": DATA_SOURCE, "unet_parameters": 173921, "device": "cpu", "seed": 7,
                 "config": {"image_size": 28, "unet": {"in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32],
                                                      "layers_per_block": 1, "attention_levels": [1], "num_classes": 10}},
                 "train": {"steps": 30, "loss_first_20": 0.3946, "loss_last_20": 0.1452, "seconds_wall": 196.4},
                 "judge": {"test_accuracy": 0.9731}}
TEXT_METRICS = {"encoder": "minilm", "dim": 384, "catalogue": FASHION_SOURCE}


def _png(name: str, seed: int) -> None:
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.imshow(np.random.default_rng(seed).random((16, 32)), cmap="gray"); ax.set_axis_off()
    save_figure(fig, name, "smoke"); plt.close(fig)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    "A smoke report built from fake metrics (chapters 05, 08) and figures in a temporary folder."
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_COURSE_RUNS", str(tmp / "runs"))
        mp.setenv("LDM_COURSE_FIGURES", str(tmp / "figures"))
        save_metrics("05_ddpm_mnist", MNIST_METRICS, "smoke")
        save_metrics("08_text", TEXT_METRICS, "smoke")
        _png("fig_mnist_evolution.png", 0)
        _png("fig_zz_nouvelle_figure.png", 1)   # unknown to the template: must land in the appendix
        _png("test.png", 2)                     # not a chapter figure (no fig prefix): must be ignored
        files = build_report("smoke")
        yield {"files": files, "tmp": tmp, "html": files.html.read_text(encoding="utf-8"),
               "markdown": files.markdown.read_text(encoding="utf-8"), "figures": figures_dir("smoke"),
               "out": runs_dir("smoke") / "report"}


def _text(html: str) -> str:
    "HTML with typographic apostrophes and non-breaking spaces made plain, for searching."
    return re.sub(r"[ \t\n]+", " ", html.replace("’", "'").replace("&nbsp;", "\u00a0").replace("&#39;", "'"))


def test_smoke_report_goes_to_runs_not_reports(built):
    assert built["files"].html == built["out"] / "rapport.html"
    assert built["out"] == built["tmp"] / "runs" / "smoke" / "report"
    assert report_dir("cpu").name == "reports"                         # the repository's report
    assert report_dir("gpu") == built["tmp"] / "runs" / "gpu" / "report"   # never mixed with cpu's


def test_html_is_self_contained(built):
    html = built["html"]
    images = re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images), [s[:40] for s in images]
    # nothing fetched: no remote script, stylesheet, image or MathJax
    assert not re.search(r'<(script|link|img|iframe)\b[^>]*\b(src|href)="(https?:)?//', html)
    assert "mathjax" not in html.lower() and "<math" in html   # formulas as MathML
    assert '<html xmlns="http://www.w3.org/1999/xhtml" lang="fr"' in html


def test_html_has_the_french_sections(built):
    text = _text(built["html"])
    for title in ("Introduction", "Le modèle de diffusion latente", "Le modèle DDPM", "Le Noise Scheduler",
                  "La chaîne de Markov : U-Net", "Le VAE", "L'embedding de texte", "La cross-attention",
                  "Résultats", "Conclusion", "Conditions d'exécution", "Table des matières"):
        assert re.search(rf"<h[1-4][^>]*>(<span[^>]*>[\d.]+</span> )?{re.escape(title)}", text), title


def test_numbers_come_from_the_metrics(built):
    text = _text(built["html"])
    for value in (0.1452, 0.3946, 173921, 196.4, 0.9731, 44419):
        assert format_value(value) in text, (value, format_value(value))
    assert "0,1452" in text and "173\u00a0921" in text
    assert "la perte moyenne passe de 0,3946 (premiers pas) à 0,1452 (derniers pas) en 30 pas" in text
    assert "all-MiniLM-L6-v2" in text                            # chapter 08's encoder, by its usual name
    assert "données synthétiques (repli hors ligne), 600 éléments, graine 0" in text
    assert "22 lignes mal formées, 5 images absentes" in text     # the Kaggle skip counts


def test_missing_measures_say_which_chapter(built):
    text = _text(built["html"])
    for number in ("06", "07", "09", "10", "11"):
        assert f"non mesuré (chapitre {number})" in text, number
    assert "le chapitre 10 (diffusion latente avec cross-attention) crée le fichier" in text   # figure 4, from the best model
    assert "fig4_evolution_debruitage.png" in text


def test_figures_included_only_when_present(built):
    md = built["markdown"]
    assert "](figures/fig_mnist_evolution.png)" in md                    # figure 2, from chapter 05
    assert "](figures/fig3_unet.png)" in md                              # figure 3, drawn from chapter 05's config
    assert "fig1_architecture_ldm.png" in md and "](figures/fig1_architecture_ldm.png)" not in md  # no latent model yet
    assert "](figures/fig_zz_nouvelle_figure.png)" in md and "Figure A1" in md   # picked up in the appendix
    assert "test.png" not in md
    assert (built["figures"] / "fig3_unet.png").is_file() and not (built["figures"] / "fig1_architecture_ldm.png").exists()
    assert "dessiné depuis la configuration enregistrée par le chapitre 05" in _text(built["html"])


def test_conditions_of_execution(built):
    text = _text(built["html"])
    section = text[text.index("Conditions d'exécution</h1>"):]
    for label in ("profil", "MNIST (entraînement)", "encodeur de texte", "graines", "commit git", "date du rapport",
                  "machine du rapport"):
        assert re.search(rf"<td[^>]*>{re.escape(label)}</td>", section), label
    assert "cœurs CPU" in section and "<code>smoke</code>" in section
    assert re.search(r"<td[^>]*>graines</td> <td[^>]*>7</td>", section)   # chapter 05's seed


@pytest.mark.skipif(not HAS_TEX, reason="latexmk not installed (Debian: texlive-latex-base texlive-latex-recommended "
                                        "texlive-lang-french texlive-fonts-recommended latexmk)")
def test_pdf_pages_are_not_blank(built, pdf_pages_look_filled):
    pdf = built["files"].pdf
    assert pdf is not None
    log = (pdf.parent / "build" / "rapport.log").read_text(encoding="latin-1")
    assert "Overfull \\hbox" not in log, "something sticks out of the text width"
    pdf_pages_look_filled(pdf)


@pytest.mark.skipif(not HAS_TEX, reason="latexmk not installed")
def test_latex_error_names_the_first_error_and_the_log(built, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(built["tmp"] / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(built["tmp"] / "figures"))
    template = tmp_path / "rapport.md"
    template.write_text("---\ntitle: Test\n---\n\n# Introduction\n\n\\nosuchmacro\n", encoding="utf-8")
    with pytest.raises(ReportBuildError, match=r"Undefined control sequence[\s\S]*see the log: .*rapport\.log"):
        build_report("smoke", out_dir=tmp_path / "out", template=template)
    assert not (tmp_path / "out" / "rapport.pdf").exists()    # nothing published on failure


@pytest.mark.skipif(not HAS_TEX, reason="latexmk not installed")
def test_greek_letters_from_metrics_build_the_pdf(built, tmp_path, monkeypatch):
    "Metrics strings may carry Greek letters (a sampler 'DDIM, η = 1', σ, ∅): pdflatex must not stop on them."
    monkeypatch.setenv("LDM_COURSE_RUNS", str(built["tmp"] / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(built["tmp"] / "figures"))
    template = tmp_path / "rapport.md"
    template.write_text("---\ntitle: Test\n---\n\n# Introduction\n\n"
                        "((( md_escape('ddim-50, η = 1 ; α, β, σ, λ, μ, ε, θ, τ, ∅ ; ≤ ≥ ≈ →') )))\n", encoding="utf-8")
    files = build_report("smoke", out_dir=tmp_path / "out", template=template)
    assert files.pdf is not None and files.pdf.stat().st_size > 0


def test_html_only_build_and_unknown_label(built, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(built["tmp"] / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(built["tmp"] / "figures"))
    template = tmp_path / "rapport.md"
    template.write_text("# Résultats\n\nPerte : ((( r.measure('05', 'train.loss_last_20') ))), "
                        "VAE : ((( r.measure('07', 'recon_mse') ))).\n", encoding="utf-8")
    files = build_report("smoke", out_dir=tmp_path / "out", template=template, pdf=False)
    assert files.pdf is None and not (tmp_path / "out" / "rapport.pdf").exists()
    assert "Perte : 0,1452, VAE : non mesuré (chapitre 07)." in _text(files.html.read_text(encoding="utf-8"))
    template.write_text("Voir la ((( r.ref('fig:nulle') ))).\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Unknown figure or table label 'fig:nulle'"):
        build_report("smoke", out_dir=tmp_path / "out", template=template, pdf=False)


def test_missing_pandoc_names_the_package(monkeypatch):
    import pypandoc
    def no_pandoc(): raise OSError("No pandoc was found")
    monkeypatch.setattr(pypandoc, "get_pandoc_path", no_pandoc)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ReportBuildError, match="pypandoc-binary"):
        build_report("smoke")


def test_later_chapters_are_picked_up(tmp_path, monkeypatch):
    "When chapters 07 (VAE) and 10 (cross-attention) have run, figure 1 is drawn from them and their numbers appear."
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(tmp_path / "figures"))
    latent = {"in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128], "layers_per_block": 2,
              "cross_attention_levels": [1], "context_dim": 384, "attention_levels": [1]}
    save_metrics("10_cross_attention", {"config": {"latent_size": 16, "unet": latent}, "num_inference_steps": 50,
                                        "prompts": ["a red dress", "black dress"],
                                        "train": {"loss_first_20": 0.9, "loss_last_20": 0.31, "steps": 400}}, "smoke")
    save_metrics("07_vae", {"latent_shape": [4, 16, 16], "downsample_factor": 4,
                            "kl": {"config": {"kind": "kl", "image_size": 64, "block_out_channels": [32, 64, 64]},
                                   "psnr": 24.25, "parameters": 1234567, "steps": 300, "train_seconds": 61.5},
                            "vq": {"config": {"kind": "vq"}, "psnr": 22.5, "parameters": 1200000, "steps": 300, "train_seconds": 70.0}},
                 "smoke")
    _png("fig4_evolution_debruitage.png", 3)
    drawn = draw_report_figures(load_metrics("smoke"), "smoke")
    assert set(drawn) == {FIG1_NAME, FIG3_NAME} and drawn[FIG1_NAME].chapter == "10"
    files = build_report("smoke", out_dir=tmp_path / "out", pdf=False)
    md, text = files.markdown.read_text(encoding="utf-8"), _text(files.html.read_text(encoding="utf-8"))
    assert "](figures/fig1_architecture_ldm.png)" in md and "](figures/fig4_evolution_debruitage.png)" in md
    assert "dessiné depuis la configuration enregistrée par le chapitre 10" in text
    assert "latents 4×16×16" in text and "24,25 dB" in text and "22,5 dB" in text and "1\u00a0234\u00a0567" in text
    assert "la perte moyenne passe de 0,9 (premiers pas) à 0,31 (derniers pas) en 400 pas" in text
    assert "« a red dress », « black dress »" in text
    assert "La cross-attention n'a pas encore été entraînée" not in text          # chapter 10 ran
    assert "Les deux autoencodeurs du chapitre 07" in text and "(chapitre 07) : ce chapitre n'a pas été exécuté" not in text


def test_unet_diagram_follows_the_configuration():
    UNetConfig = pytest.importorskip("ldm_course.unet", reason="chapter 03 (ldm_course.unet) not exported yet").UNetConfig
    config = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                        attention_levels=(2,), cross_attention_levels=(1, 2), context_dim=384)
    texts = [t.get_text() for t in draw_unet(config, sample_size=7, input_name="z_t").axes[0].texts]
    plt.close("all")
    assert sum(t.startswith("encodeur ") for t in texts) == 3 and sum(t.startswith("décodeur ") for t in texts) == 3
    assert any("64 canaux · 4×4" in t for t in texts)                        # 7 -> 4 -> 2: stride-2 convs round up
    assert any("64 canaux · 2×2" in t and "cross-attention" in t for t in texts)
    assert sum("cross-attention" in t for t in texts) == 5                     # levels 1, 2 twice + middle block
    assert any("jetons de texte (dim. 384)" in t for t in texts)
    assert any("2 × ResBlock" in t for t in texts) and any("3 × ResBlock" in t for t in texts)


def test_format_value_is_french():
    assert format_value(0.042137) == "0,04214"
    assert format_value(1234567) == "1\u00a0234\u00a0567"
    assert format_value(2.5e-5) == "2,5e-5"
    assert format_value(True) == "oui"
    assert missing("11") == "non mesuré (chapitre 11)"


# --- the Results section of the latent chapters (07, 09, 10, 11), from metrics in the shape the chapters write ---

def _summary(colour, type_, images, prompts):
    return {"num_prompts": float(prompts), "num_images": float(images), "type": type_, "colour": colour, "both": colour * type_}


def _alignment(method, w, seed, held):
    return {"method": method, "guidance_scale": w, "seconds": 0.1,
            "summary": {"seed": _summary(*seed, 20, 5), "held-out": _summary(*held, 8, 2), "catalogue": _summary(0.5, 0.5, 12, 3),
                        "overall": _summary(seed[0], seed[1], 40, 10)},
            "per_prompt": [{"prompt": "a red dress", "group": "seed", "num_images": 4, "type": 1.0, "colour": 1.0, "both": 1.0}]}


VAE_07 = {"data_source": FASHION_SOURCE, "num_heldout_images": 500, "latent_shape": [4, 16, 16], "downsample_factor": 4,
          "kl": {"config": {"kind": "kl", "image_size": 64, "block_out_channels": [32, 64, 64]}, "steps": 400, "parameters": 547067,
                 "train_seconds": 275.5, "psnr": 23.21, "psnr_std": 3.2, "colour_error": 0.1077, "colour_preserved": 0.912},
          "vq": {"config": {"kind": "vq"}, "steps": 400, "parameters": 544759, "train_seconds": 355.3, "psnr": 22.87,
                 "psnr_std": 3.0, "colour_error": 0.1163, "colour_preserved": 0.874,
                 "codebook": {"codes_used": 250, "usage": 0.9765625, "perplexity": 170.2, "num_codes": 256}},
          "colour_fidelity_by_base_colour": {
              "kl": {"Green": {"images": 51, "colour_error": 0.222, "colour_preserved": 0.6471},
                     "Red": {"images": 42, "colour_error": 0.187, "colour_preserved": 0.9524},
                     "all": {"images": 500, "colour_error": 0.1077, "colour_preserved": 0.912}},
              "vq": {"Green": {"images": 51, "colour_error": 0.206, "colour_preserved": 0.7059},
                     "Red": {"images": 42, "colour_error": 0.171, "colour_preserved": 0.9286},
                     "all": {"images": 500, "colour_error": 0.1163, "colour_preserved": 0.874}}}}
LATENT_UNET = {"in_channels": 4, "out_channels": 4, "block_out_channels": [64, 128], "layers_per_block": 1,
               "attention_levels": [1], "cond_dim": 384}
LDM_09 = {"data_source": FASHION_SOURCE, "held_out_prompts": ["a green skirt", "purple jeans"], "text_encoder": "minilm",
          "device": "cpu", "latent_size": 16, "unet_config": LATENT_UNET, "unet_parameters": 4600000,
          "train": {"steps": 1500, "seconds_wall": 412.3, "loss_first_20": 0.8123, "loss_last_20": 0.2345, "images_per_s": 58.2},
          "prompts": ["a red dress", "blue T-Shirt", "pink tshirt", "a yellow jean", "black dress"],
          "num_inference_steps": 20, "guidance_scale": 3.0, "sampling": {"fig4_seconds": 4.1, "seconds_per_image": 0.82}}
LDM_10 = {"data_source": FASHION_SOURCE, "held_out_prompts": ["a green skirt", "purple jeans"], "text_encoder": "minilm",
          "latent_size": 16, "unet_config": {**LATENT_UNET, "cond_dim": None, "cross_attention_levels": [1], "context_dim": 384},
          "unet_parameters": 5100000, "cross_attention_parameters": 812345,
          "train": {"steps": 1500, "seconds_wall": 633.1, "loss_first_20": 0.8311, "loss_last_20": 0.2211, "images_per_s": 37.9},
          "sampling": {"num_images": 28, "cross_attention_seconds": 9.5, "additive_seconds": 7.25},
          "denoising_loss": {"additive": {"train_items": {"text_gain_percent": 4.25}, "held_out_items": {"text_gain_percent": 1.5}},
                             "cross_attention": {"train_items": {"text_gain_percent": 6.75}, "held_out_items": {"text_gain_percent": 2.25}}}}
EVAL_11 = {
    "inception": {"available": False, "note": "torch-fidelity is not installed",
                  "features_used": "in-domain judge features (ImageClassifier for MNIST/CIFAR10, GarmentJudge for clothing)"},
    "mnist": {"fid": 44.37, "kid": 7.414, "kid_std": 1.29, "num_real": 200, "num_fake": 200,
              "real_vs_real": {"fid": 17.91, "kid": 3.272, "num_real": 200, "num_fake": 200}},
    "cifar10": None,
    "skipped": {"cifar10": "no model runs/cpu/checkpoints/06_ddpm_cifar10/ddpm_ema.safetensors: run chapter 06 with profile cpu"},
    "stand_ins": {},
    "steps_curve": {"dataset": "mnist", "guidance_scale": 1.0, "fid_floor": {"40": 12.5, "10": 30.25},
                    "rows": [{"sampler": "ddim", "steps": 50, "num_images": 40, "seconds": 44.8, "seconds_per_image": 1.12,
                              "judge_accuracy": 0.7, "fid": 40.5, "kid": 1.0},
                             {"sampler": "ddpm", "steps": 50, "num_images": 40, "seconds": 40.0, "seconds_per_image": 1.0,
                              "judge_accuracy": 0.2, "fid": 95.5, "kid": 9.0},
                             {"sampler": "ddpm", "steps": 1000, "num_images": 10, "seconds": 330.0, "seconds_per_image": 33.0,
                              "judge_accuracy": 1.0, "fid": 35.25, "kid": 0.5}]},
    "alignment": {"num_samples_per_prompt": 4, "sampler": "ddim-20", "chance_both": 1 / 120,
                  "judge_ceiling": {"type": 0.808, "colour": 0.995, "both": 0.804},
                  "results": [_alignment("additif", 1.0, (0.55, 0.35), (0.25, 0.125)), _alignment("additif", 3.0, (0.65, 0.45), (0.375, 0.25)),
                              _alignment("cross-attention", 1.0, (0.75, 0.6), (0.5, 0.375)),
                              _alignment("cross-attention", 3.0, (0.95, 0.85), (0.625, 0.5))]},
    "clothing": {"additive": {"fid": 65.75, "kid": 1.632, "num_real": 100, "num_fake": 100},
                 "cross_attention": {"fid": 48.5, "kid": 0.9125, "num_real": 100, "num_fake": 100},
                 "real_vs_real": {"fid": 6.43, "kid": -0.0444, "num_real": 100, "num_fake": 100}},
    "clip_score_note": "cosinus texte–image non disponible : l'encodeur de texte (minilm) n'a pas de tour image",
}


def _bench_machine(gpu=None):
    return {"date": "2026-11-26T01:49:28+00:00", "cpu_model": "AMD EPYC", "cpu_cores": 2, "torch_threads": 2,
            "load_average_1min": 1.5, "torch": "2.14.1", "python": "3.11.7", "device": "cuda" if gpu else "cpu", "gpu": gpu}


BENCH_FILES = {  # bench/results in the shape bench/*.py write it: a missed, a met, a CPU-only target, no sampling, a broken file
    "unet_cpu.json": {"machine": _bench_machine(), "results": [{"name": "latent", "timings": {
        "ours channels_last": {"images_per_s_median": 54.4}, "diffusers contiguous": {"images_per_s_median": 48.0}}}]},
    "latent_vs_pixel_cuda.json": {"machine": _bench_machine("NVIDIA H200"), "speedup": 7.51, "target_speedup": 4.0, "results": []},
    "flops_cpu.json": {"machine": _bench_machine(), "matmul_peak_gflops": 166.3, "target_fraction": 0.35,
                       "best": {"config_name": "latent", "memory_format": "contiguous", "optimizer": "fused",
                                "attained_gflops": 160.8, "fraction_of_peak": 0.967}},
    "flops_cuda_2threads_compile.json": '{"machine": {"gpu": "NVIDIA H200"',
}


def _write_bench(folder):
    folder.mkdir(parents=True)
    for name, content in BENCH_FILES.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    "A cpu-like report with every latent chapter's metrics (chapter 06 missing, so chapter 11 skipped CIFAR10)."
    tmp = tmp_path_factory.mktemp("latent")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_COURSE_RUNS", str(tmp / "runs"))
        mp.setenv("LDM_COURSE_FIGURES", str(tmp / "figures"))
        for stem, values in (("05_ddpm_mnist", MNIST_METRICS), ("07_vae", VAE_07), ("08_text", TEXT_METRICS),
                             ("09_ldm_additive", LDM_09), ("10_cross_attention", LDM_10), ("11_evaluation", EVAL_11)):
            save_metrics(stem, values, "smoke")
        for i, name in enumerate(("fig4_evolution_debruitage.png", "fig_qualite_vs_pas.png", "fig_additif_vs_cross_attention.png")):
            _png(name, 10 + i)
        with pytest.warns(UserWarning, match=r"Benchmark result skipped: .*flops_cuda_2threads_compile\.json: not a readable JSON"):
            files = build_report("smoke", out_dir=tmp / "out", bench_dir=_write_bench(tmp / "bench"))
        yield {"files": files, "markdown": files.markdown.read_text(encoding="utf-8"),
               "text": _text(files.html.read_text(encoding="utf-8"))}


def _rows(markdown: str, *cells: str) -> bool:
    "Whether the rendered Markdown has a table row with exactly these cells."
    return ("| " + " | ".join(cells) + " |") in markdown


def test_alignment_table_per_method_and_guidance(latent):
    md = latent["markdown"]
    assert _rows(md, "additif (ch.\u00a009)", "1", "rapport d'origine", "20", "55\u00a0%", "35\u00a0%", "19,2\u00a0%")
    assert _rows(md, "additif (ch.\u00a009)", "3", "jamais vus", "8", "37,5\u00a0%", "25\u00a0%", "9,38\u00a0%")
    assert _rows(md, "cross-attention (ch.\u00a010)", "3", "rapport d'origine", "20", "95\u00a0%", "85\u00a0%", "80,8\u00a0%")
    assert "le juge sur de vraies photos : couleur 99,5\u00a0%, type 80,8\u00a0%" in md
    assert "« a green skirt », « purple jeans »" in latent["text"]


def test_fid_table_has_floor_counts_and_features(latent):
    md, text = latent["markdown"], latent["text"]
    assert _rows(md, "MNIST, DDPM", "44,4", "17,9", "7,41", "3,27", "200 / 200")
    assert _rows(md, "vêtements, cross-attention", "48,5", "6,43", "0,912", "\\-0,0444", "100 / 100")
    assert _rows(md, "CIFAR10, DDPM", "—", "—", "—", "—", "—") and "CIFAR10, DDPM : non mesuré (chapitre 06)" in text
    assert "juges du domaine" in text and "pas d'Inception-v3" in text


def test_additive_against_cross_attention(latent):
    md = latent["markdown"]
    assert _rows(md, "durée d'entraînement (s)", "412,3", "633,1")
    assert _rows(md, "perte (début → fin)", "0,8123 → 0,2345", "0,8311 → 0,2211")
    assert _rows(md, "gain du texte, jamais vus", "+1,5\u00a0%", "+2,25\u00a0%")
    assert _rows(md, "meilleure échelle $w$", "3", "3")
    assert _rows(md, "couleur / type, jamais vus", "37,5\u00a0% / 25\u00a0%", "62,5\u00a0% / 50\u00a0%")
    assert _rows(md, "FID des vêtements", "65,8", "48,5")


def test_vae_and_colour_tables(latent):
    md = latent["markdown"]
    assert _rows(md, "PSNR (dB)", "23,2 ± 3,2", "22,9 ± 3")
    assert _rows(md, "couleur dominante conservée", "91,2\u00a0%", "87,4\u00a0%")
    assert _rows(md, "codes du dictionnaire utilisés", "—", "250 / 256 (97,7\u00a0%)")
    assert _rows(md, "Green", "51", "64,7\u00a0%", "70,6\u00a0%", "0,222", "0,206")
    assert _rows(md, "toutes", "500", "91,2\u00a0%", "87,4\u00a0%", "0,108", "0,116")


def test_ddpm_against_ddim_and_conclusion(latent):
    md, text = latent["markdown"], latent["text"]
    assert _rows(md, "1000", "DDPM", "10", "33", "100\u00a0%", "35,2")
    assert "plancher de la FID (vraies contre vraies) 12,5 à $N$ = 40; 30,2 à $N$ = 10" in md
    assert "le DDPM coûte 29 fois le temps par image du DDIM" in text          # 33 s against 1,12 s (DDIM at 50 steps)
    assert "](figures/fig_qualite_vs_pas.png)" in md and "](figures/fig4_evolution_debruitage.png)" in md
    conclusion = text[text.index("Conclusion</h1>"):text.index("Conditions d'exécution</h1>")]
    assert "le juge reconnaît la couleur demandée pour 95\u00a0% des images et le type pour 85\u00a0%" in conclusion
    assert "FID des vêtements 48,5 (plancher 6,43)" in conclusion


@pytest.mark.skipif(not HAS_TEX, reason="latexmk not installed")
def test_latent_results_fit_the_pdf_page(latent, pdf_pages_look_filled):
    pdf = latent["files"].pdf
    assert pdf is not None and pdf.is_file()
    log = (pdf.parent / "build" / "rapport.log").read_text(encoding="latin-1")
    assert "Overfull \\hbox" not in log, "a results table sticks out of the text width"
    pdf_pages_look_filled(pdf, min_pages=1)


def test_results_tables_say_what_is_missing(built):
    "Without chapters 07, 09, 10, 11 (the `built` report has 05 and 08 only) every results table is a 'non mesuré' paragraph."
    text = _text(built["html"])
    for caption, number in (("Fidélité au texte (chapitre 11)", "11"), ("FID et KID (chapitre 11)", "11"),
                            ("Conditionnement additif (chapitre 09) contre cross-attention", "09"),
                            ("Les deux autoencodeurs du chapitre 07", "07"), ("Fidélité des couleurs par couleur du catalogue", "07"),
                            ("Qualité et coût selon le nombre de pas", "11")):
        i = text.index(caption)
        assert f"non mesuré (chapitre {number})" in text[i:i + 600], caption
    assert "Échantillonnage</strong> (chapitre 11) : non mesuré (chapitre 11)" in text


def test_partial_and_older_metrics_do_not_crash(tmp_path, monkeypatch):
    "Older or partial files: chapter 11 without alignment nor clothing, chapter 07 with per-colour errors only, 10 with 0 parameters."
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(tmp_path / "figures"))
    save_metrics("07_vae", {"kl": {"psnr": 12.4}, "vq": {"psnr": 12.8, "codebook": {}},
                            "colour_error_by_base_colour": {"Red": {"images": 5, "kl": 0.4569, "vq": 0.4913}}}, "smoke")
    save_metrics("10_cross_attention", {"unet_parameters": 0, "train": {"steps": 30}}, "smoke")
    save_metrics("11_evaluation", {"mnist": None, "cifar10": None, "steps_curve": None, "alignment": {"results": []},
                                   "methods_table": [], "clothing": {"real_vs_real": None}}, "smoke")
    files = build_report("smoke", out_dir=tmp_path / "out", pdf=False)
    md, text = files.markdown.read_text(encoding="utf-8"), _text(files.html.read_text(encoding="utf-8"))
    assert _rows(md, "Red", "5", "0,457", "0,491") and "couleur conservée non mesuré (chapitre 07)" in md
    assert _rows(md, "paramètres du U-Net", "non mesuré (chapitre 09)", "non mesuré (chapitre 10)")
    assert "la fidélité au texte (alignment) ne figure pas dans ses mesures" in text
    assert "la FID ne figure pas dans ses mesures" in text and "la courbe qualité/pas (steps_curve) ne figure pas" in text


def _bench_section(text: str) -> str:
    return text[text.index("Performances : bancs d'essai</h2>"):text.index("Résumé des entraînements</h2>")]


def test_benchmark_section_reads_the_result_files(latent):
    "Each result file is a row with its machine, date, measure and verdict; a benchmark without a file says how to make one."
    md, section = latent["markdown"], _bench_section(latent["text"])
    assert _rows(md, "notre U-Net contre celui de diffusers", "unet\\_\u200bcpu.\u200bjson", "CPU AMD EPYC, 2 cœurs, charge 1,5 ; 26/11/2026",
                 "latent 1,13× (54,4 contre 48 img/s)", "≥ 1,3× sur chaque configuration : **manqué**")
    assert _rows(md, "espace latent contre pixels", "latent\\_\u200bvs\\_\u200bpixel\\_\u200bcuda.\u200bjson",
                 "GPU NVIDIA H200 ; 26/11/2026", "7,51× plus rapide par pas d'entraînement", "≥ 4× plus rapide par pas : **atteint**")
    assert _rows(md, "FLOP/s atteints à l'entraînement", "flops\\_\u200bcpu.\u200bjson", "CPU AMD EPYC, 2 cœurs, charge 1,5 ; 26/11/2026",
                 "160,8 GFLOP/s, soit 96,7\u00a0% du pic fp32 mesuré de 166,3 GFLOP/s (latent, contiguous, AdamW fused)",
                 "≥ 35\u00a0% du pic, sur CPU : **atteint**")
    assert _rows(md, "DDIM-50 contre DDPM-1000", "aucun", "—", "non mesuré (commande sous le tableau)",
                 "≥ 18× plus rapide : **non mesuré** ; ≤ 3 points de fidélité au texte perdus : **non mesuré**")
    assert "Sans résultat pour l'instant : DDIM-50 contre DDPM-1000, DPM-Solver++ contre DDPM-1000, haute résolution par le même latent" in section
    assert "<code>python bench/run_all.py python bench/run_all.py --only sampling,solvers,hires</code>" in section     # the commands to run
    assert "flops_cuda_2threads_compile.json (not a readable JSON file" in section.replace("\u200b", "")  # skipped, and said so
    for goal in ("≥ 1,3× sur chaque configuration", "≥ 18× plus rapide et ≤ 3 points de fidélité au texte perdus",
                 "≤ 3 points perdus en ≤ 15 pas, écart résolu",
                 "≥ 4× plus rapide par pas", "≤ 1,5× le temps par image à 64×64", "≥ 35\u00a0% du pic, sur CPU"):   # the course's targets, measured or not
        assert f"objectif {goal}" in section, goal


def test_benchmark_section_of_the_repository(built):
    "The default build reads the repository's bench/results: every benchmark is there, with each of its files or 'non mesuré'."
    section = _bench_section(_text(built["html"])).replace("\u200b", "")
    results = repo_root() / "bench" / "results"
    for name, title in BENCHMARKS.items():
        files = sorted(results.glob(f"{name}_*.json"))
        assert title in section, title
        assert all(f.name in section for f in files), (name, files)
        if not files: assert "Sans résultat pour l'instant" in section and "<code>python bench/run_all.py" in section, name


def test_unreadable_benchmark_files_are_skipped_with_a_warning(tmp_path):
    (tmp_path / "unet_cpu.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "sampling_cuda.json").write_text(json.dumps({"machine": _bench_machine("NVIDIA H200"), "speedup": 20.0}), encoding="utf-8")
    (tmp_path / "summary.json").write_text("{}", encoding="utf-8")                  # run_all's summary: not a result file
    with pytest.warns(UserWarning) as caught:
        bench = read_benchmarks(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("unet_cpu.json: not a readable JSON file" in m for m in messages), messages
    assert any("sampling_cuda.json: missing field 'accuracy_loss'" in m for m in messages), messages
    assert bench.results == [] and [f for f, _ in bench.skipped] == ["unet_cpu.json", "sampling_cuda.json"]


def test_figures_of_another_run_are_left_out(tmp_path, monkeypatch):
    "Issue 14.7: a figure made by another profile, another session or a failed stage is not shown next to these metrics."
    import ldm_course.core as core
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(tmp_path / "figures"))
    save_metrics("05_ddpm_mnist", MNIST_METRICS, "smoke")
    _png("fig_mnist_echantillons.png", 0)                    # same session as the metrics: this run's
    monkeypatch.setattr(core, "RUN_SESSION", "an-older-process")
    _png("fig_mnist_evolution.png", 1)                       # an older run's figure left in the folder
    fig, ax = plt.subplots(); ax.plot([0, 1]); save_figure(fig, "fig_mnist_guidage.png", "cpu"); plt.close(fig)   # another profile
    files = build_report("smoke", pdf=False)
    md = files.markdown.read_text(encoding="utf-8")
    assert "](figures/fig_mnist_echantillons.png)" in md
    assert "](figures/fig_mnist_evolution.png)" not in md and "fig_mnist_guidage.png" not in md   # nor in the appendix
    assert "non mesuré (chapitre 05) pour ce run : le fichier présent vient d'une autre exécution (session sans mesures" in md
    assert files.left_out == {"fig_mnist_guidage.png": "faite par le profil cpu", "fig_mnist_evolution.png": "session sans mesures dans ce run"}
    published = sorted(p.name for p in (files.html.parent / "figures").iterdir())
    assert published == ["fig3_unet.png", "fig3_unet.png.json", "fig_mnist_echantillons.png", "fig_mnist_echantillons.png.json"]


def test_report_group_labels_cover_chapter_11s_groups():
    "The report's short labels name exactly chapter 11's prompt groups (plus the overall row): a new group gets a label."
    from ldm_course.alignment import GROUP_NAMES, PROMPT_GROUPS
    from ldm_course.report import GROUP_LABELS
    assert set(GROUP_LABELS) == set(PROMPT_GROUPS) | {"overall"}
    assert set(GROUP_NAMES) == set(GROUP_LABELS)
