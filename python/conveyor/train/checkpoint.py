"""One checkpoint format for every task: an ``.npz`` holding the arrays by name and a JSON document
(``__meta__``) that says what they are: the task, its whole configuration, what identifies its data (path and
sha256), the vocabulary, where the run is and its history. Written to a temporary file in the same folder,
flushed to disk and renamed over the old one, so that a run killed at any moment leaves either the old
checkpoint or the new one, never a torn file."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

from .errors import UsageError

FORMAT = "conveyor-checkpoint/1"


def save(path: str, meta: dict, arrays: dict) -> None:
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    document = json.dumps({"format": FORMAT, **meta}).encode()
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(document, np.uint8), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # the rename itself survives a power cut only once the folder is on disk
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def load(path: str, flag: str = "checkpoint") -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint; a missing file or one that is not a Conveyor checkpoint raises
    ``UsageError`` naming ``flag``."""
    if not os.path.exists(path):
        raise UsageError(f"{flag}: no such file: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: expected a checkpoint file, got the folder {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise UsageError(f"{flag}: {path} is not a Conveyor checkpoint (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "__meta__" not in f.files:
                raise UsageError(f"{flag}: {path} is not a Conveyor checkpoint (no __meta__ record)")
            meta = json.loads(bytes(f["__meta__"]).decode())
            arrays = {name: f[name] for name in f.files if name != "__meta__"}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag}: {path} is not a Conveyor checkpoint ({error})") from error
    if meta.get("format") != FORMAT:
        raise UsageError(f"{flag}: {path} has format {meta.get('format')!r}; this Conveyor reads {FORMAT!r}")
    return meta, arrays
