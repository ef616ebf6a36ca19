"""Maps the top-level folders onto the `facefed` namespace (see pyproject.toml)."""

from pathlib import Path

from setuptools import find_packages, setup

PARTS = ("core", "models", "privacy", "client", "server")
DATA_SUFFIXES = (
    "*.onnx",
    "*.pth",
    "*.pt",
    "*.json",
    "*.txt",
    "*.md",
    "*.ini",
    "*.mako",
)


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for part in PARTS:
        for name in [part, *find_packages(where=".", include=[f"{part}.*"])]:
            dotted = f"facefed.{name}"
            packages.append(dotted)
            package_dir[dotted] = str(Path(*name.split(".")))
    return packages, package_dir


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    # "**/" also ships files in data folders that are not packages themselves.
    package_data={
        name: [
            pattern for suffix in DATA_SUFFIXES for pattern in (suffix, f"**/{suffix}")
        ]
        for name in packages
    },
)
