"""Alignment: facefed's dlib-chip geometry beside dlib's own get_face_chip.

Run: `.venv/bin/python -m benchmarks.bench_alignment [--folds 1 2]`.

On the LFW View-2 pairs of the chosen folds (shared data set), three ways of
cutting the 150x150 chip dlib's ResNet expects, all embedded by the same
network (facefed's default embedder, the ONNX port of dlib's ResNet), so only
the chip differs:

- dlib: dlib's HOG detector, its 5-point predictor and `dlib.get_face_chip`
  (the reference);
- facefed (dlib 68 landmarks): the same HOG box, landmarks reduced from
  dlib's 68-point predictor, `align_dlib_chip` (isolates the template);
- facefed (YuNet): facefed's default detector and `align_dlib_chip`.

Reports k-fold verification accuracy (threshold from the other folds), how
far each facefed chip is from dlib's (mean absolute gray-level difference and
embedding cosine) and the time per image. Writes
benchmarks/results/alignment.{json,md}.
"""

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("FACEFED_SHARED_DATA", REPO.parent / "shared" / "data"))
METHODS = ("dlib", "facefed_dlib68", "facefed_yunet")


def _central(faces, shape):
    centre = np.array([shape[1] / 2, shape[0] / 2])
    return min(
        faces, key=lambda f: np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import dlib

    from facefed.core.align import align_dlib_chip
    from facefed.core.detection.dlib_detectors import (
        SHAPE_68_FILE,
        dlib_model_path,
        five_points_from_68,
    )
    from facefed.core.detection.yunet import YuNetDetector
    from facefed.core.image import decode_image
    from facefed.core.verification import kfold_accuracy
    from facefed.models.zoo import load_default_embedder

    with open(SHARED / "protocols" / "lfw_pairs_folds01-07.csv", newline="") as handle:
        pairs = [r for r in csv.DictReader(handle) if int(r["fold"]) in args.folds]
    paths = sorted({r["path1"] for r in pairs} | {r["path2"] for r in pairs})

    hog = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(
        str(dlib_model_path("shape_predictor_5_face_landmarks.dat"))
    )
    sp68 = dlib.shape_predictor(str(dlib_model_path(SHAPE_68_FILE)))
    yunet = YuNetDetector()
    embedder = load_default_embedder()

    chips: dict[str, dict[str, np.ndarray]] = {m: {} for m in METHODS}
    seconds = {"dlib": 0.0, "facefed_yunet": 0.0}
    missed = dict.fromkeys(METHODS, 0)
    load = os.getloadavg()[0]
    for path in paths:
        image = decode_image(SHARED / path)
        start = time.perf_counter()
        boxes = hog(image, 1)
        if len(boxes):
            centre = np.array([125.0, 125.0])
            box = min(
                boxes,
                key=lambda b: np.linalg.norm(
                    np.array([b.center().x, b.center().y]) - centre
                ),
            )
            chips["dlib"][path] = np.asarray(dlib.get_face_chip(image, sp5(image, box)))
            seconds["dlib"] += time.perf_counter() - start
            points = np.array([[p.x, p.y] for p in sp68(image, box).parts()])
            chips["facefed_dlib68"][path] = align_dlib_chip(
                image, five_points_from_68(points)
            )
        else:
            seconds["dlib"] += time.perf_counter() - start
            missed["dlib"] += 1
            missed["facefed_dlib68"] += 1
        start = time.perf_counter()
        faces = yunet.detect(image)
        if faces:
            face = _central(faces, image.shape)
            chips["facefed_yunet"][path] = align_dlib_chip(image, face.landmarks)
        else:
            missed["facefed_yunet"] += 1
        seconds["facefed_yunet"] += time.perf_counter() - start

    embeddings = {
        m: dict(
            zip(
                chips[m], embedder.embed(np.stack(list(chips[m].values()))), strict=True
            )
        )
        for m in METHODS
    }
    same = np.array([int(r["same"]) for r in pairs])
    folds = np.array([int(r["fold"]) for r in pairs])
    results: dict[str, object] = {
        "pairs": len(pairs),
        "images": len(paths),
        "folds": args.folds,
        "missed_images": missed,
        "load_average_at_start": load,
        "machine": platform.processor() or platform.machine(),
        "methods": {},
    }
    for method in METHODS:
        vectors = embeddings[method]
        scores = np.array(
            [
                float(vectors[r["path1"]] @ vectors[r["path2"]])
                if r["path1"] in vectors and r["path2"] in vectors
                else -1.0
                for r in pairs
            ]
        )
        kfold = kfold_accuracy(scores, same, folds)
        entry = {
            "accuracy_mean": float(np.mean(kfold.accuracies)),
            "accuracies": kfold.accuracies,
        }
        if method != "dlib":
            common = [p for p in chips[method] if p in chips["dlib"]]
            entry["chip_mad_vs_dlib"] = float(
                np.mean(
                    [
                        np.abs(chips[method][p].astype(float) - chips["dlib"][p]).mean()
                        for p in common
                    ]
                )
            )
            entry["cosine_vs_dlib_median"] = float(
                np.median(
                    [embeddings[method][p] @ embeddings["dlib"][p] for p in common]
                )
            )
        results["methods"][method] = entry  # type: ignore[index]
    results["ms_per_image_detect_align"] = {
        k: 1000 * v / len(paths) for k, v in seconds.items()
    }

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "alignment.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"LFW folds {args.folds}: {len(pairs)} pairs, {len(paths)} images; "
        f"load average {load:.1f} at start (shared machine).",
        "",
        "| chip | k-fold accuracy | mean abs. gray-level diff. vs dlib chip | "
        "median cosine vs dlib chip's embedding | images without a face |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        entry = results["methods"][method]  # type: ignore[index]
        lines.append(
            f"| {method} | {entry['accuracy_mean']:.4f} | "
            f"{entry.get('chip_mad_vs_dlib', 0):.1f} | "
            f"{entry.get('cosine_vs_dlib_median', 1):.3f} | {missed[method]} |"
        )
    timing = results["ms_per_image_detect_align"]
    lines += [
        "",
        f"Detect + align per 250x250 image: dlib HOG (1 upsampling) + 5 points + "
        f"get_face_chip {timing['dlib']:.1f} ms, YuNet + align_dlib_chip "
        f"{timing['facefed_yunet']:.1f} ms.",
    ]
    (RESULTS / "alignment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
