"""The demo pair's training corpus: the English prose of Django's documentation.

Fetched from the package registry as Django's source distribution (BSD licence), so the
pair rebuilds on any machine that reaches PyPI, with no model hub and no web crawl. The
repo ships the trained weights and Django's licence notice, never the corpus itself.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

DJANGO_VERSION = "5.2.8"
HELD_OUT_EVERY = 20  # every 20th document (in path order) is held out for evaluation


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    held_out: list[str]
    licence: str


def fetch_django_sdist(cache_dir: Path, version: str = DJANGO_VERSION) -> Path:
    """Download Django's sdist into ``cache_dir`` (once) and return the archive path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"django-{version}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"django=={version}",
                "-d",
                str(cache_dir),
            ],
            check=True,
        )
    return archive


def load_corpus(cache_dir: Path, version: str = DJANGO_VERSION) -> Corpus:
    """Read every ``docs/**/*.txt`` of the sdist, in path order, split into train and held-out."""
    archive = fetch_django_sdist(cache_dir, version)
    documents: list[tuple[str, str]] = []
    licence = ""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile():
                continue
            if parts[1:] == ["LICENSE"]:
                licence = _read(tar, member)
            elif len(parts) > 2 and parts[1] == "docs" and member.name.endswith(".txt"):
                documents.append((member.name, _read(tar, member)))
    documents.sort()
    train = [text for i, (_, text) in enumerate(documents) if i % HELD_OUT_EVERY]
    held_out = [text for i, (_, text) in enumerate(documents) if not i % HELD_OUT_EVERY]
    return Corpus(train=train, held_out=held_out, licence=licence)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    handle = tar.extractfile(member)
    assert handle is not None
    return handle.read().decode("utf-8", errors="replace")
