"""`facefed detect` and `facefed align`: the face pipeline's first steps on files."""

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from facefed.core.types import Face, ImageArray

logger = logging.getLogger(__name__)


class GeometryChoice(StrEnum):
    """Chip geometries `facefed align` can cut."""

    arcface = "arcface"
    dlib = "dlib"


_DETECTOR_HELP = (
    "Detector: yunet, retinaface, mtcnn, hog, cnn or scrfd:PATH "
    "(default: the FACEFED_DETECTOR setting, yunet)."
)
# BGR-free RGB colours for the five landmarks, in facefed's order.
_LANDMARK_COLOURS = (
    (255, 64, 64),
    (64, 160, 255),
    (64, 220, 64),
    (255, 200, 0),
    (220, 64, 255),
)


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add `detect` and `align` to the root app."""
    app.command("detect")(detect)
    app.command("align")(align)


def detect(
    images: Annotated[
        list[Path], typer.Argument(help="Image files (JPEG, PNG, WebP, BMP).")
    ],
    detector: Annotated[
        str | None, typer.Option("--detector", "-d", help=_DETECTOR_HELP)
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    draw: Annotated[
        Path | None,
        typer.Option(
            "--draw",
            help="Write the image with boxes and landmarks drawn to this PNG "
            "(with several images: one file each, named OUT_<image>.png).",
        ),
    ] = None,
) -> None:
    """Find faces and their five landmarks in images."""
    from facefed.core.detection.registry import create_detector
    from facefed.core.errors import ImageError
    from facefed.core.image import decode_image
    from facefed.core.settings import get_core_settings

    _quiet_opencv()
    face_detector = create_detector(detector or get_core_settings().detector)
    results: list[dict[str, Any]] = []
    failed = 0
    for path in _progress(images, "Detecting faces"):
        try:
            image = decode_image(path)
        except ImageError as error:
            if len(images) == 1:
                raise
            failed += 1
            results.append({"image": str(path), "error": str(error)})
            continue
        faces = face_detector.detect(image)
        results.append({"image": str(path), "faces": [_face_json(f) for f in faces]})
        if draw is not None:
            _draw(image, faces, _draw_path(draw, path, len(images)))

    if as_json:
        typer.echo(json.dumps({"detector": face_detector.name, "images": results}))
    else:
        _print_table(face_detector.name, results)
    if failed:
        raise typer.Exit(code=ImageError.exit_code)


def align(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the chips.")],
    geometry: Annotated[
        GeometryChoice,
        typer.Option(
            "--geometry",
            "-g",
            help="arcface: 112x112 ArcFace template; dlib: dlib's 150x150 chip.",
        ),
    ] = GeometryChoice.arcface,
    detector: Annotated[
        str | None, typer.Option("--detector", "-d", help=_DETECTOR_HELP)
    ] = None,
) -> None:
    """Cut an aligned chip of every face into OUT as <image>_<n>.png."""
    from PIL import Image

    from facefed.core.align import align as align_chip
    from facefed.core.detection.registry import create_detector
    from facefed.core.errors import ImageError
    from facefed.core.image import decode_image
    from facefed.core.settings import get_core_settings

    _quiet_opencv()
    face_detector = create_detector(detector or get_core_settings().detector)
    out.mkdir(parents=True, exist_ok=True)
    written = skipped = failed = 0
    for path in _progress(images, "Aligning faces"):
        try:
            image = decode_image(path)
        except ImageError as error:
            if len(images) == 1:
                raise
            failed += 1
            logger.error("%s: %s", path, error)
            continue
        for number, face in enumerate(face_detector.detect(image), start=1):
            if face.landmarks is None:
                skipped += 1
                continue
            chip = align_chip(image, face.landmarks, geometry=geometry.value)
            Image.fromarray(chip).save(out / f"{path.stem}_{number}.png")
            written += 1
    typer.echo(f"Wrote {written} {geometry.value} chips to {out}.")
    if skipped:
        typer.echo(f"Skipped {skipped} faces without landmarks.")
    if failed:
        typer.echo(f"{failed} images could not be read.")
        raise typer.Exit(code=ImageError.exit_code)


def _quiet_opencv() -> None:
    """Hide OpenCV's notice that its new graph engine ignores target hints."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _progress(paths: list[Path], label: str) -> Any:
    """Iterate with a progress bar on stderr when there is more than one file."""
    if len(paths) < 2:
        return iter(paths)
    from rich.progress import track

    from facefed.core.cli import error_console

    return track(paths, description=label, console=error_console, transient=True)


def _face_json(face: "Face") -> dict[str, Any]:
    entry: dict[str, Any] = {
        "box": [round(float(v), 1) for v in face.box],
        "score": round(face.score, 4),
    }
    if face.landmarks is not None:
        entry["landmarks"] = [
            [round(float(x), 1), round(float(y), 1)] for x, y in face.landmarks
        ]
    return entry


def _print_table(detector_name: str, results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Faces found by {detector_name}")
    for column in (
        "image",
        "face",
        "box (x1, y1, x2, y2)",
        "score",
        "eyes (left, right)",
    ):
        table.add_column(column)
    for result in results:
        if "error" in result:
            table.add_row(Path(result["image"]).name, "-", result["error"], "", "")
            continue
        if not result["faces"]:
            table.add_row(Path(result["image"]).name, "0", "no face", "", "")
        for number, face in enumerate(result["faces"], start=1):
            eyes = ""
            if "landmarks" in face:
                (lx, ly), (rx, ry) = face["landmarks"][:2]
                eyes = f"({lx:.0f}, {ly:.0f}) ({rx:.0f}, {ry:.0f})"
            box = ", ".join(f"{v:.0f}" for v in face["box"])
            name = Path(result["image"]).name
            table.add_row(name, str(number), box, f"{face['score']:.3f}", eyes)
    Console().print(table)


def _draw_path(draw: Path, image_path: Path, count: int) -> Path:
    if count == 1:
        return draw
    return draw.with_name(f"{draw.stem}_{image_path.stem}{draw.suffix or '.png'}")


def _draw(image: "ImageArray", faces: list["Face"], target: Path) -> None:
    import cv2
    from PIL import Image

    canvas = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for face in faces:
        x1, y1, x2, y2 = (round(float(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        label = f"{face.score:.2f}"
        cv2.putText(
            canvas,
            label,
            (x1, max(10, y1 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            (0, 255, 0),
            thickness,
        )
        if face.landmarks is None:
            continue
        for (x, y), colour in zip(face.landmarks, _LANDMARK_COLOURS, strict=True):
            cv2.circle(
                canvas, (round(float(x)), round(float(y))), 2 * thickness, colour, -1
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(target)
