"""The package's layers: imports go one way and never in a circle, and the README's module map matches the folders."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sphero_lightning"
README = Path(__file__).resolve().parents[1] / "README.md"
#: What each layer may import from the package (besides itself): commands and api on top, core at the bottom
#: (``_version``: the version string).
ALLOWED = {
    "core": {"errors"},
    "storage": {"errors", "core", "_version"},
    "report": {"errors", "core"},
    "training": {"errors", "threads", "options", "core", "storage", "report", "_version"},
    "commands": {"errors", "threads", "options", "core", "storage", "training", "report", "_version"},
    "api": {"errors", "threads", "options", "core", "storage", "training", "report", "_version"},
    "options": {"errors", "core"},  # reads the classes' source files, imports none of them; core.settings: the defaults, ranges
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "_version":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every import of a package module by a package module, wherever it is (top level, in functions, under
    TYPE_CHECKING): module -> imported modules."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                else:
                    target = (node.module or "").split(".")
                if target[0] != "sphero_lightning":
                    continue
                mod = ".".join(target)
                for alias in node.names:  # "from . import x" may name a submodule
                    sub = f"{mod}.{alias.name}"
                    deps.add(sub if sub in modules else mod)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("sphero_lightning")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "_version"


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_import_one_way():
    bad = []
    for m, deps in import_graph().items():
        layer = _layer(m)
        if layer not in ALLOWED:
            continue
        for d in deps:
            dl = _layer(d)
            if dl != layer and dl not in ALLOWED[layer]:
                bad.append(f"{m} imports {d}")
    assert not bad, bad


def _third_party(path: Path) -> set[str]:
    """Top-level names of the non-package modules a file imports (anywhere in it)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - {"sphero_lightning"}


def test_core_needs_no_storage_or_lightning_and_storage_no_torch():
    """core is numerics only: no zarr, no Lightning (it runs without either); storage is data only: no torch, except
    where a module's docstring says why it does."""
    bad = [f"core/{p.name} imports {sorted(_third_party(p) & {'zarr', 'lightning', 'jsonargparse', 'dask'})}"
           for p in (PKG / "core").glob("*.py") if _third_party(p) & {"zarr", "lightning", "jsonargparse", "dask"}]
    for p in (PKG / "storage").glob("*.py"):
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        if "torch" in _third_party(p) and "imports torch" not in doc:
            bad.append(f"storage/{p.name} imports torch without saying why in its docstring")
    assert not bad, bad


def test_no_module_writes_attributes_of_objects_it_does_not_own():
    """A grep-level check: no assignment to an attribute of the datamodule, the module, the trainer or a callback from
    outside it (state flows through return values and the owners' methods). The one exception is the Trainer's fit
    loop length, which Lightning offers no other way to set and the blocks decide (one epoch per block)."""
    pattern = re.compile(r"(?<![\w.])(dm|trainer|pl_module|module|datamodule|bar|writer|cli|self\.trainer|self\._trainer)"
                         r"\.[A-Za-z_.]+\s*[-+*/]?=[^=]")
    allowed = re.compile(r"trainer\.fit_loop\.max_epochs\s*=")
    bad = [f"{p.relative_to(PKG)}:{i}: {line.strip()}" for p in PKG.rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if pattern.search(line) and not allowed.search(line) and not line.lstrip().startswith("#")]
    assert not bad, bad


def test_no_module_much_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_readme_module_map_matches_the_folders():
    text = README.read_text()
    named = set(re.findall(r"`sphero_lightning/([a-z_]+)/`", text))
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert named == folders, (named, folders)
    for folder in folders:  # every module of a folder is named in the map
        for p in (PKG / folder).glob("*.py"):
            if p.name != "__init__.py":
                assert f"`{p.name}`" in text, f"README module map misses {folder}/{p.name}"


def test_doctests_pass():
    """Every example in the package's docstrings runs and prints what it says."""
    import doctest
    import importlib

    failed = {}
    for p in sorted(PKG.rglob("*.py")):
        if ">>>" in p.read_text():
            name = _module_name(p)
            result = doctest.testmod(importlib.import_module(name), report=False)
            if result.failed:
                failed[name] = result.failed
    assert not failed, failed


def test_every_core_module_that_defines_a_convention_shows_it_in_an_example():
    """Issue 38: the frames, the solve, the volume, the crop and the interpolation each state their convention in a
    runnable example (test_doctests_pass runs them), not only in prose."""
    for name in ("transforms", "frames", "solve", "volume", "crop", "interpolation", "warping"):
        assert ">>>" in (PKG / "core" / f"{name}.py").read_text(), name


