"""Who may import whom (docs/architecture.md "The layers"; DESIGN §2, §7).

Every module of src/shardline is parsed, and every import it makes, at
module level or inside a function, is held to the layer rules:

- `protocol` imports only the standard library (none of its modules that
  do I/O), `shardline.errors` and itself;
- `worker` never imports `coordinator`, nor `coordinator` `worker`;
- the shared I/O layer, `shardline.io`, imports neither of them;
- `client` (the command line's HTTP client) imports no `coordinator` module,
  nor anything of shardline but `protocol` and `errors`;
- a worker deployment (`shardline.packaging`: `WORKER_PACKAGES` and
  `WORKER_MODULES`) holds every shardline module the worker imports,
  directly or through others, and the distributions pip installs for it
  provide every library those modules import (but for imports guarded by
  ``except ImportError``).

Nothing is imported to find this out, so an import inside a function that
no test runs counts the same as one at the top of a module.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement

from shardline.packaging import WORKER_MODULES, WORKER_PACKAGES, worker_requirements

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "shardline"
#: The layers of shardline every other may import: the contracts and the errors.
PROTOCOL = frozenset({"protocol", "errors"})
#: Standard modules that touch a network, a file, a process or a clock the
#: way I/O does: none of them belongs in the sans-I/O protocol.
IO_MODULES = frozenset(
    {
        "asyncio",
        "concurrent",
        "http",
        "io",
        "multiprocessing",
        "os",
        "pathlib",
        "selectors",
        "shutil",
        "signal",
        "socket",
        "sqlite3",
        "ssl",
        "subprocess",
        "tempfile",
        "threading",
        "time",
        "urllib",
    }
)


@dataclass(frozen=True, slots=True)
class Import:
    """`importer` imports `target` (a module) at `line`."""

    importer: str
    target: str
    line: int
    guarded: bool  # inside a ``try`` whose handler catches ImportError

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every shardline module by its dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def layer(module: str) -> str:
    """The part of shardline a module belongs to: `protocol`, `io`, ..., `errors`, `cli`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in ("ImportError", "ModuleNotFoundError") for name in names)


class _Imports(ast.NodeVisitor):
    def __init__(self, importer: str, package: str) -> None:
        self.importer = importer
        self.package = package
        self.found: list[Import] = []
        self._guards = 0

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(handler) for handler in node.handlers)
        self._guards += guarded
        for statement in node.body:
            self.visit(statement)
        self._guards -= guarded
        for rest in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(rest)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.module, node.level)
        for alias in node.names:
            # `from package import module` imports the module; `from module import name`, the module.
            candidate = f"{base}.{alias.name}"
            self._add(candidate if candidate in modules() else base, node)

    def _absolute(self, module: str | None, level: int) -> str:
        if level == 0:
            assert module is not None
            return module
        anchor = self.package.split(".")
        anchor = anchor[: len(anchor) - (level - 1)]
        return ".".join([*anchor, *([module] if module else [])])

    def _add(self, target: str, node: ast.stmt) -> None:
        self.found.append(Import(self.importer, target, node.lineno, self._guards > 0))


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import `module` makes, wherever it is in the file."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    visitor = _Imports(module, package)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return tuple(visitor.found)


def imports_in(*layers: str) -> Iterator[Import]:
    """Every import by the modules of `layers`."""
    for module in modules():
        if layer(module) in layers:
            yield from imports_of(module)


def of_shardline(target: str) -> bool:
    return target == "shardline" or target.startswith("shardline.")


def refused(found: Iterable[Import]) -> str:
    return "\n".join(str(imp) for imp in found)


def test_every_module_is_parsed():
    # A sanity check of the walk itself: each layer is there, and imports are found.
    assert {"protocol", "io", "worker", "coordinator", "errors", "packaging"} <= {layer(m) for m in modules()}
    assert any(imp.target == "shardline.errors" for imp in imports_in("protocol"))


