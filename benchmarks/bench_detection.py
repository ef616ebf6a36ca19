"""Detect + align time and peak memory of every detector, beside dlib HOG + 5 points.

Run: `.venv/bin/python -m benchmarks.bench_detection [--repeats N]`.

Each detector runs in its own subprocess (one thread for numpy, OpenCV,
onnxruntime and torch, so the figures compare algorithms, not core counts);
the subprocess reports its timings and its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which covers native allocations
that tracemalloc cannot see). The reference, dlib's HOG detector upsampled once
with its 5-point shape predictor and `get_face_chip`, runs the same way in the
same run. Test images are real photos from tests/data, resized and padded to
640x480 and 1920x1080: one face (an LFW portrait) and many faces (six people).
Writes benchmarks/results/detection.{json,md} and the detection section of
BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import replace_section

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = REPO / "tests" / "data"
RESULTS = REPO / "benchmarks" / "results"
REFERENCE = "dlib-hog+5pt"
DETECTORS = (REFERENCE, "yunet", "retinaface", "mtcnn", "hog", "cnn")
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}
SCENES = {
    "one face": TEST_DATA / "lfw" / "Arnold_Palmer" / "Arnold_Palmer_0001.jpg",
    "many faces": TEST_DATA / "detection" / "facenet_pytorch_multiface.jpg",
}
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "FACEFED_THREADS": "1",
}
TIME_BUDGET_S = 6.0


def letterbox(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to fit ``size`` (width, height) keeping the aspect, pad with grey."""
    import cv2

    width, height = size
    scale = min(width / image.shape[1], height / image.shape[0])
    new_w, new_h = round(image.shape[1] * scale), round(image.shape[0] * scale)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    canvas = np.full((height, width, 3), 114, dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def make_images() -> dict[str, np.ndarray]:
    """The four benchmark images, RGB uint8, keyed '<scene> @ <size>'."""
    import cv2

    images = {}
    for scene, path in SCENES.items():
        source = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if source is None:
            raise SystemExit(f"benchmark image missing: {path}")
        rgb = np.ascontiguousarray(source[:, :, ::-1])
        for label, size in SIZES.items():
            images[f"{scene} @ {label}"] = letterbox(rgb, size)
    return images


def _reference_runner():
    """dlib HOG (upsample 1) + 5-point predictor + 150 px chip."""
    import dlib
    import face_recognition_models

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(
        face_recognition_models.pose_predictor_five_point_model_location()
    )

    def run(image: np.ndarray) -> int:
        rects = detector(image, 1)
        for rect in rects:
            shape = predictor(image, rect)
            dlib.get_face_chip(image, shape, size=150, padding=0.25)
        return len(rects)

    return run


def _facefed_runner(spec: str):
    """facefed detector from the registry + ArcFace 112 px alignment per face."""
    from facefed.core.align import align_arcface
    from facefed.core.detection.registry import create_detector

    detector = create_detector(spec)

    def run(image: np.ndarray) -> int:
        faces = detector.detect(image)
        for face in faces:
            if face.landmarks is not None:
                align_arcface(image, face.landmarks, size=112)
        return len(faces)

    return run


def worker(spec: str, repeats: int) -> dict[str, object]:
    """Time one detector on every image; runs inside its own subprocess."""
    images = make_images()
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_start = time.perf_counter()
    run = _reference_runner() if spec == REFERENCE else _facefed_runner(spec)
    load_s = time.perf_counter() - load_start
    if "torch" in sys.modules:  # only where the detector itself uses torch
        sys.modules["torch"].set_num_threads(1)
    cases = {}
    for name, image in images.items():
        faces = run(image)  # warm-up, and the face count
        times = []
        budget_end = time.perf_counter() + TIME_BUDGET_S
        while len(times) < repeats and (
            len(times) < 2 or time.perf_counter() < budget_end
        ):
            start = time.perf_counter()
            run(image)
            times.append(time.perf_counter() - start)
        cases[name] = {
            "faces": faces,
            "median_ms": statistics.median(times) * 1000,
            "min_ms": min(times) * 1000,
            "runs": len(times),
        }
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "detector": spec,
        "load_s": load_s,
        "cases": cases,
        "peak_rss_mb": peak_kb / 1024,
        "baseline_rss_mb": baseline_kb / 1024,
    }


