"""The layering rules, checked on the source so they hold without anyone's memory.

Python (read with `ast`, function-level imports included):
  1. Imports go one way: public API -> custom ops -> implementation -> runtime -> backends (the
     integrations with other libraries sit above the API; the tools on top may use anything; the
     one exception, LAZY_EXPORTS, is the package's lazy re-export of the transformers integration).
     Every module of the package has a layer in LAYERS: a new module must be placed before it can land.
  2. Only ikport.backends imports the vendor bindings (cuda-python's `cuda`, hip-python's `hip`).
  3. ikport.backends imports nothing of ikport outside itself (rule 1, with its own message).
  4. Target names ("sm_90", "gfx942") appear only in backends/ (the table of target facts) and
     the tools: everything else asks backends/target.py for facts instead of testing names.
C++:
  5. No vendor conditionals outside portability/: kernels_src/ names no compiler or arch macro
     (`__CUDA_ARCH__`, `__HIP_PLATFORM_AMD__`, `__gfx942__`, ...); kernels use the shim's
     vocabulary and its feature macros (IK_HAS_MMA, ...).

`test_a_planted_violation_of_each_rule_fails` shows each rule catching a planted violation.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layers, lowest first. A pattern ending in ".*" covers a package's submodules.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("backends", ("ikport.backends", "ikport.backends.*")),
    ("runtime", ("ikport._version", "ikport.knobs", "ikport.log", "ikport.manifest", "ikport.kernels",
                 "ikport.launch", "ikport.dispatch")),
    ("implementation", ("ikport.plan", "ikport.plan.*", "ikport.impl", "ikport.impl.*", "ikport.checks",
                        "ikport.reference", "ikport.int4", "ikport.formats", "ikport.kvquant")),
    ("ops", ("ikport.ops",)),
    ("api", ("ikport", "ikport.attention", "ikport.w4a16", "ikport.nn", "ikport.kvcache")),
    ("integrations", ("ikport.integrations", "ikport.integrations.*")),
    ("tools", ("ikport.__main__", "ikport.warmup", "ikport.report", "ikport.toolchain", "ikport.bench",
               "ikport.bench.*")),
]
# Upward imports allowed as lazy re-exports: the package's PEP 562 __getattr__ imports the transformers
# integration on first use of ikport.generate / ikport.IkportCache (and only there: checked below).
LAZY_EXPORTS = {("ikport", "ikport.integrations.transformers")}
VENDOR_BINDINGS = ("cuda", "hip")  # top-level packages of cuda-python and hip-python
TARGET_NAME = re.compile(r"^(sm_\d+a?|gfx\d+[a-z]?)$")
VENDOR_MACRO = re.compile(r"\b(__CUDA_ARCH__|__CUDACC\w*__|__NVCC__|__HIP\w*__|__HIPCC\w*__|__gfx\w+__|"
                          r"__AMDGCN\w*__|__AMDGPU\w*__)")


@functools.lru_cache(maxsize=None)
def _tree(source: str) -> list[ast.AST]:
    return list(ast.walk(ast.parse(source)))


@functools.lru_cache(maxsize=None)
def package_modules(root: Path = ROOT) -> dict[str, str]:
    """Module name -> source text of the installed package: ikport/ plus backends/ (installed as
    ikport.backends); portability/ and kernels_src/ hold no Python modules of note."""
    out = {}
    for folder, prefix in ((root / "ikport", "ikport"), (root / "backends", "ikport.backends")):
        for path in sorted(folder.rglob("*.py")):
            if path.is_symlink() or any(p.is_symlink() for p in path.relative_to(folder).parents if p != Path(".")):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path.read_text()
    return out


def layer_of(module: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        for pat in patterns:
            if module == pat or (pat.endswith(".*") and module.startswith(pat[:-1])):
                return index
    return None


def _is_package(name: str, modules: dict[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in modules)


def imports(name: str, source: str, modules: dict[str, str]) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `source` (module `name`), relative ones resolved;
    `from pkg import x` names pkg.x where that is a module."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found = []
    for node in _tree(source):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else target))
    return found


def violations(modules: dict[str, str], kernel_sources: dict[str, str]) -> list[str]:
    out = []
    for name, source in modules.items():
        here = layer_of(name)
        if here is None:
            out.append(f"{name}: no layer (add it to LAYERS in tests/test_layering.py)")
            continue
        for line, target in imports(name, source, modules):
            top = target.split(".")[0]
            if top in VENDOR_BINDINGS and not name.startswith("ikport.backends"):
                out.append(f"{name}:{line}: imports the vendor bindings {target!r} (only ikport.backends may)")
            if top != "ikport":
                continue
            there = layer_of(target)
            if name.startswith("ikport.backends") and not target.startswith("ikport.backends"):
                out.append(f"{name}:{line}: backends import {target!r} (backends import nothing of ikport)")
            elif there is None:
                out.append(f"{name}:{line}: imports {target!r}, which has no layer")
            elif there > here and (name, target) not in LAZY_EXPORTS:
                out.append(f"{name}:{line}: {LAYERS[here][0]} imports {target!r} ({LAYERS[there][0]}): "
                           "imports go API -> ops -> implementation -> runtime -> backends")
        if LAYERS[here][0] not in ("backends", "tools"):
            for node in _tree(source):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and TARGET_NAME.match(node.value):
                    out.append(f"{name}:{node.lineno}: names the target {node.value!r} (ask backends/target.py)")
    for path, text in kernel_sources.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            m = VENDOR_MACRO.search(line.split("//")[0])
            if m:
                out.append(f"{path}:{lineno}: vendor conditional {m.group(1)} outside portability/")
    return out


def kernel_sources(root: Path = ROOT) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted((root / "kernels_src").rglob("*.cuh"))}


def test_the_tree_keeps_the_layering_rules():
    assert violations(package_modules(), kernel_sources()) == []


def test_every_layer_pattern_names_modules_that_exist():
    modules = package_modules()
    for layer, patterns in LAYERS:
        for pat in patterns:
            assert any(layer_of(m) is not None and (m == pat or m.startswith(pat[:-1])) for m in modules), (layer, pat)


def test_lazy_exports_are_imported_only_inside_a_function():
    """A LAZY_EXPORTS import at module level would make `import ikport` import transformers."""
    modules = package_modules()
    for name, target in LAZY_EXPORTS:
        tree = ast.parse(modules[name])
        module_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        found = imports(name, "\n".join(ast.unparse(node) for node in module_level), modules)
        assert target not in [t for _, t in found], f"{name} imports {target} at module level"
        assert target in [t for _, t in imports(name, modules[name], modules)], f"{name} no longer imports {target}"


PLANTED = [  # (module, source, what the report must say)
    ("ikport.kernels", "from .attention import attention\n", "runtime imports 'ikport.attention' (api)"),
    ("ikport.impl.attention", "def f():\n    from .. import ops\n", "implementation imports 'ikport.ops' (ops)"),
    ("ikport.plan.decode", "from cuda.bindings import driver\n", "imports the vendor bindings 'cuda.bindings'"),
    ("ikport.backends.hip", "from ikport import knobs\n", "backends import 'ikport.knobs'"),
    ("ikport.plan.decode", "X = 1 if arch == 'gfx942' else 2\n", "names the target 'gfx942'"),
    ("ikport.shiny", "x = 1\n", "ikport.shiny: no layer"),
    ("ikport.attention", "def f():\n    from .integrations import transformers\n",
     "api imports 'ikport.integrations.transformers' (integrations)"),
]


@pytest.mark.parametrize("module,source,message", PLANTED, ids=[p[2].split()[0] for p in PLANTED])
def test_a_planted_violation_of_each_rule_fails(module, source, message):
    modules = dict(package_modules())
    modules[module] = modules.get(module, "") + "\n" + source
    found = violations(modules, {})
    assert any(message in v for v in found), found


def test_a_planted_vendor_conditional_in_a_kernel_fails():
    found = violations({}, {"kernels_src/x.cuh": "#if defined(__gfx942__)\n#endif\n// __CUDA_ARCH__ in a comment\n"})
    assert found == ["kernels_src/x.cuh:1: vendor conditional __gfx942__ outside portability/"]
