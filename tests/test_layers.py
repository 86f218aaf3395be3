"""What may import what (docs/architecture.md), read from the source: imports at run time only
(those under ``if TYPE_CHECKING:`` are for the type checker)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs, anywhere in it (functions included)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def modules(package: str) -> dict[str, set[str]]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): runtime_imports(p)
        for p in sorted((ROOT / package).rglob("*.py"))
    }


def test_shared_and_the_client_never_import_the_server() -> None:
    for package in ("shared", "relay_client"):
        for module, imports in modules(package).items():
            assert not any(i.startswith("relay_server") for i in imports), module
    for module, imports in modules("shared").items():
        assert not any(i.startswith("relay_client") for i in imports), module


def test_nothing_imports_the_cli_or_the_dashboard_but_the_cli() -> None:
    for module, imports in modules("relay_server").items():
        if module.startswith(("relay_server.cli", "relay_server.dashboard")):
            continue
        assert not any(i.startswith(("relay_server.dashboard", "relay_server.cli")) for i in imports), module
        assert not any(i.split(".")[0] in ("fastapi", "starlette", "uvicorn", "pydantic") for i in imports), module


def test_the_registry_knows_frontends_and_stores_only_by_their_interfaces() -> None:
    imports = modules("relay_server")["relay_server.registry"]
    assert "relay_server.frontends.base" in imports and "relay_server.stores.base" in imports
    others = {i for i in imports if i.startswith(("relay_server.frontends.", "relay_server.stores."))}
    assert others == {"relay_server.frontends.base", "relay_server.stores.base"}
    assert "relay_server.control" not in imports and "relay_server.listener" not in imports


def test_frontends_and_stores_do_not_reach_back_into_the_registry_or_control() -> None:
    for module, imports in modules("relay_server").items():
        if module.startswith(("relay_server.frontends", "relay_server.stores", "relay_server.claims",
                              "relay_server.tunnels")):  # fmt: skip
            assert not imports & {"relay_server.registry", "relay_server.control", "relay_server.listener"}, module
