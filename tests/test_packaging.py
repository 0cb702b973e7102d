"""A wheel built from this repository carries what the installed package reads at run time."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fm_transformers.training.convert import TEMPLATE_NAME as OFFICIAL_TEMPLATE_NAME, default_official_template
from fm_transformers.training.push import TEMPLATE_NAME, TEMPLATE_PACKAGE, default_template

ROOT = Path(__file__).resolve().parents[1]
# What pyproject.toml builds the wheel from; copied so that the build writes nothing into the checkout.
SOURCES = ("pyproject.toml", "README.md", "src", "kernels", "model_cards")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    missing = [name for name in ("pip", "setuptools") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: no wheel can be built offline")
    source, output = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return next(output.glob("fm_transformers-*.whl"))


@pytest.mark.parametrize("template", [TEMPLATE_NAME, OFFICIAL_TEMPLATE_NAME])
def test_wheel_ships_the_model_card_templates_that_push_and_convert_read(wheel, template):
    member = "/".join([*TEMPLATE_PACKAGE.split("."), template])
    with zipfile.ZipFile(wheel) as archive:
        assert member in archive.namelist(), f"{member} is missing from {wheel.name}"
        assert archive.read(member).decode() == (ROOT / "model_cards" / template).read_text()


def test_the_templates_push_and_convert_read_are_the_ones_in_model_cards():
    assert default_template() == (ROOT / "model_cards" / TEMPLATE_NAME).read_text()
    assert default_official_template() == (ROOT / "model_cards" / OFFICIAL_TEMPLATE_NAME).read_text()


def test_the_fm_indexer_script_of_the_wheel_runs_the_stdlib_front_end(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        assert "fm-indexer = fm_indexer:main" in archive.read(entry_points).decode().splitlines()
        assert "fm_indexer/__init__.py" in archive.namelist()
