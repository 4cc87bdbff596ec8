"""The project's imports run downwards (docs/design.md, "Layout"): kernels/ below models/ below pipeline/; the sampling
path at pipeline/'s root imports none of its sub-packages (training, data, demo, toy, toyworld); the entry points do
not import each other. Read from the source with `ast`, so nothing is imported to check it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("train", "sample", "app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports, relative imports resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            found.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
    return {n for n in found if n.split(".")[0] in ("kernels", "models", "pipeline", *ENTRY_POINTS)}


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def offending(paths: list[Path], forbidden) -> list[str]:
    return [f"{module_name(p)} imports {n}" for p in paths for n in sorted(project_imports(p)) if forbidden(n)]


def test_the_import_reader_resolves_relative_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "pipeline" / "toy").mkdir(parents=True)
    module = tmp_path / "pipeline" / "toy" / "model.py"
    module.write_text("import os\nfrom ..atomic import x\nfrom . import vae\nfrom models.layout import y\n")
    assert project_imports(module) == {"pipeline.atomic", "pipeline.toy", "models.layout"}


@pytest.mark.parametrize("folder, below", [("kernels", ("models", "pipeline", *ENTRY_POINTS)),
                                           ("models", ("pipeline", *ENTRY_POINTS)),
                                           ("pipeline", ENTRY_POINTS)])
def test_packages_import_only_downwards(folder, below):
    assert offending(sources(folder), lambda n: n.split(".")[0] in below) == []


def test_the_sampling_path_imports_no_sub_package_of_pipeline():
    root_modules = sorted((ROOT / "pipeline").glob("*.py"))
    subpackages = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists()}
    assert {"training", "demo", "toy"} <= subpackages
    assert offending(root_modules, lambda n: n.split(".")[:2][-1] in subpackages and n.startswith("pipeline.")) == []


def test_entry_points_do_not_import_each_other():
    assert offending([ROOT / f"{e}.py" for e in ENTRY_POINTS], lambda n: n in ENTRY_POINTS) == []
