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
    dlib5 = "dlib5"


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
            help="Write the image with boxes and landmarks drawn to this file "
            "(.png, .jpg or .webp; with several images: one file each, named "
            "OUT_<image>.png).",
        ),
    ] = None,
) -> None:
    """Find faces and their five landmarks in images."""
    from facefed.core.detection.registry import create_detector
    from facefed.core.errors import ImageError
    from facefed.core.image import decode_image
    from facefed.core.settings import get_core_settings

    _quiet_opencv()
    targets = _draw_targets(draw, images) if draw is not None else None
    face_detector = create_detector(detector or get_core_settings().detector)
    results: list[dict[str, Any]] = []
    failed = 0
    for index, path in enumerate(_progress(images, "Detecting faces")):
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
        if targets is not None:
            _draw(image, faces, targets[index])

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
            help=(
                "arcface: 112x112 ArcFace template; dlib: dlib's 150x150 chip; "
                "dlib5: dlib's chip from dlib's own 5-point model, as "
                "dlib.get_face_chip cuts it (best with --detector hog)."
            ),
        ),
    ] = GeometryChoice.arcface,
    detector: Annotated[
        str | None, typer.Option("--detector", "-d", help=_DETECTOR_HELP)
    ] = None,
) -> None:
    """Cut an aligned chip of every face into OUT as <image>_<n>.png."""
    from PIL import Image

    from facefed.core.align import align as align_chip
    from facefed.core.align import align_dlib_chip_from_dlib5
    from facefed.core.detection.dlib_detectors import dlib5_landmarks
    from facefed.core.detection.registry import create_detector
    from facefed.core.errors import ImageError
    from facefed.core.image import decode_image
    from facefed.core.settings import get_core_settings

    _quiet_opencv()
    _check_output_folder(out)
    stems = _unique_stems(images)
    face_detector = create_detector(detector or get_core_settings().detector)
    written = skipped = failed = 0
    for path, stem in zip(_progress(images, "Aligning faces"), stems, strict=True):
        try:
            image = decode_image(path)
        except ImageError as error:
            if len(images) == 1:
                raise
            failed += 1
            logger.error("%s: %s", path, error)
            continue
        for number, face in enumerate(face_detector.detect(image), start=1):
            if face.landmarks is None and geometry is not GeometryChoice.dlib5:
                skipped += 1
                continue
            if geometry is GeometryChoice.dlib5:
                points = dlib5_landmarks(image, face.box)
                chip = align_dlib_chip_from_dlib5(image, points)
            else:
                chip = align_chip(image, face.landmarks, geometry=geometry.value)
            _save(Image.fromarray(chip), out / f"{stem}_{number}.png", "PNG")
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
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Faces found by {escape(detector_name)}")
    for column in (
        "image",
        "face",
        "box (x1, y1, x2, y2)",
        "score",
        "eyes (left, right)",
    ):
        table.add_column(column)
    for result in results:
        # File names and messages are text, not rich markup: "[/x].jpg" is a
        # valid file name.
        name = escape(Path(result["image"]).name)
        if "error" in result:
            table.add_row(name, "-", escape(result["error"]), "", "")
            continue
        if not result["faces"]:
            table.add_row(name, "0", "no face", "", "")
        for number, face in enumerate(result["faces"], start=1):
            eyes = ""
            if "landmarks" in face:
                (lx, ly), (rx, ry) = face["landmarks"][:2]
                eyes = f"({lx:.0f}, {ly:.0f}) ({rx:.0f}, {ry:.0f})"
            box = ", ".join(f"{v:.0f}" for v in face["box"])
            table.add_row(name, str(number), box, f"{face['score']:.3f}", eyes)
    Console().print(table)


# Formats `--draw` writes, by file suffix.
_DRAW_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _draw_targets(draw: Path, images: list[Path]) -> list[Path]:
    """Check `--draw` before any work and name one output file per image.

    Raises:
        ConfigurationError: An unknown suffix, a folder given as the file, or a
            place that cannot be written.
    """
    from facefed.core.errors import ConfigurationError

    if draw.suffix.lower() not in _DRAW_FORMATS:
        raise ConfigurationError(
            f"--draw {str(draw)!r} needs a file name ending in one of "
            f"{', '.join(sorted(_DRAW_FORMATS))}."
        )
    if draw.is_dir():
        raise ConfigurationError(f"--draw {str(draw)!r} is a folder, not a file.")
    _check_output_folder(draw.parent, option="--draw")
    if len(images) == 1:
        return [draw]
    return [
        draw.with_name(f"{draw.stem}_{stem}{draw.suffix}")
        for stem in _unique_stems(images)
    ]


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems for naming outputs, with `-2`, `-3`... added to repeats.

    Two inputs with the same name in different folders (a/1.jpg, b/1.jpg)
    would otherwise overwrite each other's outputs.
    """
    taken: set[str] = set()
    stems = []
    for path in paths:
        stem, count = path.stem, 1
        while stem in taken:
            count += 1
            stem = f"{path.stem}-{count}"
        taken.add(stem)
        stems.append(stem)
    return stems


def _check_output_folder(folder: Path, *, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be created or written.

    Nothing is created here: the folder is made when the first file is saved,
    so a run that fails on its inputs leaves no trace.

    Raises:
        ConfigurationError: The path or one of its parents is a file, or the
            nearest existing folder is not writable.
    """
    import os

    from facefed.core.errors import ConfigurationError

    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigurationError(f"{option} {str(folder)!r} is a broken link.")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigurationError(
            f"{option} {str(folder)!r} cannot be a folder: {str(existing)!r} is a file."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"{option} {str(folder)!r}: the folder {str(existing)!r} is not writable."
        )


def _save(picture: Any, target: Path, image_format: str) -> None:
    """Save a Pillow image, creating its folder; an OS error becomes a clear one."""
    from facefed.core.errors import ConfigurationError

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, format=image_format)
    except OSError as error:
        raise ConfigurationError(
            f"Cannot write {str(target)!r}: {error.strerror or error}."
        ) from None


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
    _save(Image.fromarray(canvas), target, _DRAW_FORMATS[target.suffix.lower()])
