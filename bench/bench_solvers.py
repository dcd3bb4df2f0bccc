"""Quality against the number of model evaluations: DDPM, DDIM and DPM-Solver++ on the same text-to-image pipeline.

Same pipeline (chapter 10's cross-attention model by default, else chapter 09's), same prompts (captions of held-out
catalogue photos, chapter 11's split), same starting latents z_T, same classifier-free guidance; only the sampler and
its number of steps change. Every point is scored like bench_sampling.py: the chapter-11 clothing judge reads type and
colour of each image ("type and colour right" is the headline), FID / KID against the held-out photos in the judge's
feature space, and the wall time per image (text encoding, sampling loop and decoding, median over calls).

The reference is the full ancestral chain, DDPM-1000. Because every sampler starts from the same z_T for the same
prompt, the difference of "type and colour right" between a point and the reference is paired: its standard error
comes from the discordant images only. A difference whose standard error exceeds 1.5 points is called unresolved.

Samplers (chapter 02, through LatentDiffusionPipeline's `sampler` argument):
  ddpm       the ancestral chain (DDIM with η = 1 on every training step is exactly DDPM)
  ddim       DDIM with η = 1 (stochastic, the pipeline's default) and η = 0 (deterministic)
  dpm++      DPM-Solver++(2M), the deterministic probability-flow ODE
  sde-dpm++  SDE-DPM-Solver++(2M), its stochastic form

    python bench/bench_solvers.py                                  # CPU (or CUDA), N = 96 on CPU, 500 on CUDA
    python bench/bench_solvers.py --num-images 500 --steps 5 8 10 15 20 50
    python bench/bench_solvers.py --guidance-scales 2 3 5 --samplers dpm++ --steps 15    # why the ODE loses: w
    python bench/bench_solvers.py --profile smoke --num-images 2 --steps 2 3 --ddpm-steps 20 --out-dir /tmp/b   # check it runs

Target (issue 17): DPM-Solver++ (either form) with at most 15 evaluations loses at most 3 points of "type and colour
right" against DDPM-1000, resolved (standard error at most 1.5 points). Writes bench/results/solvers_<device>.json,
.md and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import heldout_photos, seconds_per_image, timed_generator, trained_pipeline_and_judge  # noqa: E402
from machine import add_machine_arguments, describe, out_dir, setup, write_result  # noqa: E402

from ldm_course import attention  # noqa: E402,F401  (registers chapter 10's cross-attention block, to load its pipeline)
from ldm_course.benchmarks import BENCHMARK_TARGETS, UNRESOLVED_STD_ERROR  # noqa: E402
from ldm_course.ldm_pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm_course.judge import backdrop_mask, load_judge, predict_garments, whiten_backdrop  # noqa: E402
from ldm_course.metrics import ClassifierFeatures, fid_kid  # noqa: E402
from ldm_course.alignment import PromptSpec, prompt_alignment  # noqa: E402

TARGETS = BENCHMARK_TARGETS["solvers"]   # accuracy_loss, max_evaluations: shared with the report
SAMPLERS = ("ddim", "ddim-eta0", "dpm++", "sde-dpm++")


def point_name(sampler: str, steps: int, w: float, default_w: float) -> str:
    return f"{sampler}-{steps}" + ("" if w == default_w else f"-w{w:g}")


def generator_for(pipe: LatentDiffusionPipeline, sampler: str, steps: int, w: float):
    "generate(prompts, seed) -> images for one sampler setting of the pipeline."
    if sampler == "ddpm": return lambda pr, s: pipe(pr, num_inference_steps=steps, guidance_scale=w, seed=s, sampler="ddim", eta=1.0).images
    if sampler == "ddim-eta0": return lambda pr, s: pipe(pr, num_inference_steps=steps, guidance_scale=w, seed=s, sampler="ddim", eta=0.0).images
    if sampler == "ddim": return lambda pr, s: pipe(pr, num_inference_steps=steps, guidance_scale=w, seed=s, sampler="ddim", eta=1.0).images
    return lambda pr, s: pipe(pr, num_inference_steps=steps, guidance_scale=w, seed=s, sampler=sampler).images


def score(name, generate, specs, judge, feature, real, batch_size, seed) -> tuple[dict, torch.Tensor]:
    "Accuracies, FID/KID and time per image of one point; and its per-image 'type and colour right' (0/1)."
    result = prompt_alignment(generate, specs, judge, num_samples=1, seed=seed, batch_size=batch_size)
    images = torch.cat(result.samples)
    overall = result.summary().loc["overall"]
    row = {"seconds_per_image": seconds_per_image(generate.calls), "type": float(overall["type"]),
           "colour": float(overall["colour"]), "both": float(overall["both"]), **fid_kid(real[:len(specs)], images, feature, seed=seed),
           **backdrop_diagnostic(images, specs, judge)}
    print(f"{name}: {row['seconds_per_image']:.3f} s/image, type {row['type']:.1%}, colour {row['colour']:.1%}, "
          f"both {row['both']:.1%}, FID {row['fid']:.2f}; backdrop {row['backdrop_grey']:.3f} below white, "
          f"both with it whitened {row['both_backdrop_white']:.1%}", flush=True)
    return row, torch.tensor(result.per_prompt["both"].to_numpy(), dtype=torch.float64)


def backdrop_diagnostic(images: torch.Tensor, specs: list[PromptSpec], judge) -> dict:
    """How far the generated backdrop is from the catalogue's white (mean of 1 − lightest channel over backdrop pixels,
    [0, 1] units), and "type and colour right" once it is set back to white: does a sampler lose on the garment or on
    the backdrop?"""
    weight = backdrop_mask(images)
    lightest = (images + 1).amin(1, keepdim=True) / 2
    grey = float(((1 - lightest) * weight).sum() / weight.sum().clamp(min=1))
    pred = predict_garments(judge, whiten_backdrop(images))
    names = judge.config
    ok = [(names.type_names[t] == s.article_type) and (names.colour_names[c] == s.colour)
          for s, t, c in zip(specs, pred.type.tolist(), pred.colour.tolist())]
    return {"backdrop_grey": grey, "both_backdrop_white": sum(ok) / max(len(ok), 1)}


def paired(correct: torch.Tensor, reference: torch.Tensor) -> dict:
    "Accuracy lost against the reference on the same prompts and z_T, with its paired standard error."
    diff = reference - correct
    n = len(diff)
    se = float(diff.std(unbiased=True) / n ** 0.5) if n > 1 else float("nan")
    return {"loss": float(diff.mean()), "std_error": se, "discordant": int((diff != 0).sum()), "resolved": se <= UNRESOLVED_STD_ERROR}


def verdict(rows: dict) -> dict:
    "The target's verdict: the best DPM-Solver++ point within the evaluation budget, its loss and whether it is resolved."
    budget = [(k, r) for k, r in rows.items() if r["sampler"] in ("dpm++", "sde-dpm++") and r["steps"] <= TARGETS["max_evaluations"]]
    if not budget: return {"met": None, "point": None}
    name, best = min(budget, key=lambda kr: kr[1]["vs_reference"]["loss"])
    vs = best["vs_reference"]
    return {"met": vs["loss"] <= TARGETS["accuracy_loss"] and vs["resolved"], "point": name, "loss": vs["loss"], "std_error": vs["std_error"]}


def plot(rows: dict, reference: dict, title: str) -> plt.Figure:
    "Accuracy ('type and colour right', with paired standard errors) and seconds per image against the number of steps."
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    labels = {"ddim": "DDIM η = 1", "ddim-eta0": "DDIM η = 0", "dpm++": "DPM-Solver++(2M), EDO", "sde-dpm++": "SDE-DPM-Solver++(2M)"}
    for sampler, label in labels.items():
        pts = sorted((r["steps"], r) for r in rows.values() if r["sampler"] == sampler and r["default_w"])
        if not pts: continue
        steps = [s for s, _ in pts]
        ax1.errorbar(steps, [100 * r["both"] for _, r in pts], yerr=[100 * r["vs_reference"]["std_error"] for _, r in pts],
                     marker="o", capsize=3, label=label)
        ax2.plot(steps, [r["seconds_per_image"] for _, r in pts], marker="o", label=label)
    ax1.axhline(100 * reference["both"], color="k", ls="--", label=f"DDPM {reference['steps']} pas")
    ax1.axhline(100 * (reference["both"] - TARGETS["accuracy_loss"]), color="k", ls=":", lw=1, label="objectif : −3 points")
    ax2.axhline(reference["seconds_per_image"], color="k", ls="--", label=f"DDPM {reference['steps']} pas")
    for ax in (ax1, ax2): ax.set_xscale("log"); ax.set_xlabel("pas d'échantillonnage (évaluations du U-Net guidé)"); ax.grid(alpha=0.3)
    ax1.set_ylabel("type et couleur justes (%)"); ax2.set_ylabel("secondes par image"); ax2.set_yscale("log")
    ax1.set_title("Fidélité au texte (erreur type appariée)"); ax2.set_title("Coût par image")
    ax1.legend(fontsize=8, loc="lower right"); ax2.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_arguments(p, profile_help="whose checkpoints: smoke, cpu or gpu (default: gpu on CUDA, else cpu)",
                          batch_help="prompts per generation call (default 24 on CPU, 250 on GPU)")
    p.add_argument("--chapter", default=None, help="10_cross_attention or 09_ldm_additive (default: 10 if present, else 09)")
    p.add_argument("--num-images", type=int, default=None, help="images per point (default 96 on CPU, 500 on GPU)")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 8, 10, 15, 20, 50], help="sampling steps of each sampler")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--ddpm-steps", type=int, default=1000, help="the reference chain's steps")
    p.add_argument("--guidance-scales", type=float, nargs="+", default=None, help="w of every point (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device, profile, info = setup(args, cpu_batch=24, gpu_batch=250)
    n, batch_size = args.num_images or (500 if device.type == "cuda" else 96), args.batch_size
    found = trained_pipeline_and_judge(args.chapter, profile, "bench_solvers")
    if found is None: return 2
    path, judge_path = found
    start = time.perf_counter()
    pipe = LatentDiffusionPipeline.load(path, device=device)
    judge, judge_meta = load_judge(judge_path, device)
    default_w = pipe.config.guidance_scale
    scales = args.guidance_scales or [default_w]
    real, records, source = heldout_photos(judge_meta, profile, pipe.vae.config.image_size, n)
    held = {tuple(p) for p in pipe.held_out_pairs}
    specs = [PromptSpec(r.caption, r.articleType, r.baseColour, "held-out" if (r.articleType, r.baseColour) in held else "catalogue")
             for r in records.itertuples()]
    feature = ClassifierFeatures(judge)
    pipe([s.prompt for s in specs[:batch_size]], num_inference_steps=2, guidance_scale=default_w, seed=0)  # warm-up at the timed shape
    print(f"{path} ({pipe.config.conditioning}); {n} prompts = captions of held-out {source.source} photos", flush=True)

    ref_name = f"ddpm-{args.ddpm_steps}"
    ref_row, ref_correct = score(ref_name, timed_generator(generator_for(pipe, "ddpm", args.ddpm_steps, default_w), device),
                                 specs, judge, feature, real, batch_size, args.seed)
    reference = {**ref_row, "sampler": "ddpm", "steps": args.ddpm_steps, "guidance_scale": default_w}
    rows = {}
    for w in scales:
        for sampler in args.samplers:
            for steps in args.steps:
                name = point_name(sampler, steps, w, default_w)
                row, correct = score(name, timed_generator(generator_for(pipe, sampler, steps, w), device), specs, judge, feature,
                                     real, batch_size, args.seed)
                rows[name] = {**row, "sampler": sampler, "steps": steps, "guidance_scale": w, "default_w": w == default_w,
                              "vs_reference": paired(correct, ref_correct),
                              "speedup": reference["seconds_per_image"] / row["seconds_per_image"]}
    v = verdict(rows)
    lines = [f"Samplers on the same latent pipeline ({path.parent.name}, {pipe.config.conditioning}) and the same z_T, {n} prompts "
             f"(captions of held-out catalogue photos); reference {ref_name} (type and colour right {reference['both']:.1%}, "
             f"{reference['seconds_per_image']:.3f} s/image; backdrop {reference['backdrop_grey']:.3f} below white, "
             f"type and colour right with it whitened {reference['both_backdrop_white']:.1%}); {describe(info)}.", "",
             "| point | w | s/image | speed-up vs DDPM | type | colour | type and colour | lost vs DDPM (paired SE) | FID "
             "| backdrop below white | type and colour, backdrop whitened |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        vs = r["vs_reference"]
        lines.append(f"| {name} | {r['guidance_scale']:g} | {r['seconds_per_image']:.3f} | {r['speedup']:.0f}× | {r['type']:.1%} | "
                     f"{r['colour']:.1%} | {r['both']:.1%} | {100 * vs['loss']:+.1f} ± {100 * vs['std_error']:.1f}"
                     f"{'' if vs['resolved'] else ' (not resolved)'} | {r['fid']:.2f} | {r['backdrop_grey']:.3f} | "
                     f"{r['both_backdrop_white']:.1%} |")
    lines += ["", "Target: DPM-Solver++ (either form) with ≤ " + f"{TARGETS['max_evaluations']:g} steps loses ≤ "
              f"{100 * TARGETS['accuracy_loss']:g} points against {ref_name}, resolved (SE ≤ {100 * UNRESOLVED_STD_ERROR:g} points): "
              + ("not measured" if v["met"] is None else f"{'met' if v['met'] else 'missed'} (best: {v['point']}, "
                 f"{100 * v['loss']:+.1f} ± {100 * v['std_error']:.1f} points)")]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    payload = {"benchmark": "solvers", "machine": info, "profile": profile, "pipeline": str(path), "num_images": n,
               "reference": reference, "results": rows, "verdict": v, "targets": dict(TARGETS),
               "target_met": v["met"], "seconds": round(time.perf_counter() - start, 1)}
    paths = write_result(f"solvers_{device.type}", payload, table, out_dir(args))
    fig = plot(rows, reference, f"Échantillonneurs sur le modèle {path.parent.name} ({n} requêtes, mêmes $z_T$)")
    fig.savefig(paths[0].with_suffix(".png"), dpi=130); plt.close(fig)
    print(f"wrote {paths[0]}, {paths[1].name} and {paths[0].with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
