"""`pip install dpfed` gets what the package imports, in versions the tests ran with."""

import ast
import importlib.metadata
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, str]:
    """{canonical name: version} of a requirements file's `name==version` lines."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            dist, version = line.split("==")
            pins[canonicalize_name(dist)] = version.strip()
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_top_level_modules(package: pathlib.Path) -> set[str]:
    """Top-level names of every absolute import in the package's modules, lazy ones too."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_dependency_range_holds_its_pin():
    pins = _pins("requirements.txt")
    for spec in _project()["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but not pinned"
        assert req.specifier.contains(pins[name]), (
            f"requirements.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: "
            "pip users would get versions the tests never ran"
        )


def test_embedded_extra_matches_the_nodeps_pins():
    pins = _pins("requirements-nodeps.txt")
    extra = {
        canonicalize_name(Requirement(s).name): str(Requirement(s).specifier)
        for s in _project()["optional-dependencies"]["embedded"]
    }
    assert extra == {name: f"=={v}" for name, v in pins.items()}, (
        f"the `embedded` extra {extra} should pin what make setup installs: {pins}"
    )


def test_every_third_party_import_of_dpfed_is_declared():
    project = _project()
    declared = {canonicalize_name(Requirement(s).name) for s in project["dependencies"]}
    declared |= {
        canonicalize_name(Requirement(s).name)
        for specs in project["optional-dependencies"].values()
        for s in specs
    }
    distributions = importlib.metadata.packages_distributions()
    third_party = _imported_top_level_modules(ROOT / "dpfed") - set(sys.stdlib_module_names)
    third_party.discard("dpfed")
    missing = {
        module: distributions.get(module)
        for module in sorted(third_party)
        if not declared & {canonicalize_name(d) for d in distributions.get(module, [module])}
    }
    assert not missing, (
        f"dpfed imports modules of undeclared distributions {missing}: "
        "add them to pyproject.toml's dependencies"
    )
