"""The report (chapter 13): built from a temporary metrics + figures folder, it must be a self-contained French HTML
page and a non-blank PDF that show the measured numbers, say "non mesuré" for the missing ones, and fail clearly."""
import re
import shutil
import subprocess

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from ldm_course import report as R
from ldm_course.core import figures_dir, runs_dir, save_figure, save_metrics

HAS_TEX = shutil.which("latexmk") is not None
HAS_PDFTOPPM = shutil.which("pdftoppm") is not None

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
        files = R.build_report("smoke")
        yield {"files": files, "tmp": tmp, "html": files.html.read_text(encoding="utf-8"),
               "markdown": files.markdown.read_text(encoding="utf-8"), "figures": figures_dir("smoke"),
               "out": runs_dir("smoke") / "report"}


def _text(html: str) -> str:
    "HTML with typographic apostrophes and non-breaking spaces made plain, for searching."
    return re.sub(r"[ \t\n]+", " ", html.replace("’", "'").replace("&nbsp;", "\u00a0").replace("&#39;", "'"))


def test_smoke_report_goes_to_runs_not_reports(built):
    assert built["files"].html == built["out"] / "rapport.html"
    assert built["out"] == built["tmp"] / "runs" / "smoke" / "report"
    assert R.report_dir("cpu").name == "reports" and R.report_dir("gpu") == R.report_dir("cpu")


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
        assert R.format_value(value) in text, (value, R.format_value(value))
    assert "0,1452" in text and "173\u00a0921" in text
    assert "la perte moyenne passe de 0,3946 (premiers pas) à 0,1452 (derniers pas) en 30 pas" in text
    assert "all-MiniLM-L6-v2" in text                            # chapter 08's encoder, by its usual name
    assert "données synthétiques (repli hors ligne), 600 éléments, graine 0" in text
    assert "22 lignes mal formées, 5 images absentes" in text     # the Kaggle skip counts


def test_missing_measures_say_which_chapter(built):
    text = _text(built["html"])
    for number in ("06", "07", "09", "10", "11"):
        assert f"non mesuré (chapitre {number})" in text, number
    assert "le chapitre 09 (diffusion latente, conditionnement additif) crée le fichier" in text   # figure 4
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
def test_pdf_pages_are_not_blank(built, tmp_path):
    pdf = built["files"].pdf
    assert pdf is not None and pdf.is_file() and pdf.read_bytes().startswith(b"%PDF")
    log = (pdf.parent / "build" / "rapport.log").read_text(encoding="latin-1")
    assert "Overfull \\hbox" not in log, "something sticks out of the text width"
    if not HAS_PDFTOPPM: pytest.skip("pdftoppm (poppler-utils) not installed: cannot look at the pages")
    subprocess.run(["pdftoppm", "-png", "-r", "30", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) >= 4
    for page in pages:
        pixels = np.asarray(Image.open(page).convert("L"), dtype=np.float32) / 255
        assert pixels.std() > 0.05, f"{page.name} looks blank (std {pixels.std():.3f})"


@pytest.mark.skipif(not HAS_TEX, reason="latexmk not installed")
def test_latex_error_names_the_first_error_and_the_log(built, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(built["tmp"] / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(built["tmp"] / "figures"))
    template = tmp_path / "rapport.md"
    template.write_text("---\ntitle: Test\n---\n\n# Introduction\n\n\\nosuchmacro\n", encoding="utf-8")
    with pytest.raises(R.ReportBuildError, match=r"Undefined control sequence[\s\S]*see the log: .*rapport\.log"):
        R.build_report("smoke", out_dir=tmp_path / "out", template=template)
    assert not (tmp_path / "out" / "rapport.pdf").exists()    # nothing published on failure


def test_html_only_build_and_unknown_label(built, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(built["tmp"] / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(built["tmp"] / "figures"))
    template = tmp_path / "rapport.md"
    template.write_text("# Résultats\n\nPerte : ((( r.measure('05', 'train.loss_last_20') ))), "
                        "VAE : ((( r.measure('07', 'recon_mse') ))).\n", encoding="utf-8")
    files = R.build_report("smoke", out_dir=tmp_path / "out", template=template, pdf=False)
    assert files.pdf is None and not (tmp_path / "out" / "rapport.pdf").exists()
    assert "Perte : 0,1452, VAE : non mesuré (chapitre 07)." in _text(files.html.read_text(encoding="utf-8"))
    template.write_text("Voir la ((( r.ref('fig:nulle') ))).\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Unknown figure or table label 'fig:nulle'"):
        R.build_report("smoke", out_dir=tmp_path / "out", template=template, pdf=False)


def test_missing_pandoc_names_the_package(monkeypatch):
    import pypandoc
    def no_pandoc(): raise OSError("No pandoc was found")
    monkeypatch.setattr(pypandoc, "get_pandoc_path", no_pandoc)
    monkeypatch.setattr(R.shutil, "which", lambda name: None)
    with pytest.raises(R.ReportBuildError, match="pypandoc-binary"):
        R.build_report("smoke")


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
    drawn = R.draw_report_figures(R.load_metrics("smoke"), "smoke")
    assert set(drawn) == {R.FIG1_NAME, R.FIG3_NAME} and drawn[R.FIG1_NAME].chapter == "10"
    files = R.build_report("smoke", out_dir=tmp_path / "out", pdf=False)
    md, text = files.markdown.read_text(encoding="utf-8"), _text(files.html.read_text(encoding="utf-8"))
    assert "](figures/fig1_architecture_ldm.png)" in md and "](figures/fig4_evolution_debruitage.png)" in md
    assert "dessiné depuis la configuration enregistrée par le chapitre 10" in text
    assert "latents 4×16×16" in text and "24,25 dB" in text and "22,5 dB" in text and "1\u00a0234\u00a0567" in text
    assert "la perte moyenne passe de 0,9 (premiers pas) à 0,31 (derniers pas) en 400 pas" in text
    assert "« a red dress », « black dress »" in text
    assert "non mesuré (chapitre 10)" not in text and "non mesuré (chapitre 07)" not in text


def test_unet_diagram_follows_the_configuration():
    UNetConfig = pytest.importorskip("ldm_course.unet", reason="chapter 03 (ldm_course.unet) not exported yet").UNetConfig
    config = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                        attention_levels=(2,), cross_attention_levels=(1, 2), context_dim=384)
    texts = [t.get_text() for t in R.draw_unet(config, sample_size=7, input_name="z_t").axes[0].texts]
    plt.close("all")
    assert sum(t.startswith("encodeur ") for t in texts) == 3 and sum(t.startswith("décodeur ") for t in texts) == 3
    assert any("64 canaux · 4×4" in t for t in texts)                        # 7 -> 4 -> 2: stride-2 convs round up
    assert any("64 canaux · 2×2" in t and "cross-attention" in t for t in texts)
    assert sum("cross-attention" in t for t in texts) == 5                     # levels 1, 2 twice + middle block
    assert any("jetons de texte (dim. 384)" in t for t in texts)
    assert any("2 × ResBlock" in t for t in texts) and any("3 × ResBlock" in t for t in texts)


def test_format_value_is_french():
    assert R.format_value(0.042137) == "0,04214"
    assert R.format_value(1234567) == "1\u00a0234\u00a0567"
    assert R.format_value(2.5e-5) == "2,5e-5"
    assert R.format_value(True) == "oui"
    assert R.missing("11") == "non mesuré (chapitre 11)"
