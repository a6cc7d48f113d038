"""Writing a folder so that it appears whole or not at all.

Everything protege writes that a later stage reads (a frozen dataset, an exported model,
a converted base model, an export for the user) is written into a temporary folder beside
its destination and renamed into place: a crash or kill half-way leaves the destination
as it was, never half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ProtegeError


@contextmanager
def folder_in_place(dest: str | os.PathLike, *, prefix: str | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; when the block ends it becomes `dest` (an
    existing `dest` is replaced, or with `replace=False` refused). On any error the
    temporary folder is removed and `dest` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            if not replace:
                raise ProtegeError(f"{dest} exists already; choose another path or remove it")
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
