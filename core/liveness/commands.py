"""Commands this part adds to `facefed`: `liveness ...` and `eval liveness`."""

import json
from pathlib import Path
from typing import Annotated

import typer

liveness_app = typer.Typer(help="Presentation attack detection (liveness).")
challenge_app = typer.Typer(help="Interactive challenge-response liveness.")
liveness_app.add_typer(challenge_app, name="challenge")

DEFAULT_SHARED = Path("../shared/data")


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add this part's commands to the root app and the `eval` group."""
    app.add_typer(liveness_app, name="liveness")
    eval_app.command("liveness")(eval_liveness)


@liveness_app.command("check")
def check(
    images: Annotated[list[Path], typer.Argument(help="Image files to check.")],
    whole_image: Annotated[
        bool,
        typer.Option(
            "--whole-image",
            help="Treat each image as a tight face crop instead of detecting a face.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Run the silent liveness check on the largest face of each image.

    With several images, a file that cannot be read or shows no face is
    reported in its row and the others are still checked; the exit code is
    then that of the first such error (3: image, 4: no face).
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from facefed.core.errors import FaceError, FacefedError, ImageError
    from facefed.core.liveness import default_checker
    from facefed.core.liveness.faces import (
        default_face_finder,
        largest_face,
        read_rgb,
        whole_image_face,
    )

    _quiet_opencv()
    checker = default_checker()
    finder = None if whole_image else default_face_finder()
    table = Table("image", "live", "score", "network", "texture")
    refusals: list[str] = []
    first_error: FacefedError | None = None
    for path in images:
        try:
            image = read_rgb(path)
            face = (
                whole_image_face(image)
                if finder is None
                else largest_face(finder, image)
            )
            result = checker.check(image, face)
        except (ImageError, FaceError) as error:
            # One unreadable file or faceless photo must not hide the others.
            if len(images) == 1:
                raise
            first_error = first_error or error
            if as_json:
                typer.echo(json.dumps({"image": str(path), "error": str(error)}))
            else:
                table.add_row(escape(path.name), "[red]error[/red]", "", "", "")
                refusals.append(f"{path.name}: {error}")
            continue
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "image": str(path),
                        "is_live": result.is_live,
                        "score": round(result.score, 4),
                        "threshold": result.threshold,
                        "cues": {k: round(v, 4) for k, v in result.cues.items()},
                        "reasons": result.reasons,
                    }
                )
            )
            continue
        table.add_row(
            escape(path.name),
            "yes" if result.is_live else "[red]no[/red]",
            f"{result.score:.3f}",
            f"{result.cues['network']:.3f}",
            f"{result.cues['texture']:.3f}",
        )
        refusals += [f"{path.name}: {reason}" for reason in result.reasons[1:]]
    if not as_json:
        console = Console()
        console.print(table)
        console.print(f"threshold {checker.threshold:.3f}")
        for line in refusals:
            console.print(line, soft_wrap=True, markup=False)
    if first_error is not None:
        raise typer.Exit(code=first_error.exit_code)


@challenge_app.command("new")
def challenge_new(
    actions: Annotated[
        int, typer.Option(help="Number of actions (2 or 3); 0 = random.")
    ] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Write the challenge to this file.")
    ] = None,
) -> None:
    """Issue a signed challenge (JSON) with this installation's key."""
    from facefed.core.liveness.challenge import (
        ChallengeError,
        ChallengeIssuer,
        load_challenge_key,
    )
    from facefed.core.liveness.settings import get_liveness_settings

    issuer = ChallengeIssuer(
        key=load_challenge_key(), ttl_s=get_liveness_settings().challenge_ttl_s
    )
    challenge = issuer.issue(actions or None)
    text = json.dumps(challenge.to_dict(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        try:
            out.write_text(text + "\n")
        except OSError as error:
            raise ChallengeError(
                f"Cannot write the challenge to {out}: {error.strerror or error}."
            ) from None
        typer.echo(f"challenge written to {out}: {' then '.join(challenge.actions)}")


@challenge_app.command("verify")
def challenge_verify(
    frames: Annotated[Path, typer.Argument(help="Video file or folder of frames.")],
    challenge_file: Annotated[
        Path, typer.Option("--challenge", help="The challenge JSON file.")
    ],
    silent: Annotated[
        bool,
        typer.Option(help="Also run the silent check on frames of the recording."),
    ] = True,
) -> None:
    """Check a recorded response to a challenge; exits 4 when it fails."""
    from facefed.core.errors import SpoofError
    from facefed.core.liveness.challenge import (
        Challenge,
        ChallengeError,
        ChallengeVerifier,
        default_nonce_store,
        load_challenge_key,
    )
    from facefed.core.liveness.faces import read_frames

    _quiet_opencv()
    try:
        data = json.loads(challenge_file.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ChallengeError(
            f"Cannot read the challenge file {challenge_file}: {error}."
        ) from None
    challenge = Challenge.from_dict(data)
    recording = read_frames(frames)
    from facefed.core.liveness import default_checker

    verifier = ChallengeVerifier(
        key=load_challenge_key(),
        nonce_store=default_nonce_store(),
        silent=default_checker() if silent else None,
    )
    verdict = verifier.verify(challenge, recording)
    if verdict.outcomes:  # the frames were looked at: the challenge itself was valid
        actions = " then ".join(challenge.actions)
        typer.echo(f"{len(recording)} frames, actions: {actions}")
    for outcome in verdict.outcomes:
        typer.echo(f"  {'pass' if outcome.passed else 'FAIL'}  {outcome.reason}")
    failed_actions = {o.reason for o in verdict.outcomes if not o.passed}
    for reason in verdict.reasons:
        if reason not in failed_actions and verdict.outcomes:
            typer.echo(f"  FAIL  {reason}")
    if not verdict.passed:
        raise SpoofError(
            "The liveness challenge failed: " + " ".join(verdict.reasons),
            verdict.reasons,
        ) from None
    typer.echo("challenge passed")


def _quiet_opencv() -> None:
    """Hide OpenCV's notice that its new graph engine ignores target hints."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def eval_liveness(
    data: Annotated[
        Path, typer.Option(help="Folder holding antispoof/ and labels/.")
    ] = DEFAULT_SHARED,
    labels: Annotated[
        Path | None,
        typer.Option(help="Label CSV; default DATA/labels/antispoof_labels.csv."),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for the JSON, CSV and DET PNG.")
    ] = Path("liveness-eval"),
    calibrate: Annotated[
        bool, typer.Option(help="Also print the threshold the calibration rule picks.")
    ] = False,
    max_apcer: Annotated[
        float, typer.Option(help="Calibration: worst-species APCER allowed.")
    ] = 0.05,
    bona_fide: Annotated[
        Path | None,
        typer.Option(help="Folder of extra live photos; their BPCER is reported."),
    ] = None,
) -> None:
    """APCER/BPCER (ISO/IEC 30107-3) of the silent check on a labelled set."""
    from facefed.core.liveness.report import run_evaluation

    run_evaluation(
        data,
        labels or data / "labels" / "antispoof_labels.csv",
        out,
        calibrate=calibrate,
        max_apcer=max_apcer,
        bona_fide=bona_fide,
    )
