"""Embedding speed: our ONNX ResNet (onnxruntime) beside dlib's face descriptor.

Run: `.venv/bin/python -m benchmarks.bench_embedding [--repeats N] [--threads T]`.

Both run in this process on the same 150x150 chips (made by dlib's HOG
detector, 5-point predictor and get_face_chip from tests/data/lfw), at batch
1 and batch 32, one pass per chip (what dlib computes) and with the default
flip test-time augmentation (two passes); PyTorch (the training form of the
same network) is timed too.
onnxruntime and torch get `--threads` threads (default 1, one core each
side; dlib keeps its own default threading). Times are medians
after a warm-up, the contenders taking turns in every repeat so they share
the same background load. Writes benchmarks/results/embedding.{json,md} and
the embedding section of BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.report import load_note, replace_section

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TARGET_SPEEDUP = 8.0
BATCHES = (1, 32)


def _interleaved_medians(
    functions: dict[str, Callable[[], object]], repeats: int
) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns every repeat.

    Taking turns exposes every contender to the same background load, which
    matters on a shared machine.
    """
    for function in functions.values():
        function()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _chips(count: int):
    import dlib
    import face_recognition_models as frm
    import numpy as np
    from PIL import Image

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    chips = []
    for path in sorted((REPO / "tests" / "data" / "lfw").glob("*/*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB"))
        boxes = detector(image, 1)
        if boxes:
            chips.append(
                dlib.get_face_chip(image, predictor(image, boxes[0]), 150, 0.25)
            )
        if len(chips) == count:
            break
    return np.stack(chips)


def run(repeats: int, threads: int) -> dict[str, object]:
    os.environ["FACEFED_THREADS"] = str(threads)
    import dlib
    import face_recognition_models as frm
    import numpy as np
    import torch

    from facefed.core.settings import get_core_settings
    from facefed.models.dlib_resnet import load_dlib_resnet
    from facefed.models.zoo import load_default_embedder

    get_core_settings.cache_clear()
    torch.set_num_threads(threads)
    chips = _chips(max(BATCHES))
    reference = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    embedder = load_default_embedder()
    network = load_dlib_resnet()

    def torch_embed(batch: np.ndarray) -> object:
        with torch.no_grad():
            return network(torch.from_numpy(batch).permute(0, 3, 1, 2).float())

    rows = []
    for size in BATCHES:
        batch = chips[:size]
        as_list = list(batch)
        times = _interleaved_medians(
            {
                "dlib": lambda as_list=as_list: reference.compute_face_descriptor(
                    as_list
                ),
                "onnx": lambda batch=batch: embedder.embed_raw(batch),
                "flip": lambda batch=batch: embedder.embed(batch),
                "torch": lambda batch=batch: torch_embed(batch),
            },
            repeats,
        )
        dlib_time, onnx_time = times["dlib"], times["onnx"]
        flip_time, torch_time = times["flip"], times["torch"]
        rows.append(
            {
                "batch": size,
                "dlib_ms_per_face": 1000 * dlib_time / size,
                "onnxruntime_ms_per_face": 1000 * onnx_time / size,
                "onnxruntime_flip_ms_per_face": 1000 * flip_time / size,
                "torch_ms_per_face": 1000 * torch_time / size,
                "speedup_onnx_vs_dlib": dlib_time / onnx_time,
                "speedup_onnx_flip_vs_dlib": dlib_time / flip_time,
            }
        )
    ours = embedder.embed_raw(chips[:8])
    theirs = np.array(reference.compute_face_descriptor(list(chips[:8])))
    return {
        "rows": rows,
        "max_abs_difference_vs_dlib": float(np.abs(ours - theirs).max()),
        "providers": embedder.providers,
        "model_id": embedder.metadata.model_id,
    }


def render_markdown(report: dict) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']}; onnxruntime and torch "
        f"with {report['threads']} thread(s), dlib {report['dlib_version']} with "
        f"its default threading; {report['load_note']}",
        "",
        "| batch | dlib compute_face_descriptor | ours, onnxruntime, one pass | "
        "speed-up | ours, onnxruntime, + flip (default) | speed-up | "
        "ours, PyTorch, one pass |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['batch']} | {row['dlib_ms_per_face']:.1f} ms/face | "
            f"{row['onnxruntime_ms_per_face']:.2f} ms/face | "
            f"{row['speedup_onnx_vs_dlib']:.1f}x | "
            f"{row['onnxruntime_flip_ms_per_face']:.2f} ms/face | "
            f"{row['speedup_onnx_flip_vs_dlib']:.1f}x | "
            f"{row['torch_ms_per_face']:.2f} ms/face |"
        )
    lines += [
        "",
        f"Target: at least {TARGET_SPEEDUP:g}x at batch 1 and 32. One pass is the "
        "same computation as dlib's descriptor (same chips, same weights: max "
        f"|ours - dlib| = {report['max_abs_difference_vs_dlib']:.1e} per element); "
        "the default pipeline adds the mirrored chip (flip test-time augmentation, "
        "twice the work). Model "
        f"{report['model_id']}, providers {report['providers']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--load-note",
        default=load_note(),
        help="How busy the machine was (default: its measured load average).",
    )
    arguments = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(arguments.threads))
    import dlib

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": arguments.threads,
        "dlib_version": dlib.__version__,
        "load_note": arguments.load_note,
        **run(arguments.repeats, arguments.threads),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embedding.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (RESULTS / "embedding.md").write_text(markdown)
    replace_section("embedding", "## Embedding: ONNX ResNet vs dlib\n\n" + markdown)
    print(markdown)


if __name__ == "__main__":
    main()
