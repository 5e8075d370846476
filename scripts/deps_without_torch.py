"""Print the project's dependencies from pyproject.toml, one per line, all but torch.

gpu_check.sh installs these on a GPU machine whose image already has a CUDA build of torch, which the
pinned CPU torch would replace. The list is kept in one place, pyproject.toml; this only reads it.
"""

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11's; pip carries the same parser, as tomli
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def dependencies_without_torch(pyproject: Path = PYPROJECT) -> list[str]:
    """The [project] dependencies of `pyproject`, less the torch requirement."""
    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return [d for d in dependencies if not re.match(r"\s*torch(?![\w.-])", d)]  # torch, not torchmetrics


if __name__ == "__main__":
    print("\n".join(dependencies_without_torch()))
