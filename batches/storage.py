"""Where batch files' bytes live: Django's storage named ``batches`` (a local folder, or any S3-compatible store).

``config.settings`` defines ``STORAGES["batches"]``: a folder under the var dir by
default; ``TANDEM_BATCH_STORAGE_BACKEND`` and ``TANDEM_BATCH_STORAGE_OPTIONS`` (JSON)
name another backend, e.g. django-storages' ``storages.backends.s3.S3Storage``.
"""

from __future__ import annotations

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages

STORAGE_ALIAS = "batches"


def batch_storage() -> Storage:
    return storages[STORAGE_ALIAS]


def store(*, name: str, content: bytes) -> str:
    """Save ``content`` under ``name`` (or a free name near it); return the name it was stored as."""
    return batch_storage().save(name, ContentFile(content))


def read(name: str) -> bytes:
    with batch_storage().open(name, "rb") as handle:
        return handle.read()
