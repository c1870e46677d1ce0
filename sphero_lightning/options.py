"""``sphero fit``'s options as the classes that take them declare them, read without importing those classes.

The classes (the data module, the module, the callbacks) are the one home of every option: its name, type, default
and description (their ``__init__`` signature and numpydoc docstring), and the ``Literal`` aliases of its choices.
LightningCLI builds the parser from them; this module reads the same source files with :mod:`ast` (a few tens of
milliseconds, no torch, Lightning, jsonargparse or zarr), so that ``sphero fit --help`` and the early checks of the
command line (:mod:`~sphero_lightning.commands.precheck`: a misspelt option, a value of the wrong type, a choice it
does not take) answer at once, and say the same as the full parser would.

>>> opts = fit_options()
>>> opts["solve.neighbours"].default, opts["data.destripe"].choices
(2, ('none', 'vertical', 'horizontal', 'both'))
>>> opts["data.ignore_value"].parse("0"), opts["data.ignore_value"].parse("null")
(0.0, None)
"""

from __future__ import annotations

import ast
import difflib
import inspect
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from .core.settings import BOUNDS, DEFAULTS, Bound, check_bounds  # noqa: F401 - the early checks' and the classes' one home

PACKAGE = Path(__file__).resolve().parent
#: ``sphero fit``'s option groups in the order a user needs them: the class each configures (file in the package, class).
GROUPS = (("data", "training/data.py", "ZarrPairDataModule"),
          ("model", "training/module.py", "RegistrationModule"),
          ("solve", "training/volume.py", "VolumeSolve"),
          ("pyramid", "training/callbacks.py", "PyramidSchedule"),
          ("early_stopping", "training/callbacks.py", "PairEarlyStopping"),
          ("output", "training/writer.py", "RegistrationWriter"))
#: Where the ``Literal`` aliases of the options' choices are defined (their one home, with the defaults).
ALIASES = ("core/settings.py",)
#: Options set from another group's (linked by the CLI): not options of their own.
LINKED = frozenset({"data.neighbours", "data.coarse_factor", "model.pairs_per_block"})
#: Options of ``sphero fit`` outside the groups.
TOP_LEVEL = ("config", "print_config", "seed_everything", "ckpt_path", "weights_only", "help", "help-all")
#: Trainer options whose value is a class or a list of them (their sub-keys are the parser's to check).
NESTED = ("trainer.logger", "trainer.callbacks", "trainer.strategy", "trainer.plugins", "trainer.profiler",
          "trainer.accelerator")

#: ``sphero fit --help``'s description (``sphero --help`` lists the same in lower case).
FIT_DESCRIPTION = "Register a Zarr stack: fit the pairwise transforms, compose, crop, write the aligned stack"

REQUIRED = object()


def is_null(text: str) -> bool:
    """Whether a command-line value says "no value" (``null`` or ``none``, any case)."""
    return text.strip().lower() in ("null", "none")


@dataclass(frozen=True)
class Option:
    """One option: ``group.name``, its annotation (as written), default (:data:`REQUIRED` where there is none),
    description (the docstring's) and choices (a ``Literal``'s values, or None)."""

    group: str
    name: str
    annotation: str
    default: Any
    doc: str
    choices: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.group}.{self.name}"

    @property
    def kind(self) -> str:
        """``int``, ``float``, ``bool``, ``str``, ``choice``, or ``other`` (lists, dicts: left to the full parser)."""
        if self.choices is not None:
            return "choice"
        base = [p for p in _parts(self.annotation) if p != "None"]
        return base[0] if len(base) == 1 and base[0] in ("int", "float", "bool", "str") else "other"

    @property
    def optional(self) -> bool:
        return "None" in _parts(self.annotation)

    def expected(self) -> str:
        """What a value must be, for a message."""
        what = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a text",
                "choice": "one of: " + ", ".join(self.choices or ()), "other": self.annotation}[self.kind]
        return what + (", or null" if self.optional else "")

    def parse(self, text: str) -> Any:
        """The value of ``text`` as the command line gives it; ``ValueError`` where it is not one."""
        if self.optional and is_null(text):
            return None
        kind = self.kind
        try:
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
        except ValueError:
            raise ValueError(self.expected()) from None
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError(self.expected())
        if kind == "choice" and text not in (self.choices or ()):
            raise ValueError(self.expected())
        return text




def _parts(annotation: str) -> list[str]:
    return [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]


