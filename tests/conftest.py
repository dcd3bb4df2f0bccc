"""Shared test helpers."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def pdf_pages_look_filled(tmp_path):
    "A check: render a PDF's pages to PNG with pdftoppm and fail on a blank one (skips without poppler-utils)."
    def check(pdf: Path, min_pages: int = 4) -> int:
        assert pdf is not None and pdf.is_file() and pdf.read_bytes().startswith(b"%PDF"), pdf
        if shutil.which("pdftoppm") is None: pytest.skip("pdftoppm (poppler-utils) not installed: cannot look at the pages")
        subprocess.run(["pdftoppm", "-png", "-r", "30", str(pdf), str(tmp_path / "page")], check=True)
        pages = sorted(tmp_path.glob("page*.png"))
        assert len(pages) >= min_pages, f"{pdf.name} has {len(pages)} pages, expected at least {min_pages}"
        for page in pages:
            pixels = np.asarray(Image.open(page).convert("L"), dtype=np.float32) / 255
            assert pixels.std() > 0.05, f"{page.name} looks blank (std {pixels.std():.3f})"
        return len(pages)
    return check


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription (10-20× slower when busy)."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