def test_protocol_imports_only_the_standard_library_and_errors():
    def allowed(imp: Import) -> bool:
        if of_shardline(imp.target):
            return layer(imp.target) in PROTOCOL
        top = imp.target.split(".")[0]
        return top in sys.stdlib_module_names and top not in IO_MODULES

    bad = [imp for imp in imports_in("protocol") if not allowed(imp)]
    assert not bad, f"protocol does no I/O and needs nothing but the standard library and errors:\n{refused(bad)}"


def crossing(importers: str, *targets: str) -> list[Import]:
    """Imports by the modules of layer `importers` of shardline modules in `targets`."""
    return [imp for imp in imports_in(importers) if of_shardline(imp.target) and layer(imp.target) in targets]


def test_worker_and_coordinator_never_import_each_other():
    bad = crossing("worker", "coordinator") + crossing("coordinator", "worker")
    assert not bad, f"worker and coordinator never import each other:\n{refused(bad)}"


def test_the_io_layer_imports_neither_worker_nor_coordinator():
    bad = crossing("io", "worker", "coordinator")
    assert not bad, f"shardline.io serves both sides and imports neither:\n{refused(bad)}"


def test_the_client_imports_no_coordinator_module():
    bad = crossing("client", "coordinator")
    assert not bad, f"the command line's client talks to a coordinator over HTTP only:\n{refused(bad)}"
    bad = [imp for imp in imports_in("client") if of_shardline(imp.target) and layer(imp.target) not in PROTOCOL]
    assert not bad, f"the client needs nothing of shardline but protocol and errors:\n{refused(bad)}"


def _with_parents(module: str) -> list[str]:
    """`module` and the packages whose __init__ importing it runs."""
    parts = module.split(".")
    return [".".join(parts[: n + 1]) for n in range(len(parts))]


def worker_closure() -> dict[str, Import | None]:
    """Every shardline module a worker imports, directly or not, with the import
    that first brought it in (None for the worker's own modules)."""
    reached: dict[str, Import | None] = {}
    todo = [(module, None) for module in modules() if layer(module) == "worker"]
    while todo:
        module, via = todo.pop()
        for name in _with_parents(module):
            if name in reached or name not in modules():
                continue
            reached[name] = via
            todo += [(imp.target, imp) for imp in imports_of(name) if of_shardline(imp.target)]
    return reached


def shipped(module: str) -> bool:
    """Whether a worker deployment holds `module` (see shardline.packaging)."""
    path = modules()[module].relative_to(PACKAGE_ROOT)
    return path.parts[0] in WORKER_PACKAGES if len(path.parts) > 1 else path.name in WORKER_MODULES


def test_the_worker_deployment_holds_every_module_the_worker_imports():
    missing = {  # a dict: one line for a module and the package it is in
        f"{via}, which it does not hold" if via else f"{module}, a worker module, is not in it": None
        for module, via in sorted(worker_closure().items())
        if not shipped(module)
    }
    assert not missing, f"a worker deployment holds {WORKER_PACKAGES} and {WORKER_MODULES} only:\n" + "\n".join(missing)


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installed_for_the_worker() -> set[str]:
    """Distributions pip installs for the worker's requirements (with the extras they ask for)."""
    found: set[str] = set()
    todo = [Requirement(requirement) for requirement in worker_requirements()]
    while todo:
        requirement = todo.pop()
        name = _normalized(requirement.name)
        if name in found:
            continue
        found.add(name)
        for text in importlib.metadata.requires(requirement.name) or []:
            needed = Requirement(text)
            extras = requirement.extras or {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(needed)
    return found


def test_the_worker_deployment_brings_every_library_the_worker_imports():
    distributions = installed_for_the_worker()
    provided = {
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(_normalized(owner) in distributions for owner in owners)
    }
    bad = [
        imp
        for module in worker_closure()
        for imp in imports_of(module)
        if not imp.guarded
        and not of_shardline(imp.target)
        and (top := imp.target.split(".")[0]) not in sys.stdlib_module_names
        and top not in provided
    ]
    assert not bad, f"pip installs {sorted(distributions)} for a worker, which provide none of:\n{refused(bad)}"
