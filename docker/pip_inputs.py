"""Pip inputs for installing megatron_sdmoe on top of NVIDIA's PyTorch container (see the Dockerfile).

The image pins every package it ships in /etc/pip/constraint.txt (its PIP_CONSTRAINT), so that pip
never replaces its torch, Transformer Engine, Apex or their companions. Run in the project's
directory, this writes there
  image-requirements.txt  the project's dependencies less torch (the image's) and megatron-core
                          and deepspeed (pinned in the Dockerfile itself);
  image-constraints.txt   constraints.txt less the packages the image ships, so that the image's
                          builds stay and the two sets of constraints never disagree;
and takes megatron-core and deepspeed out of the image's constraints if it has them: the code is
written against the versions the Dockerfile pins.
"""
import importlib.metadata
import re
import tomllib
from pathlib import Path

IMAGE_CONSTRAINTS = Path("/etc/pip/constraint.txt")
PINNED_IN_DOCKERFILE = {"megatron-core", "deepspeed"}


def name(requirement: str) -> str:
    """A requirement's project name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s=<>~!;\[]", requirement.strip())[0]).lower()


shipped = {name(dist.metadata["Name"]) for dist in importlib.metadata.distributions()}
dependencies = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
Path("image-requirements.txt").write_text(
    "".join(f"{d}\n" for d in dependencies if name(d) not in {"torch"} | PINNED_IN_DOCKERFILE))
Path("image-constraints.txt").write_text(
    "".join(line for line in Path("constraints.txt").open() if name(line) not in shipped - PINNED_IN_DOCKERFILE))
if IMAGE_CONSTRAINTS.exists():
    IMAGE_CONSTRAINTS.write_text(
        "".join(line for line in IMAGE_CONSTRAINTS.open() if name(line) not in PINNED_IN_DOCKERFILE))
