"""kprism's optional dependencies: which extra installs each, and the one line that says so.

Inference (segment, models, the Python API, the Slicer module) needs only the runtime dependencies of
pyproject.toml. Training, evaluation and the demo's pictures need an extra; a command that reaches
one without it stops with a line naming the package and the pip command, not a traceback.
"""

from __future__ import annotations

from typing import Optional

# import name → (distribution on the package index, the extra that brings it for each command)
OPTIONAL = {"monai": "monai", "matplotlib": "matplotlib", "yaml": "pyyaml"}
EXTRA_OF_COMMAND = {"train": "train"}  # every other command's optional needs are in `eval`


def missing_optional_line(error: BaseException, command: str) -> Optional[str]:
    """The one line for an ImportError of an optional dependency; None for any other error."""
    if not isinstance(error, ImportError):
        return None
    top = (error.name or "").split(".")[0]
    if top not in OPTIONAL:
        return None
    extra = EXTRA_OF_COMMAND.get(command, "eval")
    return (f"`kprism {command}` needs {OPTIONAL[top]}, an optional dependency that is not installed: "
            f"pip install 'kprism[{extra}]'")
