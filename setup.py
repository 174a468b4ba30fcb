"""Package discovery for the wheel: every package under robustlab/ and under each wing folder.

The wings live at the top of the repository (attacks/, defenses/, explain/, reports/) but install as
robustlab.attacks, ... . setuptools' `packages.find` cannot add that prefix, so the list is built
here by `find_packages` over each folder: a new subpackage can never be left out of the wheel
(a hand-written list once dropped robustlab.integrity). Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

WINGS = ("attacks", "defenses", "explain", "reports")


def discovered() -> tuple[list[str], dict[str, str]]:
    packages = ["robustlab"] + [f"robustlab.{p}" for p in find_packages("robustlab")]
    package_dir = {}
    for wing in WINGS:
        package_dir[f"robustlab.{wing}"] = wing
        packages += [f"robustlab.{wing}"] + [f"robustlab.{wing}.{p}" for p in find_packages(wing)]
    return packages, package_dir


PACKAGES, PACKAGE_DIR = discovered()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
