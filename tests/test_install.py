"""The install's pins agree with one another: the GPU bundle (the Makefile's GPU_WHEELS) holds the versions pyproject
asks for, the transformers a fresh install gets here is the bundle's, and the installed peft is one that transformers
itself accepts (transformers 5.24 and later ask for a peft that is not released)."""
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> dict[str, Requirement]:
    """Every requirement pyproject names (dependencies and extras), by package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def gpu_wheels() -> dict[str, str]:
    """GPU_WHEELS as {package: pinned version}."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    value = re.search(r"^GPU_WHEELS :=((?:.*\\\n)*.*)$", text, re.M).group(1).replace("\\\n", " ")
    pins = {}
    for pin in value.split():
        name, _, pinned = pin.partition("==")
        assert pinned, f"GPU_WHEELS: {pin} is not pinned with =="
        pins[canonicalize_name(name)] = pinned
    return pins


def test_the_gpu_bundle_holds_what_pyproject_asks_for():
    wanted, pins = pyproject_requirements(), gpu_wheels()
    assert {"transformers", "peft", "trl"} <= set(pins)
    for name, pinned in pins.items():
        if name in wanted:
            assert wanted[name].specifier.contains(pinned, prereleases=True), \
                f"GPU_WHEELS pins {name}=={pinned}, pyproject asks for {wanted[name]}"


def test_the_installed_transformers_is_the_bundles():
    assert version("transformers") == gpu_wheels()["transformers"], \
        "a fresh install gets another transformers than GPU_WHEELS pins: pin the same one in both"


def test_the_installed_peft_is_one_transformers_accepts():
    from transformers.dependency_versions_table import deps

    wanted = Requirement(deps["peft"])
    assert wanted.specifier.contains(version("peft"), prereleases=True), \
        f"transformers {version('transformers')} asks for {wanted}, peft {version('peft')} is installed"
    assert wanted.specifier.contains(gpu_wheels()["peft"], prereleases=True)