def run_subprocess(spec: str, repeats: int) -> dict[str, object]:
    """Run ``worker`` for one detector in a fresh single-threaded interpreter."""
    env = {**os.environ, **SINGLE_THREAD_ENV}
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "benchmarks.bench_detection"),
            *("--worker", spec, "--repeats", str(repeats)),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"detector": spec, "error": " | ".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load_average() -> str:
    """The 1-minute load average, to show how busy the machine was."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def to_markdown(results: dict[str, object]) -> str:
    """The results as a Markdown table with the speed-up over the reference."""
    reports = results["detectors"]
    assert isinstance(reports, list)
    reference = next((r for r in reports if r["detector"] == REFERENCE), None)
    case_names = list(next(r for r in reports if "cases" in r)["cases"])
    header = ["detector", *case_names, "peak RSS (MB)", "load (s)"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for report in reports:
        if "error" in report:
            lines.append(f"| {report['detector']} | failed: {report['error']} |")
            continue
        cells = [report["detector"]]
        for name in case_names:
            case = report["cases"][name]
            faces = f"{case['faces']} face{'' if case['faces'] == 1 else 's'}"
            cell = f"{case['median_ms']:.1f} ms ({faces})"
            if reference and "cases" in reference and report is not reference:
                ratio = reference["cases"][name]["median_ms"] / case["median_ms"]
                cell += f", {ratio:.2g}x"
            cells.append(cell)
        cells += [f"{report['peak_rss_mb']:.0f}", f"{report['load_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    target = results.get("target")
    notes = [
        "",
        "Median of repeated runs, detect + align every face (facefed: ArcFace "
        "112 px warp; reference: dlib HOG upsample 1 + 5-point predictor + "
        "150 px `get_face_chip`). `Nx` = speed-up over the reference on the same "
        "image. One thread per process. Peak RSS = `ru_maxrss` of the process "
        "that loaded only that detector (includes Python, numpy and OpenCV, "
        f"about {results['baseline_rss_mb']:.0f} MB before the detector and its "
        "libraries are loaded).",
        f"Machine: {results['machine']}; load average at start "
        f"{results['load_average']}.",
    ]
    if target:
        notes.append(f"Target: {target}")
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    """Run every detector, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="Rewrite the Markdown outputs from results/detection.json, no runs.",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return
    if args.markdown_only:
        write_outputs(json.loads((RESULTS / "detection.json").read_text()))
        return
    load_average = _load_average()
    reports = []
    for spec in [s.strip() for s in args.detectors.split(",") if s.strip()]:
        print(f"benchmarking {spec} ...", flush=True)
        reports.append(run_subprocess(spec, args.repeats))
    ok = [r for r in reports if "cases" in r]
    if not ok:
        raise SystemExit("every detector failed: " + json.dumps(reports))
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average": load_average,
        "baseline_rss_mb": min(r["baseline_rss_mb"] for r in ok),
        "detectors": reports,
    }
    yunet = next((r for r in ok if r["detector"] == "yunet"), None)
    reference = next((r for r in ok if r["detector"] == REFERENCE), None)
    if yunet and reference:
        key = "one face @ 640x480"
        speedup = (
            reference["cases"][key]["median_ms"] / yunet["cases"][key]["median_ms"]
        )
        results["target"] = (
            f"default (YuNet) detect+align of a 640x480 one-face photo at least 5x "
            f"faster than dlib HOG+5pt: measured {speedup:.1f}x "
            f"({'met' if speedup >= 5 else 'NOT met'})."
        )
    results["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detection.json").write_text(json.dumps(results, indent=2) + "\n")
    write_outputs(results)


def write_outputs(results: dict[str, object]) -> None:
    """Write detection.md and the BENCHMARKS.md section from the results."""
    markdown = to_markdown(results)
    (RESULTS / "detection.md").write_text("# Detection benchmark\n\n" + markdown)
    measured_at = str(results.get("measured_at", "unknown time"))
    replace_section(
        "detection",
        "## Detection\n\nGenerated by `python -m benchmarks.bench_detection` "
        f"(measured {measured_at}).\n\n" + markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
