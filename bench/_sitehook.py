"""A `sitecustomize.py` that instruments a Python process when an environment
variable is set: shared by the bench's timelines (`_timeline`, `_clitimeline`).
Imports nothing of shardline, so it moves no import earlier."""

from __future__ import annotations

import tempfile
from pathlib import Path


def site_dir(parent: str, *, prefix: str, env: str, module: str, call: str) -> str:
    """A new directory under `parent` with a `sitecustomize.py` that, when
    `env` is set, imports `module` from this directory and calls its `call()`;
    put it first on the process's PYTHONPATH."""
    directory = tempfile.mkdtemp(prefix=prefix, dir=parent)
    Path(directory, "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({env!r}):\n"
        f"    sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"    import {module}\n"
        f"    {module}.{call}()\n"
    )
    return directory
