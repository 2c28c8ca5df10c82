"""One plugin catalogue: the entry points. Every place that lists plugins is derived from them
(or from the folders), and these tests fail when a new package is missing from one."""

from __future__ import annotations

import configparser
import importlib.util
from pathlib import Path

import pytest
import tomllib

from fms_acceleration import PLUGINS
from fms_acceleration.catalogue import (
    REFERENCE_STANZAS,
    checkout_packages,
    installed_plugin_packages,
    plugin_short_names,
)
from fms_acceleration.discovery import plugin_catalogue

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = checkout_packages(ROOT)
PLUGIN_PACKAGES = [p for p in PACKAGES if p.is_plugin]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checkout_has_every_kind_of_package():
    names = {p.package for p in PACKAGES}
    assert {"fms-acceleration", "fms-acceleration-train", "fms-acceleration-adapters"} <= names
    assert len(PLUGIN_PACKAGES) >= 5 and all(
        p.folder.parts[0] == "plugins" for p in PLUGIN_PACKAGES
    )


def test_packages_txt_lists_every_package_folder():
    listing = (ROOT / "packages.txt").read_text(encoding="utf-8")
    assert listing == _script("generate_package_list").package_list(ROOT)
    assert sorted(line.split()[-1] for line in listing.splitlines() if line.startswith("-e")) == (
        sorted(p.folder.as_posix() for p in PACKAGES)
    )


def test_tox_installs_the_package_list_in_every_test_environment():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    assert "-r {toxinidir}/packages.txt" in tox["base"]["packages"]
    for env in ("testenv", "testenv:py-oldest", "testenv:py-latest", "testenv:train"):
        deps = tox[env]["deps"]
        assert "{[base]packages}" in deps or "{[testenv]deps}" in deps, env


def test_ruff_knows_every_package_as_first_party():
    ruff = tomllib.loads((ROOT / "ruff.toml").read_text(encoding="utf-8"))
    covered = {path for pattern in ruff["src"] for path in ROOT.glob(pattern)}
    missing = [p.module for p in PACKAGES if ROOT / p.folder / "src" not in covered]
    assert missing == []


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.short_name)
def test_every_plugin_package_is_found_through_its_entry_point(package):
    installed = installed_plugin_packages()
    assert installed.get(package.module.removeprefix("fms_acceleration_")) == package.package
    registrations = [
        r for r in plugin_catalogue().registrations if r.package_name == package.package
    ]
    assert registrations, f"{package.package} registers no plugin when discovered"
    assert package.short_name in PLUGINS and package.short_name in plugin_short_names(ROOT)


def test_reference_stanzas_of_installed_packages_are_claimed_by_them():
    claimed = {p: r.package_name for r in plugin_catalogue().registrations for p in r.paths}
    installed = set(installed_plugin_packages().values())
    for path, package in REFERENCE_STANZAS.items():
        if package in installed:
            assert claimed.get(path) == package, path


def test_the_train_summary_records_the_active_plugins_versions():
    from fms_acceleration.testing import build_framework
    from fms_acceleration_aadp import PaddingFreeAccelerationPlugin
    from fms_acceleration_train.runner import _versioned

    config = {"plugins": {"training": {"attention": {"padding_free": {"method": "huggingface"}}}}}
    framework = build_framework(config, [PaddingFreeAccelerationPlugin])
    versioned = _versioned(framework)
    assert "fms-acceleration-aadp" in versioned and "transformers" in versioned
    assert "fms-acceleration-foak" not in versioned  # not active in this run


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.package)
def test_every_package_ships_its_license_readme_and_types(package):
    folder = ROOT / package.folder
    project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert project["readme"] == "README.md" and (folder / "README.md").is_file()
    # a copy, not a link: an sdist keeps a link, and the link leaves the unpacked sdist
    assert not (folder / "LICENSE").is_symlink()
    assert (folder / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    assert (folder / "src" / package.module / "py.typed").is_file()
