"""WorldBench's keypoint board: StableKeypoints on the world's close-up faces (CelebA/MAFL layout), the model and its
sites chosen on a validation slice of the training faces, test reported once for two fit seeds, and a fresh set of
faces from another world seed.

Data (world seed 0, 300 train / 100 test faces, as benchmarks/keypoints_quality.py):
- val: the same folder with the last VAL_FACES training faces marked `val` in Eval/list_eval_partition.txt; fit,
  vote and regressor on the other training faces (`data.fit_split=train data.train_split=train`), error on the val
  faces. The test faces are never read.
- test: fit on all 300 training faces (the reference's MAFL protocol), regressor on them, error on the 100 test faces.
- fresh: world seed 1's 100 test faces through the test protocol's embeddings and regressor, unchanged (nothing is
  fitted on world seed 1: its training faces are never read).
Each candidate is screened by one shorter fit (VAL_STEPS, seed 0) on the val protocol; the best by val error is fitted
with the reference's 500 steps and two seeds on the test protocol. Every fit runs a step's 4 iterations in one
denoiser call (`keypoints.fit.iterations_per_call=4`: the reference loop's gradients, tested equal to rounding).
Baselines on the same images: the untrained vote, K random tokens (both of the initial embeddings, so one
evaluation of their 2K tokens serves both, each half with its own regressor), the mean landmarks. Every step runs
`python -m diffprobe task=keypoints ...` as a user does and is skipped when its output exists (resumable).
"""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import keypoints_quality as kq
import torch
from worker_slots import Slots

from diffprobe.eval.landmarks import apply_regressor, fit_regressor
from diffprobe.heads.keypoints.state import KeypointModel, load_model, save_model
from diffprobe.io import load_tensors
from diffprobe.tasks.keypoints_eval import landmark_metric

ROOT = Path(__file__).resolve().parent.parent
VAL_FACES = 60
VAL_STEPS = 200       # screening fits of the candidates (the chosen one is then fitted with the reference's 500)
FIT_SEEDS = (0, 1)
PER_CALL = "keypoints.fit.iterations_per_call=4"
MINI_16_32 = ["up_blocks.2.attentions.*.transformer_blocks.0.attn2.hook_probs",
              "up_blocks.3.attentions.*.transformer_blocks.0.attn2.hook_probs"]
CANDIDATES = {   # name: (model, sites; None = the model's own keypoints_sites or the backbone default)
    "mini, 32 x 32 level (shipped)": ("mini", None),
    "mini, 16 x 16 + 32 x 32 levels": ("mini", MINI_16_32),
    "mini-dit, its 4 cross-attention sites": ("mini_dit", None),
}
METRIC = "inter_ocular_error_percent"
PRIORITY = 0          # the board's chain is the run's longest: its jobs take free slots first
QUICK = ["keypoints.predict.augmentations=1", "keypoints.eval.train=20", "keypoints.eval.test=10"]


def world_faces(work: Path, seed: int, slots: Slots) -> Path:
    """World close-up faces in the CelebA/MAFL layout (300 train, 100 test) from world seed `seed`."""
    root = work / f"faces_seed{seed}"
    if not (root / "done").is_file():
        slots.run([sys.executable, "-m", "diffprobe", "task=world", "world.format=celeba", "world.n=100",
                   "world.n_train=300", f"world.out={root}", f"seed={seed}",
                   f"hydra.run.dir={work / f'faces_seed{seed}_run'}"], PRIORITY)
        (root / "done").write_text("")
    return root


