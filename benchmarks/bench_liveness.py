"""Time per face of each liveness cue, beside the face detector in the same run.

Run: `.venv/bin/python -m benchmarks.bench_liveness [--repeats N]`.

Everything runs in this process with one thread for onnxruntime, OpenCV and
numpy, on real frames from tests/data: the three Silent-Face frames (640x480
portrait) and three LFW photos (250x250). The reference is the detector the
checks follow in the pipeline (`create_detector("yunet")` on the same frame),
and dlib's HOG detector as a second familiar figure. Times are medians over
the frames of each frame's median after a warm-up. Writes
benchmarks/results/liveness.{json,md} and the liveness section of BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.report import replace_section

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FACEFED_THREADS", "1")


REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
FRAMES = (
    "antispoof/image_T1.jpg",
    "antispoof/image_F1.jpg",
    "antispoof/image_F2.jpg",
    "liveness/Amelie_Mauresmo_0007.jpg",
    "lfw/Ann_Veneman/Ann_Veneman_0001.jpg",
    "lfw/Bill_Frist/Bill_Frist_0001.jpg",
)


def _median_time(function: Callable[[], object], repeats: int) -> float:
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _network(network: Any, image: Any, face: Any) -> object:
    return network.live_probability(network.crop(image, face.box)[None])


def run(repeats: int) -> dict[str, Any]:
    """Time every stage on every frame; return the report."""
    import cv2
    import dlib

    from facefed.core.detection.registry import create_detector
    from facefed.core.liveness import default_checker
    from facefed.core.liveness.faces import largest_face, read_rgb
    from facefed.core.liveness.landmarks import landmarks68, measure_face
    from facefed.core.liveness.texture import measure_texture

    cv2.setNumThreads(1)
    detector = create_detector("yunet")
    hog = dlib.get_frontal_face_detector()
    checker = default_checker()
    v2, v1se = checker.networks
    stages: dict[str, list[float]] = {}
    for relative in FRAMES:
        image = read_rgb(REPO / "tests" / "data" / relative)
        face = largest_face(detector, image)
        calls: dict[str, Callable[[], object]] = {
            "detector_yunet": partial(detector.detect, image),
            "detector_dlib_hog": partial(hog, image, 0),
            "minifasnet_v2": partial(_network, v2, image, face),
            "minifasnet_v1se": partial(_network, v1se, image, face),
            "texture_cues": partial(measure_texture, image, face.box),
            "silent_check_total": partial(checker.check, image, face),
            "landmarks68": partial(landmarks68, image, face),
            "challenge_frame_measures": partial(measure_face, image, face),
        }
        for name, call in calls.items():
            stages.setdefault(name, []).append(_median_time(call, repeats))
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": os.getloadavg(),
        "threads": 1,
        "repeats": repeats,
        "frames": list(FRAMES),
        "median_ms": {
            k: round(statistics.median(v) * 1e3, 3) for k, v in stages.items()
        },
        "max_ms": {k: round(max(v) * 1e3, 3) for k, v in stages.items()},
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


LABELS = {
    "detector_yunet": "reference: YuNet detection of the whole frame",
    "detector_dlib_hog": "reference: dlib HOG detection, no upsampling",
    "minifasnet_v2": "MiniFASNetV2 (2.7x crop, 80x80, onnxruntime)",
    "minifasnet_v1se": "MiniFASNetV1SE (4.0x crop, 80x80, onnxruntime)",
    "texture_cues": "weight-free cues (chroma spread + moire spectrum)",
    "silent_check_total": "silent check, all cues and fusion",
    "landmarks68": "dlib 68 landmarks (challenge)",
    "challenge_frame_measures": "challenge, per frame: 68 points, EAR, MAR, solvePnP",
}


def markdown(report: dict[str, Any]) -> str:
    """The table for BENCHMARKS.md and results/liveness.md."""
    median = report["median_ms"]
    worst = report["max_ms"]
    lines = [
        "## Liveness: time per face",
        "",
        f"Measured {report['measured_at']} on {report['machine']}, one thread, "
        f"{report['repeats']} repeats per frame on {len(FRAMES)} real frames "
        "(3 Silent-Face 640x480, 3 LFW 250x250); load average at start "
        f"{report['load_average_at_start'][0]:.1f}.",
        "",
        "| stage | median ms per face | slowest frame ms |",
        "| --- | --- | --- |",
    ]
    for key, label in LABELS.items():
        lines.append(f"| {label} | {median[key]:.2f} | {worst[key]:.2f} |")
    lines += [
        "",
        "The silent check adds about "
        f"{median['silent_check_total'] / median['detector_yunet']:.1f}x the "
        "YuNet detection time per face; a 3-action challenge over a 60-frame "
        f"recording costs about {60 * median['challenge_frame_measures'] / 1e3:.1f} s "
        "of landmarking plus the detections.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    report = run(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "liveness.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (RESULTS / "liveness.md").write_text(text)
    replace_section("liveness", text)
    print(text)


if __name__ == "__main__":
    main()
