"""Writing one benchmark's section of BENCHMARKS.md, leaving the others alone."""

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
SECTIONS = (
    "detection",
    "embedding",
    "liveness",
    "gallery",
    "privacy",
    "federated",
)
_MARKER = "<!-- section: {} -->"


def replace_section(section: str, body: str, *, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text under `<!-- section: NAME -->` up to the next marker.

    Args:
        section: Name of the section, one of `SECTIONS` or a new one (appended).
        body: Markdown to put under the marker, heading included.
        path: The file to edit; created with every known marker when absent.
    """
    if path.exists():
        text = path.read_text()
    else:
        text = "# Benchmarks\n\n" + "".join(
            _MARKER.format(name) + "\n\n" for name in SECTIONS
        )
    marker = _MARKER.format(section)
    if marker not in text:
        text = text.rstrip("\n") + f"\n\n{marker}\n"

    start = text.index(marker) + len(marker)
    following = text.find("<!-- section: ", start)
    end = following if following != -1 else len(text)
    path.write_text(text[:start] + "\n\n" + body.strip("\n") + "\n\n" + text[end:])


def load_note() -> str:
    """How busy the machine was when a benchmark started, as measured, not assumed."""
    import os

    one_minute = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = "quiet" if one_minute < 1.0 else "shared"
    return (
        f"{busy} machine: 1-minute load average {one_minute:.1f} at start "
        f"on {cores} cores."
    )