def val_faces(work: Path, source: Path) -> Path:
    """source's layout with its last VAL_FACES training faces marked val (1) and its test faces dropped."""
    root = work / "faces_val"
    if (root / "done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("done"))
    rows = [line.split() for line in (source / "Eval" / "list_eval_partition.txt").read_text().splitlines()]
    train = [name for name, part in rows if part == "0"]
    val = set(train[-VAL_FACES:])
    (root / "Eval" / "list_eval_partition.txt").write_text(
        "".join(f"{name} {1 if name in val else 0}\n" for name in train))
    (root / "done").write_text("")
    return root


def _data(root: Path, val: bool) -> list[str]:
    splits = ("train", "train", "val") if val else ("mafl_train", "mafl_train", "mafl_test")
    return ["data=celeba", f"data.root={root}",
            *(f"data.{k}_split={s}" for k, s in zip(("fit", "train", "test"), splits))]


def _args(model: str, sites) -> SimpleNamespace:
    return SimpleNamespace(model=model, model_path=None, sites=sites)


def fit(work: Path, name: str, model: str, sites, data: list[str], seed: int, steps: int,
        slots: Slots) -> tuple[Path, float]:
    """task=keypoints mode=fit (resumable); the embeddings file and the fit's wall minutes."""
    run = work / name
    timing = run / "wall_seconds.txt"
    if not (run / "keypoints.safetensors").is_file():
        seconds = slots.run(kq.command(_args(model, sites), "mode=fit", *data, f"keypoints.fit.steps={steps}",
                                       PER_CALL, f"seed={seed}", f"hydra.run.dir={run}"), PRIORITY)
        timing.write_text(f"{seconds:.1f}\n")
    return run / "keypoints.safetensors", float(timing.read_text()) / 60 if timing.is_file() else float("nan")


def evaluate(work: Path, name: str, model: str, sites, data: list[str], embeddings: Path, extra,
             slots: Slots) -> dict:
    """task=keypoints mode=eval (resumable): metrics.json, with the eval's wall minutes added."""
    run = work / name
    if not (run / "metrics.json").is_file():
        seconds = slots.run(kq.command(_args(model, sites), "mode=eval", *data, *extra, f"embeddings={embeddings}",
                                       f"resume={run}", f"hydra.run.dir={run}"), PRIORITY)
        (run / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    metrics = json.loads((run / "metrics.json").read_text())
    timing = run / "wall_seconds.txt"
    return {**metrics, "minutes": float(timing.read_text()) / 60 if timing.is_file() else float("nan")}


def baselines(work: Path, model: str, sites, root: Path, slots: Slots) -> tuple[Path, int]:
    """The untrained vote's K tokens and K random tokens, both of the fit's initial embeddings, as one keypoints
    file of 2K tokens (the vote's first) and K: one evaluation pass serves both, since a token's map is its own
    column of the attention (the others do not change it)."""
    out = work / "baseline_tokens"
    if not (out / "keypoints.safetensors").is_file():
        parts = []
        for tag, random_tokens in (("untrained", False), ("random", True)):
            part = work / f"{tag}_tokens"
            if not (part / "keypoints.safetensors").is_file():
                with slots.slot(PRIORITY):
                    kq.untrained(_args(model, sites), {"name": "celeba", "root": str(root),
                                                       "fit_split": "mafl_train"}, part, random_tokens)
            parts.append(load_model(part / "keypoints.safetensors"))
        vote, drawn = parts
        if not torch.equal(vote.embeddings, drawn.embeddings):
            raise RuntimeError("the untrained and random-token baselines start from different embeddings")
        save_model(out / "keypoints", KeypointModel(vote.embeddings, torch.cat([vote.indices, drawn.indices]),
                                                    vote.config, [*vote.counts, *drawn.counts]))
    return out / "keypoints.safetensors", load_model(out / "keypoints.safetensors").num_keypoints // 2


def split_scores(test_run: Path, fresh_run: Path, k: int) -> dict[str, tuple[float, float]]:
    """Test and fresh inter-ocular error of the first k and the last k tokens of a 2k-token evaluation: each half's
    own regressor fitted on the test run's training faces (as mode=eval fits one), applied to both test sets."""
    def found(run: Path, split: str):
        rows, _ = load_tensors(run / f"eval_{split}_state.safetensors")
        return rows["rows.found"].numpy(), rows["rows.gt"].numpy(), rows["rows.visible"].numpy() > 0

    train, test, fresh = found(test_run, "train"), found(test_run, "test"), found(fresh_run, "test")
    scores = {}
    for name, half in (("untrained", slice(0, k)), ("random", slice(k, 2 * k))):
        W = fit_regressor(train[0][:, half], train[1], train[2])
        scores[name] = tuple(landmark_metric("celeba", apply_regressor(W, f[:, half]), gt, vis)[METRIC]
                             for f, gt, vis in (test, fresh))
    return scores


def _together(*calls):
    """Run the zero-argument calls in threads (their heavy work waits for slots); their results in order."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def run_keypoints(work: Path, slots: Slots, quick: bool = False) -> dict:
    """The board: candidates on val, the chosen one on test (two seeds) and fresh, with the baselines; every fit and
    evaluation that does not wait for another runs beside it in `slots`. quick: the plumbing only (3 steps, one
    transform, few images)."""
    (val_steps, steps), extra = ((3, 3), QUICK) if quick else ((VAL_STEPS, 500), ())
    work.mkdir(parents=True, exist_ok=True)
    test_root, fresh_root = _together(lambda: world_faces(work, 0, slots), lambda: world_faces(work, 1, slots))
    val_root = val_faces(work, test_root)
    out: dict = {"val_faces": VAL_FACES, "train_faces": 300 - VAL_FACES, "val_steps": val_steps, "steps": steps,
                 "candidates": {}}

    def candidate(i: int, model: str, sites) -> dict:
        # the folders name the screening length: a work folder of another VAL_STEPS is not reused
        emb, minutes = fit(work, f"val_fit_{i}_{val_steps}", model, sites, _data(val_root, True), 0, val_steps, slots)
        m = evaluate(work, f"val_eval_{i}_{val_steps}", model, sites, _data(val_root, True), emb, extra, slots)
        return {"model": model, "sites": sites, "val": m[METRIC],
                "val_mean_landmarks": m[f"baseline_mean_landmarks_{METRIC}"], "fit_minutes": minutes}

    found = _together(*(lambda i=i, c=c: candidate(i, *c) for i, c in enumerate(CANDIDATES.values())))
    out["candidates"] = dict(zip(CANDIDATES, found))
    best = min(out["candidates"], key=lambda k: out["candidates"][k]["val"])
    print(f"  keypoints val: {best} chosen", file=sys.stderr, flush=True)
    model, sites = CANDIDATES[best]
    out["chosen"] = best

    def both(name: str, emb: Path) -> tuple[dict, dict]:
        """Test (regressor fitted on world seed 0's training faces), then fresh through that regressor."""
        test = evaluate(work, f"test_eval_{name}", model, sites, _data(test_root, False), emb, extra, slots)
        regressor = f"keypoints.eval.regressor={work / f'test_eval_{name}' / 'regressor.safetensors'}"
        return test, evaluate(work, f"fresh_eval_{name}", model, sites, _data(fresh_root, False), emb,
                              [*extra, regressor], slots)

    def fitted(seed: int) -> dict:
        emb, minutes = fit(work, f"test_fit_seed{seed}", model, sites, _data(test_root, False), seed, steps, slots)
        test, fresh = both(f"seed{seed}", emb)
        return {"test": test[METRIC], "fresh": fresh[METRIC], "fit_minutes": minutes,
                "eval_minutes": test["minutes"], "fresh_eval_minutes": fresh["minutes"]}

    def untrained() -> tuple[dict, dict, dict]:
        emb, k = baselines(work, model, sites, test_root, slots)
        test, fresh = both("baselines", emb)
        return test, fresh, split_scores(work / "test_eval_baselines", work / "fresh_eval_baselines", k)

    *fits, (test, fresh, scores) = _together(*(lambda s=s: fitted(s) for s in FIT_SEEDS), untrained)
    rows = {f"fitted, seed {s}": r for s, r in zip(FIT_SEEDS, fits)}
    for label, tag in (("untrained: initial embeddings, the same vote", "untrained"),
                       ("raw features: initial embeddings, K random tokens", "random")):
        rows[label] = dict(zip(("test", "fresh"), scores[tag]))
    rows["no image: the training faces' mean landmarks"] = {
        "test": test[f"baseline_mean_landmarks_{METRIC}"], "fresh": fresh[f"baseline_mean_landmarks_{METRIC}"]}
    out["rows"] = rows
    out["eval_minutes"], out["fresh_eval_minutes"] = fits[0]["eval_minutes"], fits[0]["fresh_eval_minutes"]
    return out


def keypoints_doc(r: dict) -> list[str]:
    lines = ["### Keypoints (StableKeypoints) on the world's close-up faces", "",
             f"Inter-ocular error (%, lower is better). Candidates screened by a fit of {r['val_steps']} Adam steps "
             f"(seed 0; the reference's {r['steps']} for the chosen one below) on "
             f"{r['train_faces']} of the 300 training faces and scored on the other {r['val_faces']} (the val "
             "slice; the test faces never read):", "",
             "| candidate | val error | mean landmarks on val | fit (min) |", "|---|---|---|---|"]
    for label, c in r["candidates"].items():
        mark = " **(chosen)**" if label == r["chosen"] else ""
        lines.append(f"| {label}{mark} | {c['val']:.2f} | {c['val_mean_landmarks']:.2f} | {c['fit_minutes']:.1f} |")
    lines += ["", f"The chosen candidate fitted ({r['steps']} steps) on all 300 training faces with two seeds; test "
                  "(world seed 0, 100 faces; the regressor and the mean landmarks from its 300 training faces) "
                  "reported once, fresh (world seed 1's 100 test faces through the same embeddings and regressor: "
                  "nothing fitted on world seed 1) beside it. An evaluation (10 test-time transforms) took "
                  f"{r['eval_minutes']:.1f} min on test (400 images) and {r['fresh_eval_minutes']:.1f} on fresh "
                  "(100).", "",
              "| keypoints | test | fresh test |", "|---|---|---|"]
    for label, row in r["rows"].items():
        lines.append(f"| {label} | {row['test']:.2f} | {row['fresh']:.2f} |")
    return lines + [""]

