"""MkDocs hooks (mkdocs.yml ``hooks:``): the docs link to files outside ``docs/`` as they lie in the
repository (``../images/demo_run/run.txt``, ``../benchmarks/README.md``, ``../README.md``), so that the
same links work when the Markdown is read on a forge. MkDocs only knows files under ``docs/``, so:

- ``on_files`` adds every repository file such a link names (and, for Markdown, the files its own links
  name) to the site under ``repo/<path>``;
- ``on_page_markdown`` rewrites each such link to that place, relative to the page.

A link to a file that does not exist is left as written, so MkDocs' own check reports it and
``mkdocs build --strict`` fails.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]
PREFIX = "repo"
# inline links and images: [text](target) / ![alt](target), target without spaces, optional title
LINK = re.compile(r"(\]\()([^)\s#]*)(#[^)\s]*)?((?:\s+\"[^\"]*\")?\))")
FENCE = re.compile(r"^(```|~~~)")


def _outside_prose(text: str):
    """The lines of ``text`` with a flag: True for lines outside fenced code blocks."""
    fenced = False
    for line in text.split("\n"):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            yield line, False
        else:
            yield line, not fenced


def _target(source: Path, link: str) -> Path | None:
    """The repository file a relative ``link`` in ``source`` names, if it is one."""
    if not link or re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("/"):
        return None
    path = (source.parent / link).resolve()
    return path if path.is_file() and REPO in path.parents else None


def _site_uri(path: Path, docs: Path) -> str:
    """Where ``path`` lies in the site: its place under docs/, else ``repo/<repository path>``."""
    if docs in path.parents:
        return path.relative_to(docs).as_posix()
    return f"{PREFIX}/{path.relative_to(REPO).as_posix()}"


def on_files(files: Files, config) -> Files:
    docs = Path(config.docs_dir).resolve()
    queue = [Path(f.abs_src_path) for f in files.documentation_pages()]
    added: set[Path] = set()
    while queue:
        source = queue.pop()
        for line, prose in _outside_prose(source.read_text(encoding="utf-8")):
            for match in LINK.finditer(line) if prose else ():
                path = _target(source, match.group(2))
                if path is None or docs in path.parents or path in added:
                    continue
                added.add(path)
                files.append(File.generated(config, _site_uri(path, docs), abs_src_path=str(path)))
                if path.suffix == ".md":
                    queue.append(path)
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    docs = Path(config.docs_dir).resolve()
    source = Path(page.file.abs_src_path).resolve()
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        path = _target(source, match.group(2))
        if path is None:
            return match.group(0)
        link = posixpath.relpath(_site_uri(path, docs), here or ".")
        return f"{match.group(1)}{link}{match.group(3) or ''}{match.group(4)}"

    return "\n".join(LINK.sub(rewrite, line) if prose else line for line, prose in _outside_prose(markdown))