def numpydoc_parameters(doc: str) -> dict[str, str]:
    """The numpydoc ``Parameters`` section of ``doc``: name -> description (``a, b : type`` names several)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Parameters") + 2
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for ln in lines[start:]:
        if ln and not ln.startswith(" "):
            if ln.strip() in ("Returns", "Examples", "Raises", "Notes") or set(ln.strip()) == {"-"}:
                break
            names = [n.strip() for n in ln.split(":", 1)[0].split(",")]
            for n in names:
                out[n] = ""
        elif names:
            for n in names:
                out[n] = (out[n] + " " + ln.strip()).strip()
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _literals() -> dict[str, tuple[str, ...]]:
    """``Name = Literal[...]`` aliases of :data:`ALIASES`: name -> values."""
    out: dict[str, tuple[str, ...]] = {}
    for rel in ALIASES:
        for node in _tree(PACKAGE / rel).body:
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                target, value = node.targets[0].id, node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                target, value = node.target.id, node.value
            if target and isinstance(value, ast.Subscript) and ast.unparse(value.value) in ("Literal", "typing.Literal"):
                elts = value.slice.elts if isinstance(value.slice, ast.Tuple) else [value.slice]
                out[target] = tuple(str(ast.literal_eval(e)) for e in elts)
    return out


def _constant(node: ast.expr) -> Any:
    """A default's value: a literal, arithmetic on literals (``1 << 22``), or a setting's one home
    (``MODEL.smoothing``: :mod:`~sphero_lightning.core.settings`); else its source text."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id.lower() in DEFAULTS:
        return getattr(DEFAULTS[node.value.id.lower()], node.attr)
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if all(isinstance(n, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)) for n in ast.walk(node)):
        return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})
    return ast.unparse(node)


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


@lru_cache(maxsize=1)
def fit_options() -> dict[str, Option]:
    """Every option of :data:`GROUPS` (linked ones included), ``"group.name"`` -> :class:`Option`, in order."""
    literals = _literals()
    out: dict[str, Option] = {}
    for group, rel, cls_name in GROUPS:
        cls = _class(_tree(PACKAGE / rel), cls_name)
        docs = numpydoc_parameters(ast.get_docstring(cls) or "")
        init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        args = init.args.args[1:]
        defaults = [REQUIRED] * (len(args) - len(init.args.defaults)) + list(init.args.defaults)
        for arg, default in zip(args, defaults, strict=True):
            annotation = ast.unparse(arg.annotation) if arg.annotation is not None else "Any"
            if default is not REQUIRED:
                default = _constant(default)
            choices = literals.get(annotation)
            if annotation.startswith("Literal["):
                choices = tuple(str(v) for v in ast.literal_eval(annotation[len("Literal"):]))
            out[f"{group}.{arg.arg}"] = Option(group, arg.arg, annotation, default, docs.get(arg.arg, ""), choices)
    return out


@lru_cache(maxsize=1)
def trainer_options() -> tuple[str, ...]:
    """The Trainer's own option names (its ``__init__``'s, read from the installed Lightning's source)."""
    spec = find_spec("lightning")
    if spec is None or not spec.submodule_search_locations:
        return ()
    path = Path(next(iter(spec.submodule_search_locations))) / "pytorch" / "trainer" / "trainer.py"
    try:
        init = next(n for n in _class(_tree(path), "Trainer").body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    except (OSError, StopIteration, SyntaxError):
        return ()
    return tuple(a.arg for a in init.args.kwonlyargs + init.args.args[1:])


def known(key: str) -> bool:
    """Whether ``key`` (``group.name``, no dashes) is an option of ``sphero fit`` (a Trainer option's sub-keys too)."""
    if key in fit_options() or key in TOP_LEVEL or key.split("=")[0] in TOP_LEVEL:
        return True
    if key.startswith("trainer."):
        name = key[len("trainer."):]
        trainer = trainer_options()
        return not trainer or name.split(".")[0] in trainer or any(key.startswith(n + ".") or key == n for n in NESTED)
    return key.startswith("model.loss_kwargs")


def closest(key: str) -> str | None:
    """The option a misspelt ``key`` most likely meant (US spellings, a wrong group), or None."""
    visible = [k for k in fit_options() if k not in LINKED]
    names = visible + [f"trainer.{n}" for n in trainer_options()]
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    if match:
        return match[0]
    tail = key.split(".", 1)[-1]  # the right name in the wrong group
    by_name = {k.split(".", 1)[1]: k for k in visible}
    match = difflib.get_close_matches(tail, list(by_name), n=1, cutoff=0.8)
    return by_name[match[0]] if match else None
