"""The kernel manifest (kernels_src/manifest.yaml) as Python values.

A KernelSpec names one instantiation: family, kernel and template parameter values. Its `uri`
is the one name of that specialization (cache entries, logs, the compile table); its
`name_expr` is the C++ expression the compilers instantiate and look up (string values through
the manifest's `cpp_names`). A family's `defaults` fill the parameters a caller leaves out.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from .backends.source import KERNELS_DIR


@dataclass(frozen=True)
class KernelSpec:
    family: str
    kernel: str
    params: tuple[tuple[str, Any], ...]  # template parameters, in template order

    @property
    def info(self) -> dict[str, Any]:
        return load()["families"][self.family]

    @property
    def source_file(self) -> str:
        return self.info["source"]

    @property
    def params_type(self) -> str:
        return self.info["params_type"]

    @property
    def entry(self) -> str:
        return self.info["kernels"][self.kernel]["entry"]

    @property
    def name_expr(self) -> str:
        args = []
        for name, v in self.params:
            if isinstance(v, bool):
                args.append("true" if v else "false")
            elif isinstance(v, str):
                args.append(cpp_name(self.family, name, v))
            else:
                args.append(str(int(v)))
        return f"{self.entry}<{', '.join(args)}>"

    @property
    def uri(self) -> str:
        vals = ",".join(f"{k}={str(v).lower()}" for k, v in self.params)
        return f"{self.family}.{self.kernel}[{vals}]"

    def __str__(self) -> str:
        return self.uri


@functools.lru_cache(maxsize=None)
def load(path: Path | None = None) -> dict[str, Any]:
    with open(path or KERNELS_DIR / "manifest.yaml") as f:
        return yaml.safe_load(f)


def cpp_name(family: str, param: str, value: str) -> str:
    """The C++ name of a string template value: the family's `cpp_names`, else the manifest's."""
    doc = load()
    for names in (doc["families"][family].get("cpp_names", {}), doc.get("cpp_names", {})):
        if value in names.get(param, {}):
            return names[param][value]
    raise ValueError(f"{family}: no C++ name for {param}={value!r} in the manifest's cpp_names")


def _admits(rule: Any, value: Any) -> bool:
    if isinstance(rule, list):
        return value in rule and type(value) is type(rule[rule.index(value)])
    if isinstance(rule, dict):
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value % rule.get("multiple_of", 1) == 0
            and rule.get("min", value) <= value <= rule.get("max", value)
        )
    raise ValueError(f"bad manifest rule {rule!r}")


def spec(family: str, kernel: str, **values: Any) -> KernelSpec:
    """The instantiation `family.kernel` with these template values, the family's `defaults`
    filling the parameters left out; ValueError if the manifest does not allow it (the message
    says which parameter and what is allowed)."""
    fams = load()["families"]
    if family not in fams or kernel not in fams[family]["kernels"]:
        raise ValueError(f"no kernel {family}.{kernel} in the manifest")
    order = fams[family]["kernels"][kernel]["template"]
    defaults = fams[family].get("defaults", {})
    values = {**{n: defaults[n] for n in order if n in defaults}, **values}
    if set(values) != set(order):
        raise ValueError(f"{family}.{kernel} takes template parameters {order}, got {sorted(values)}")
    allowed = fams[family]["allowed"]
    for name in order:
        if not _admits(allowed[name], values[name]):
            raise ValueError(
                f"{family}.{kernel}: {name}={values[name]!r} is not supported (allowed: {allowed[name]})"
            )
    return KernelSpec(family, kernel, tuple((n, values[n]) for n in order))


def default_instantiations(family: str | None = None) -> Iterator[KernelSpec]:
    """Every instantiation the manifest lists (what compile-all and warmup build)."""
    for fam, info in load()["families"].items():
        if family is not None and fam != family:
            continue
        for line in info["instantiations"]:
            kernel = line["kernel"]
            names = [n for n in info["kernels"][kernel]["template"] if n in line]  # the rest: defaults
            lists = [line[n] if isinstance(line[n], list) else [line[n]] for n in names]
            for combo in itertools.product(*lists):
                yield spec(fam, kernel, **dict(zip(names, combo)))


def spec_from_uri(uri: str) -> KernelSpec:
    """The spec a URI names ("family.kernel[a=1,b=true,c=fp16]"); ValueError if it is not one or
    the manifest does not allow it."""
    m = re.fullmatch(r"(\w+)\.(\w+)\[(.*)\]", uri)
    if not m:
        raise ValueError(f"not a kernel URI: {uri!r}")
    values: dict[str, Any] = {}
    for part in filter(None, m.group(3).split(",")):
        key, _, text = part.partition("=")
        values[key] = {"true": True, "false": False}.get(text, int(text) if text.lstrip("-").isdigit() else text)
    return spec(m.group(1), m.group(2), **values)