def test_pair_statuses_are_set_and_read_only_through_the_core_type():
    """Issue 38: a pair's status is a core.records.PairStatus wherever the package sets or compares one (a string
    literal spelt in one module and read in another drifted apart silently)."""
    from sphero_lightning.core.records import PairStatus

    values = {s.value for s in PairStatus}

    def literal(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in values

    bad = []
    for p in PKG.rglob("*.py"):
        if p.name == "records.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            hits = []
            if isinstance(node, ast.Compare) and "status" in ast.unparse(node):
                hits = [n for n in [node.left, *node.comparators] if literal(n) or
                        (isinstance(n, (ast.Tuple, ast.Set, ast.List)) and any(literal(e) for e in n.elts))]
            elif isinstance(node, ast.Assign) and any("status" in ast.unparse(t) for t in node.targets):
                hits = [node.value] if literal(node.value) else []
            elif isinstance(node, ast.Dict):
                hits = [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "status"
                        and literal(v)]
            bad += [f"{p.relative_to(PKG)}:{node.lineno}" for _ in hits]
    assert not bad, bad


#: Parameters named like an option that take a value of their own, and why.
OWN_DEFAULTS = {
    ("commands/apply.py", "apply_registration", "interpolation"): "'auto': the interpolation the registration recorded",
    ("core/objective.py", "evaluate", "curvature"): "a switch (compute the Gauss-Newton curvature), not the option",
    ("core/frames.py", "is_identity", "tol"): "a matrix entry's tolerance (0: exact), not the loss's flatness",
}


def test_every_option_default_and_choice_is_defined_once():
    """Issue 38: every option's default and choices have one home, core/settings.py; the command line (LightningCLI
    reads the classes' signatures), the early checks and ``--help`` (options.fit_options reads the same source),
    the Python API (register_stack builds the same classes), configs/reg.yaml and every core or storage function that
    takes the same setting say what it says. Catches a default changed in one place and not in another."""
    import dataclasses
    import inspect
    import typing
    from importlib import import_module

    import yaml

    from sphero_lightning.core import settings
    from sphero_lightning.options import GROUPS, LINKED, REQUIRED, fit_options

    # choices: a Literal alias is written only in core/settings.py
    aliases = [f"{p.relative_to(PKG)}:{n.lineno}" for p in PKG.rglob("*.py") if p.name != "settings.py"
               for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.Assign, ast.AnnAssign)) and
               isinstance(n.value, ast.Subscript) and ast.unparse(n.value.value).endswith("Literal")]
    assert not aliases, f"Literal choices defined outside core/settings.py: {aliases}"
    options = fit_options()
    config = yaml.safe_load((PKG.parent / "configs" / "reg.yaml").read_text())
    for group, rel, cls_name in GROUPS:
        home = settings.DEFAULTS[group]
        fields = {f.name: getattr(home, f.name) for f in dataclasses.fields(home)}
        cls = getattr(import_module("sphero_lightning." + rel.removesuffix(".py").replace("/", ".")), cls_name)
        signature = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        own = {k.split(".", 1)[1] for k, o in options.items() if k.startswith(group + ".") and k not in LINKED
               and o.default is not REQUIRED}
        assert own == set(fields), (group, own ^ set(fields))
        for name, value in fields.items():
            key = f"{group}.{name}"
            assert options[key].default == value, (key, "early checks / --help", options[key].default, value)
            assert signature[name] == value, (key, f"{cls_name} (the command line)", signature[name], value)
            cfg = config[group].get(name, value)
            assert cfg == value or (value is None and cfg == {}), (key, "configs/reg.yaml", cfg, value)
            choices = typing.get_args(typing.get_type_hints(type(home))[name])
            if options[key].choices is not None:
                assert tuple(options[key].choices) == tuple(choices), (key, options[key].choices, choices)
    # the source: the classes' defaults name their home; no function repeats a setting's value as a literal
    names = {f.name for g in settings.DEFAULTS.values() for f in dataclasses.fields(g)}
    literal = []
    for p in PKG.rglob("*.py"):
        rel = str(p.relative_to(PKG))
        if rel == "core/settings.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            pos = a.posonlyargs + a.args
            given = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + \
                [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in given:
                if arg.arg in names and isinstance(default, ast.Constant) and default.value is not None \
                        and (rel, node.name, arg.arg) not in OWN_DEFAULTS:
                    literal.append(f"{rel}:{node.lineno} {node.name}({arg.arg}={default.value!r})")
    assert not literal, f"a setting's default written as a literal instead of core.settings's: {literal}"
    from sphero_lightning.api import register_stack

    assert inspect.signature(register_stack).parameters["transformation"].default == settings.MODEL.transformation


#: The frame type's module (core.frames: ``Frame``, ``Affine``, the point conversions): the only one that spells out a
#: conversion between coordinate frames or tests a matrix for the identity.
FRAME_HOME = "core/frames.py"
#: Loops that write a frame's formula into their own arithmetic, and why they may.
FRAME_FORMULA_EXEMPT = {
    "core/_jit.py": "numba kernels: a compiled loop cannot call the frame type (pixel_map: normalized -> pixel rows)",
    "core/interpolation.py:axis_taps": "the B-spline taps' normalized positions, computed in place for speed",
}
EYE = re.compile(r"^(\w+\.)*eye\b")  # an operand that is an identity matrix: eye, np.eye(3)[:2], torch.eye(...)


def _is_const(node: ast.AST, *values: float) -> bool:
    return isinstance(node, ast.Constant) and not isinstance(node.value, bool) and node.value in values


def frame_telltales(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` of every expression that converts between frames or tests for the identity: ``(X - 1) / 2``
    (the pixel frame's centre, also inside ``((x + 1) * W - 1) / 2``), ``(2 * x + 1) / W`` (pixel -> normalized),
    ``2 / W`` (the normalized frame's scale), and an (array_)equal / allclose / isclose / ``==`` with an ``eye``."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left, right = node.left, node.right
            if _is_const(right, 2, 2.0) and isinstance(left, ast.BinOp) and isinstance(left.op, ast.Sub) \
                    and _is_const(left.right, 1, 1.0):
                hits.append((node.lineno, f"centre: {ast.unparse(node)}"))
            elif isinstance(left, ast.BinOp) and isinstance(left.op, ast.Add) and _is_const(left.right, 1, 1.0) \
                    and isinstance(left.left, ast.BinOp) and isinstance(left.left.op, ast.Mult) \
                    and _is_const(left.left.left, 2, 2.0):
                hits.append((node.lineno, f"to normalized: {ast.unparse(node)}"))
            elif _is_const(left, 2, 2.0) and not isinstance(right, ast.Constant):
                hits.append((node.lineno, f"scale: {ast.unparse(node)}"))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in {"equal", "array_equal", "array_equiv", "allclose", "isclose"} and \
                    any(EYE.search(ast.unparse(a)) for a in node.args):
                hits.append((node.lineno, f"identity: {ast.unparse(node)}"))
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops) and \
                any(EYE.search(ast.unparse(a)) for a in [node.left, *node.comparators]):
            hits.append((node.lineno, f"identity: {ast.unparse(node)}"))
    return hits


def _function_at(tree: ast.AST, line: int) -> str:
    """The innermost function around ``line`` ("" at module level)."""
    around = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
              and n.lineno <= line <= (n.end_lineno or 0)]
    return min(around, key=lambda n: (n.end_lineno or 0) - n.lineno).name if around else ""


def test_frame_conversions_and_the_identity_test_live_in_the_frame_type():
    """Issue 38: a conversion between the normalized, centred and pixel frames (a matrix's or a point's) and the test
    for the identity (slice 0's transform) are written once, in core.frames (``Affine.to``, ``Affine.is_identity``,
    ``pixel_centre``, ``pixel_coords``, ``normalized_coords``); every other module calls them, except the loops in
    FRAME_FORMULA_EXEMPT. The same formula written in several modules drifted apart before (align_corners
    conventions, ``(W - 1) / 2`` against ``W / 2``)."""
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG))
        if rel == FRAME_HOME or rel in FRAME_FORMULA_EXEMPT:
            continue
        tree = ast.parse(p.read_text())
        bad += [f"{rel}:{line}: {what}" for line, what in frame_telltales(tree)
                if f"{rel}:{_function_at(tree, line)}" not in FRAME_FORMULA_EXEMPT]
    assert not bad, bad
    home = {what.split(":")[0] for _, what in frame_telltales(ast.parse((PKG / FRAME_HOME).read_text()))}
    assert home == {"centre", "to normalized", "scale", "identity"}, home  # the patterns still find what they look for



def test_pair_records_are_typed_as_the_core_type():
    """Issue 38: a pair's record is a core.records.PairRecord wherever the package names one (``fitted``, ``log``,
    ``entry``, ``results``): its keys are learnt from one TypedDict, not from the module that happened to fill it."""
    names = {"fitted", "log", "entry", "results", "record"}
    bad = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            target, ann = None, None
            if isinstance(node, ast.arg) and node.annotation is not None:
                target, ann = node.arg, node.annotation
            elif isinstance(node, ast.AnnAssign):
                target, ann = ast.unparse(node.target).removeprefix("self."), node.annotation
            if target in names and re.search(r"\bdict\b(?!\[str, ?str\])", ast.unparse(ann)) and "PairRecord" not in ast.unparse(ann):
                bad.append(f"{p.relative_to(PKG)}:{node.lineno} {target}: {ast.unparse(ann)}")
    assert not bad, bad
