"""The import arrows between the project's parts are the documented ones (docs/layout.md).

Every ``import`` and ``from ... import`` statement of every module (at any depth: a lazy
import inside a function is an arrow too) is read with ``ast`` and checked against the
rules below; the most specific rule for a module applies. A pattern ``x.*`` allows ``x``
and everything below it; any other pattern is one module.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dinov", "eval", "designers", "demo", "slurm")
# the modality-free meta core: the LM module will drive it as the vision hook does
CORE = ("designers", "designers.meta", "designers.calibration", "designers.registry",
        "designers.value", "designers.config")
DINOV_GENERIC = ("dinov", "dinov.config", "dinov.checkpoint", "dinov.distributed", "dinov.runs",
                 "dinov.cli", "dinov.preemption", "dinov.sharded")
LANGUAGE_EVAL = ("eval", "eval.pipeline", "eval.lm", "eval.gsm8k")
# module prefix -> what its modules may import of ours
RULES: dict[str, tuple[str, ...]] = {
    "dinov": ("dinov.*",),  # the learner library imports none of the other parts
    "eval": ("eval.*", "dinov.*"),
    "designers": (*CORE, *DINOV_GENERIC),  # the core: no vision, no LM, no learner internals
    "designers.vision": ("designers.*", "dinov.*", "eval.*"),
    "designers.train": ("designers.*", "dinov.*"),  # the vision entry point
    # the language-model evaluation and what it shares: no vision code
    "eval.pipeline": ("eval.pipeline", *DINOV_GENERIC),
    "eval.lm": ("eval.lm", "eval.pipeline", *DINOV_GENERIC),
    "eval.gsm8k": ("eval.gsm8k", *LANGUAGE_EVAL, *DINOV_GENERIC),
    "designers.lm": ("designers.lm.*", *CORE, *LANGUAGE_EVAL, *DINOV_GENERIC),
    "demo": ("demo.*", "designers.*", "dinov.*", "eval.*"),
    # the launcher: the generic learner parts; entry points are imported by name at run time
    "slurm": ("slurm.*", *DINOV_GENERIC),
}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: pathlib.Path) -> bool:
    base = root / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imported(path: pathlib.Path, root: pathlib.Path) -> set[str]:
    """Our modules ``path`` imports (``from a import b``: ``a``, and ``a.b`` if a module)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}", root))
    return {name for name in found if name.split(".")[0] in PACKAGES}


def rule_for(module: str) -> str:
    return max((p for p in RULES if module == p or module.startswith(p + ".")), key=len)


def allowed(name: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.endswith(".*"):
            base = pattern[:-2]
            if name == base or name.startswith(base + "."):
                return True
        elif name == pattern:
            return True
    return False


def violations(root: pathlib.Path = ROOT) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            rule = rule_for(module)
            found += [f"{module} imports {name} (rule '{rule}' allows {list(RULES[rule])})"
                      for name in sorted(imported(path, root)) if not allowed(name, RULES[rule])]
    return found


def test_import_arrows_are_the_documented_ones():
    assert violations() == []


def test_the_check_reports_forbidden_arrows(tmp_path: pathlib.Path):
    """A core module importing vision code (even lazily, even relatively) or the learner
    library importing a designer is reported; allowed arrows are not."""
    files = {
        "dinov/__init__.py": "",
        "dinov/config.py": "",
        "dinov/models/__init__.py": "",
        "dinov/train.py": "def f():\n    from designers import meta\n",
        "eval/__init__.py": "import dinov.models\n",
        "designers/__init__.py": "",
        "designers/meta.py": "from dinov import config\nfrom .vision import hook\n",
        "designers/vision/__init__.py": "",
        "designers/vision/hook.py": "from designers.meta import x\nimport eval\nimport dinov.models\n",
        "demo/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert sorted(v.split(" (")[0] for v in found) == [
        "designers.meta imports designers.vision",
        "designers.meta imports designers.vision.hook",
        "dinov.train imports designers",
        "dinov.train imports designers.meta",
    ], found
