"""Shipped recipes: ``ptqc compile --recipe NAME`` (``ptqc recipes`` lists them)."""
from pathlib import Path

DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in DIR.glob("*.yaml"))


def path(name: str) -> Path | None:
    p = DIR / f"{name}.yaml"
    return p if p.is_file() else None


def describe(name: str) -> str:
    """The recipe's first comment line."""
    for line in path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
