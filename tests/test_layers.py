"""The layering rule, checked by walking the imports of the source (ARCHITECTURE.md, "Layers").

    cli/ -> deploy/ -> control/ -> services/<name>/ (adapters, __main__, wiring)
                                      -> services/<name>/core.py and pure policies -> domain
    transport (frames, links, peers, link implementations) and infrastructure (etcd, Postgres,
    telemetry, settings, runtime) sit beside the cores, below the adapters.

What is checked, over every module's imports made at run time (an import under
`if TYPE_CHECKING:` is for the type checker only and is left out):

- the domain layer imports the standard library, numpy and itself, nothing else;
- a core (`services/*/core.py`) or a pure policy imports, directly or through anything it
  imports, only the domain layer, its own service's core-side modules (listed below) and the
  standard library, numpy and prometheus_client (in-memory instruments: no I/O, no sockets);
  never aiohttp, grpc, aetcd, asyncpg, torch or an adapter;
- transport imports the domain, never infrastructure; the shared mesh never imports a service;
- packages point down only: cli -> deploy -> control -> services, never back;
- no import circle between modules.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "deploy", "control", "services", "bench")
RANK = {"services": 0, "control": 1, "deploy": 2, "cli": 3}
"""Who may import whom: a package imports only packages of a lower or equal rank."""

DOMAIN = "services.mesh.domain"
CORE_THIRD_PARTY = frozenset({"numpy", "prometheus_client"})
DOMAIN_THIRD_PARTY = frozenset({"numpy"})
FORBIDDEN_IN_CORES = ("aiohttp", "grpc", "aetcd", "asyncpg", "torch")

POLICIES = (
    "services.batcher.policy", "services.batcher.fairness", "services.batcher.lanes",
    "services.batcher.batches", "services.batcher.bisection", "services.batcher.latency",
    "services.batcher.admission", "services.batcher.dispatch", "services.batcher.deadlines",
    "services.batcher.coldstart", "services.batcher.edf", "services.router.policy",
    "services.gateway.quotas", "services.gateway.validation", "control.guard.policy",
    "control.guard.window", "control.autoscaler.policy", "services.worker.placement",
)
"""Pure policies: functions over a small context, fed by a core or a runner."""

CORE_SIDE = {
    "gateway": ("access", "auth", "quotas", "validation", "metrics", "settings", "sticky",
                "overload"),
    "router": ("policy", "shadow", "metrics", "settings", "compare", "cache"),
    "batcher": ("policy", "fairness", "lanes", "batches", "metrics", "tenants", "workers",
                "settings", "bisection", "latency", "admission", "dispatch", "deadlines",
                "coldstart", "edf"),
    "worker": ("metrics", "settings", "artifacts", "backends", "backends.base", "placement",
               "residency", "memory", "failures", "inference_thread"),
    "guard": ("policy", "window", "spec", "metrics"),
    "autoscaler": ("policy", "spec"),
    "registry": ("ports", "validation"),
}
"""Per service, the modules a core may use beside the domain: its policies, its instruments
(metrics), its settings object and its own next-hop helpers. Each is held to the same rule
through the transitive walk, so one of them importing an adapter fails the test too."""

PURE_INFRASTRUCTURE = (
    "services.mesh.infra.settings", "services.mesh.infra", "services.mesh.infra.instruments",
    "services.mesh.infra.failpoints",
)
"""Infrastructure a core may reach: the settings base (frozen dataclasses, parsed from the
environment in `__main__` only; the module imports the standard library alone, checked below
like everything a core reaches) and the failpoints (the standard library and the domain's
errors; unarmed, a set lookup)."""

STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


@dataclass
class Module:
    name: str
    path: Path
    imports: set[str] = field(default_factory=set)
    """Modules of this project imported at run time."""
    third_party: set[str] = field(default_factory=set)
    """Top-level names of other distributions imported at run time."""


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _runtime_imports_of(child))
            continue
        yield from _runtime_imports_of(node)


def _runtime_imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    elif not (isinstance(node, ast.If) and _is_type_checking(node)):
        yield from _runtime_imports(node)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_module(name: str, path: Path, source: str, known: set[str]) -> Module:
    """The run-time imports of one module; `known` is every module name of the project."""
    module = Module(name, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_imports(ast.parse(source, str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        for target in targets:
            top = target.split(".")[0]
            if top in PACKAGES or top == "tests":
                while target and target not in known:
                    target = target.rpartition(".")[0]
                # Importing a.b.c runs a/__init__ and a/b/__init__ first.
                while target:
                    if target != name and not name.startswith(target + "."):
                        module.imports.add(target)
                    target = target.rpartition(".")[0]
            elif top not in STDLIB:
                module.third_party.add(top)
    return module


def load_project(root: Path = ROOT) -> dict[str, Module]:
    paths = [p for package in PACKAGES for p in (root / package).rglob("*.py")]
    known = {module_name(p, root) for p in paths}
    return {
        module_name(p, root): parse_module(module_name(p, root), p, p.read_text(), known)
        for p in paths
    }


def closure(modules: dict[str, Module], start: str) -> set[str]:
    """`start` and every project module it imports, directly or not."""
    seen, stack = {start}, [start]
    while stack:
        for target in modules[stack.pop()].imports:
            if target not in seen and target in modules:
                seen.add(target)
                stack.append(target)
    return seen


def core_side(name: str) -> set[str]:
    """The modules the core or policy `name` may reach besides the domain."""
    parts = name.split(".")
    owner = parts[1] if parts[0] == "services" else parts[1] if len(parts) > 2 else parts[0]
    prefix = ".".join(parts[:2])
    return {name, *PURE_INFRASTRUCTURE} | {
        f"{prefix}.{leaf}" for leaf in CORE_SIDE.get(owner, ())
    }


def core_violations(modules: dict[str, Module], name: str) -> list[str]:
    """What the core or policy `name` reaches that the rule forbids, with the path to it."""
    allowed = core_side(name)
    found = []
    for reached in sorted(closure(modules, name)):
        if not (reached == DOMAIN or reached.startswith(DOMAIN + ".") or reached in allowed
                or reached in {"services", "control", "services.mesh"}
                or reached == ".".join(name.split(".")[:2])):
            found.append(f"{name} reaches {reached}")
        extra = modules[reached].third_party - CORE_THIRD_PARTY
        found += [f"{name} reaches {package} (through {reached})" for package in sorted(extra)]
    return found


def cores_and_policies(modules: dict[str, Module]) -> list[str]:
    cores = [name for name in modules
             if name.startswith("services.") and name.endswith(".core")]
    return sorted(cores) + [p for p in POLICIES if p in modules]


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in modules[node].imports:
            if target not in modules:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return found


def edges(modules: dict[str, Module]) -> Iterable[tuple[str, str]]:
    for module in modules.values():
        for target in module.imports:
            yield module.name, target


@pytest.fixture(scope="module")
def project() -> dict[str, Module]:
    return load_project()


def test_the_domain_imports_only_itself_the_standard_library_and_numpy(
    project: dict[str, Module],
) -> None:
    domain = [m for name, m in project.items() if name.startswith(DOMAIN)]
    assert len(domain) >= 8
    wrong = [f"{m.name} imports {t}" for m in domain for t in sorted(m.imports)
             if not t.startswith(DOMAIN)]
    wrong += [f"{m.name} imports {p}" for m in domain
              for p in sorted(m.third_party - DOMAIN_THIRD_PARTY)]
    assert wrong == []


def test_cores_and_pure_policies_reach_only_the_domain(project: dict[str, Module]) -> None:
    checked = cores_and_policies(project)
    assert {"services.gateway.core", "services.router.core", "services.batcher.core",
            "services.worker.core"} <= set(checked)
    assert [v for name in checked for v in core_violations(project, name)] == []


@pytest.mark.parametrize("package", FORBIDDEN_IN_CORES)
def test_the_rule_fails_a_core_that_imports_an_io_library(
    project: dict[str, Module], package: str
) -> None:
    """The check above can fail: a core importing any of these is caught, directly or through
    a module it imports."""
    known = set(project)
    direct = parse_module("services.router.core", Path("services/router/core.py"),
                          f"import {package}\n", known)
    assert core_violations({**project, direct.name: direct}, direct.name) == [
        f"services.router.core reaches {package} (through services.router.core)"
    ]
    indirect = parse_module("services.router.core", Path("services/router/core.py"),
                            "from services.mesh.infra import etcd\n", known)
    assert core_violations({**project, indirect.name: indirect}, indirect.name)


def test_imports_under_type_checking_are_left_out() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import aiohttp\n"
    module = parse_module("services.router.core", Path("core.py"), source, set())
    assert module.third_party == set()


def test_transport_never_imports_infrastructure_and_the_mesh_no_service(
    project: dict[str, Module],
) -> None:
    wrong = [f"{a} imports {b}" for a, b in edges(project)
             if (a.startswith("services.mesh.transport") and b.startswith("services.mesh.infra"))
             or (a.startswith("services.mesh.") and not b.startswith("services.mesh"))]
    assert wrong == []


def test_packages_point_down_only(project: dict[str, Module]) -> None:
    wrong = [f"{a} imports {b}" for a, b in edges(project)
             if a.split(".")[0] in RANK and b.split(".")[0] in RANK
             and RANK[b.split(".")[0]] > RANK[a.split(".")[0]]]
    assert wrong == []


def test_no_import_circle(project: dict[str, Module]) -> None:
    assert cycles(project) == []


def test_a_circle_is_found() -> None:
    a, b = Module("a", Path("a.py"), {"b"}), Module("b", Path("b.py"), {"a"})
    assert cycles({"a": a, "b": b}) == [["a", "b"]]
