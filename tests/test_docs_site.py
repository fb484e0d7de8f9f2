"""The documentation: the site builds strictly, the README stays short, and the product speaks to its users."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

import sa_middleware
from sa_middleware.cli import main

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 12 * 1024
#: wording about how the library was made, not about what it does for its users
INTERNAL = re.compile(r"\bmission\b|design was silent|2-core machine|DESIGN(\.md| section)|README \"", re.I)


def test_docs_build_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page in the nav, every link and anchor resolves, the API reference builds
    from the docstrings."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "guard" / "index.html").read_text().count("rotate") > 1
    assert "supported-versions" in (tmp_path / "site" / "index.html").read_text()


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert [p for p in pages if f" {p}" not in nav] == []
    for page in ("security-model.md", "issuers-and-sessions.md", "operations-hygiene.md", "identity-providers.md",
                 "mcp.md", "observability.md", "getting-started.md", "troubleshooting.md", "changelog.md"):
        assert page in pages


def test_readme_is_short_and_links_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT
    # each links into the docs; the security model keeps its guarantees and the deployer's duties in the README
    for heading, most in (("## Security model", 16), ("## Using your identity provider", 3), ("## MCP servers", 3),
                          ("## Observability", 3)):
        section = readme.split(heading, 1)[1].split("\n## ", 1)[0].strip()
        assert 1 <= len(section.splitlines()) <= most and "](docs/" in section, heading
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_supported_versions_table(page: str) -> None:
    rows = [line.split("|")[1].strip() for line in (ROOT / page).read_text().splitlines()
            if line.startswith("| ") and line.count("|") == 4]
    for component in ("Python", "Starlette / FastAPI", "Flask", "Django", "Redis"):
        assert any(row.startswith(component) for row in rows), (page, component)


def test_version_is_the_package_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sa_middleware.__version__ == project["version"]
    assert project["license"] == "Apache-2.0" and "LICENSE" in project["license-files"]


def test_license_and_changelog() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert all(f"{n}. " in text for n in range(1, 10))  # the nine sections
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in changelog
    assert re.findall(r"^## (.+)$", changelog, re.M)[:2] == ["Unreleased", sa_middleware.__version__]


def _help_texts() -> list[tuple[str, str]]:
    texts = []
    stack: list[tuple[str, click.Command]] = [("sa-middleware", main)]
    while stack:
        name, command = stack.pop()
        texts.append((name, command.get_help(click.Context(command, info_name=name))))
        if isinstance(command, click.Group):
            stack.extend((f"{name} {sub}", cmd) for sub, cmd in command.commands.items())
    return texts


def test_the_product_speaks_to_its_users() -> None:
    documents = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "examples" / "README.md",
                 *(ROOT / "docs").rglob("*.md")]
    found = [(str(p.relative_to(ROOT)), m.group()) for p in documents for m in INTERNAL.finditer(p.read_text())]
    found += [(name, m.group()) for name, text in _help_texts() for m in INTERNAL.finditer(text)]
    for module in pkgutil.walk_packages(sa_middleware.__path__, "sa_middleware."):
        if module.name.startswith("sa_middleware.adapters"):
            continue  # needs the frameworks; their source is checked below
        doc = str(importlib.import_module(module.name).__doc__)
        found += [(module.name, m.group()) for m in INTERNAL.finditer(doc)]
    for path in [*(ROOT / "sa_middleware").rglob("*.py"), *(ROOT / "sa_middleware").rglob("*.lua"),
                 *(ROOT / "adapters").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]:
        found += [(str(path.relative_to(ROOT)), m.group()) for m in INTERNAL.finditer(path.read_text())]
    assert found == []


def test_the_rule_cites_the_page_with_the_check_order() -> None:
    rules = (ROOT / "sa_middleware" / "rules.py").read_text()
    assert "docs/denials.md" in rules
    assert "Checks run in this order" in (ROOT / "docs" / "denials.md").read_text()
