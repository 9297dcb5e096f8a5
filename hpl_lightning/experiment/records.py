"""Stage records on disk: ``done.json`` written atomically and read back, and what identifies a stage's outputs.

A stage is finished when its record can be read: the record is written to a temporary file and moved into place
(``os.replace``), so a kill mid-write leaves no record rather than a half one. A record that cannot be parsed (an
old runner's interrupted write) counts as not finished, with a warning, and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

DONE_FILE = "done.json"


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` as ``path`` atomically: readers see the old file, no file, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when there is none or it cannot be read (then the stage is not done)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"WARNING: {path} cannot be read ({e}); its stage counts as not finished", flush=True)
        return None
    return record if isinstance(record, dict) else None


def outputs_fingerprint(stage_dir: Path) -> str | None:
    """sha256 of what a stage produced (model weights, rollouts, segments, pairs, episodes)."""
    files = sorted(p for pattern in ("model/*.safetensors", "*.jsonl") for p in stage_dir.glob(pattern))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        _feed(digest, path)
    return digest.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of one file's bytes (an input's content, model weights)."""
    digest = hashlib.sha256()
    _feed(digest, Path(path))
    return digest.hexdigest()[:16]


def _feed(digest: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
