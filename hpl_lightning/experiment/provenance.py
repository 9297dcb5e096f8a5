"""What produced a stage: a fingerprint of the code its kind runs, the library versions, the model weights, and
the checkout's commit. Kept in the stage's record (not in its key), so a stage made by other code is reported as
stale and planned again, instead of being silently orphaned or silently reused.

How the code of a kind is decided: its registry entry names roots (``kinds.StageKind.code``). A root ``module`` counts
with every ``hpl_lightning`` module it imports, transitively (imports inside functions included). A root
``module:function`` counts only that function, the module-level definitions it names (transitively) and the modules
imported inside them or by the names it uses -- for the command modules (``pipeline``, the runner's ``stages``)
that import every library to dispatch subcommands, so that editing one subcommand does not stale the others.

A module counts by its syntax tree with docstrings removed (``ast.dump`` without positions): comments, blank lines,
formatting and docstrings change nothing; any other edit, a renamed variable included, is a change of code.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpl_lightning.experiment.records import file_digest

PACKAGE = "hpl_lightning"
# Command modules that import every library to dispatch subcommands: only named functions of them count
# (``pipeline:explore``), never the whole module through an import.
DISPATCHERS = ("hpl_lightning", "hpl_lightning.pipeline", "hpl_lightning.experiment")
LIBRARIES = ("torch", "transformers", "lightning", "scienceworld")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _names_run(node: ast.AST) -> set[str]:
    """The names a definition uses when it runs: not those in type annotations (strings at run time here)."""
    skip = set()
    for n in ast.walk(node):
        if isinstance(n, ast.arg) and n.annotation is not None:
            skip.update(id(x) for x in ast.walk(n.annotation))
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns is not None:
            skip.update(id(x) for x in ast.walk(n.returns))
        elif isinstance(n, ast.AnnAssign):
            skip.update(id(x) for x in ast.walk(n.annotation))
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in skip}


@dataclass
class CodeIndex:
    """The package's modules as syntax trees, read once per run from ``root`` (the directory of the package)."""

    root: Path = field(default_factory=lambda: Path(importlib.util.find_spec(PACKAGE).origin).parent)
    _trees: dict[str, ast.Module] = field(default_factory=dict)

    def modules(self) -> dict[str, Path]:
        out = {}
        for path in sorted(self.root.rglob("*.py")):
            parts = (PACKAGE, *path.relative_to(self.root).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        return out

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.modules().get(module)
            if path is None:
                raise KeyError(f"{module}: not a module of {self.root}")
            self._trees[module] = ast.parse(path.read_text(encoding="utf-8"))
        return self._trees[module]

    def _imported(self, nodes: Iterable[ast.AST], known: dict[str, Path]) -> set[str]:
        """The package's modules imported anywhere inside ``nodes``."""
        out = set()
        for top in nodes:
            for node in ast.walk(top):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                    names = [f"{node.module}.{a.name}" for a in node.names]
                    out.update(n for n in names if n in known)
                    out.add(node.module)
                elif isinstance(node, ast.Import):
                    out.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        return {m for m in out if m in known and m not in DISPATCHERS}

    def _definitions(self, module: str) -> tuple[dict[str, ast.AST], dict[str, tuple[str, str]]]:
        """A module's top-level definitions by name, and its top-level ``from X import Y as Z``: Z -> (X, Y)."""
        defined: dict[str, ast.AST] = {}
        imported: dict[str, tuple[str, str]] = {}
        for node in self.tree(module).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name] = node
            elif isinstance(node, ast.Assign):
                defined.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined[node.target.id] = node
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                imported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        return defined, imported

    def _definition(self, module: str, name: str) -> tuple[list[ast.AST], list[str]]:
        """A module-level definition with the same-module definitions it uses (transitively), and the roots of the
        package's code it reaches: ``module:name`` for an imported definition, ``module`` for an imported module."""
        known = self.modules()
        defined, imported = self._definitions(module)
        if name not in defined:
            raise KeyError(f"{module}:{name}: no such module-level definition")
        taken: list[ast.AST] = []
        todo, refs = [name], []
        while todo:
            node = defined[todo.pop()]
            if any(node is t for t in taken):
                continue
            taken.append(node)
            for used in _names_run(node):
                if used in defined:
                    todo.append(used)
                elif used in imported:
                    refs.append(imported[used])
            for inner in ast.walk(node):  # imports inside functions
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.startswith(PACKAGE):
                    refs.extend((inner.module, a.name) for a in inner.names)
        roots = []
        for mod, attr in refs:
            if f"{mod}.{attr}" in known:
                roots.append(f"{mod}.{attr}")
            elif mod in known and attr in self._definitions(mod)[0]:
                roots.append(f"{mod}:{attr}")
            elif mod in known:
                roots.append(mod)
        return taken, roots

    def code(self, roots: Sequence[str]) -> dict[str, str]:
        """``{module or module:definition: fingerprint}`` of everything the roots run (see the module docstring)."""
        known = self.modules()
        parts: dict[str, str] = {}
        todo = list(roots)
        while todo:
            root = todo.pop()
            if root in parts:
                continue
            module, _, name = root.partition(":")
            if name:
                nodes, reached = self._definition(module, name)
                nodes = sorted(nodes, key=lambda n: n.lineno)  # found in set order: hash them in source order
                parts[root] = _digest([ast.dump(_strip_docstrings(copy.deepcopy(n))) for n in nodes])
                todo.extend(reached)
            elif module not in DISPATCHERS or root in roots:
                tree = self.tree(module)
                parts[root] = _digest(ast.dump(_strip_docstrings(copy.deepcopy(tree))))
                todo.extend(self._imported([tree], known))
        return dict(sorted(parts.items()))


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Provenance:
    """Fingerprints of stages for one run: the package's code, read once, and model weights, hashed once."""

    index: CodeIndex = field(default_factory=CodeIndex)
    versions: dict[str, str | None] = field(default_factory=library_versions)
    _weights: dict[str, str] = field(default_factory=dict)
    _code: dict[tuple[str, ...], dict[str, str]] = field(default_factory=dict)

    def weights(self, model: str) -> str:
        """What a model name stands for: the digest of its weight files for a local file or directory (a GGUF
        file, ``smollm2-135m-instruct``'s included), else the name itself (a hub name, or ``hpl-tiny``, whose
        config is part of the package's code)."""
        if model not in self._weights:
            from hpl_lightning.models import gguf_file

            try:
                local = gguf_file(model) or Path(model)
            except FileNotFoundError:  # a GGUF package not installed here: what the name says is all we know
                local = Path(model)
            if local.is_file():
                self._weights[model] = file_digest(local)
            elif local.is_dir():
                files = sorted(p for ext in ("*.safetensors", "*.bin", "config.json") for p in local.glob(ext))
                self._weights[model] = _digest([[p.name, file_digest(p)] for p in files])
            else:
                self._weights[model] = model
        return self._weights[model]

    def fingerprint(self, roots: Sequence[str], inputs: dict[str, Any]) -> dict[str, Any]:
        """A stage's provenance: the code it runs, the library versions and its inputs' identity, hashed."""
        key = tuple(roots)
        if key not in self._code:
            self._code[key] = self.index.code(roots)
        code = self._code[key]
        return {"fingerprint": _digest([code, self.versions, inputs]), "code": code, "versions": self.versions,
                "inputs": inputs}


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """What differs between a recorded provenance and the current one, in a few words."""
    if not recorded:
        return "no code fingerprint (made before the runner recorded one)"
    old, new = recorded.get("code", {}), current["code"]
    code = sorted(k.replace(f"{PACKAGE}.", "") for k in set(old) | set(new) if old.get(k) != new.get(k))
    what = [f"code changed: {', '.join(code[:4])}" + (f" and {len(code) - 4} more" if len(code) > 4 else "")] \
        if code else []
    what += [f"{k} {v} -> {current['versions'].get(k)}" for k, v in recorded.get("versions", {}).items()
             if v != current["versions"].get(k)]
    what += [f"input {k} changed" for k, v in recorded.get("inputs", {}).items() if v != current["inputs"].get(k)]
    return "; ".join(what) or "made by other code"
