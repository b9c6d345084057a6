"""What the planners' option values share: the fields pinned away from the defaults, and a text
form that custom-op schemas can carry (torch.library takes no dataclasses)."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

OptionsT = TypeVar("OptionsT", bound="Options")


class Options:
    """Mixin for the frozen option dataclasses (DecodeOptions, W4A16Options)."""

    def pinned(self) -> dict[str, object]:
        """The fields set away from their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) != f.default}

    def as_text(self) -> str:
        """'variant=split-mma,num_splits=4': the pinned fields; '' for the defaults."""
        return ",".join(f"{k}={v}" for k, v in self.pinned().items())

    @classmethod
    def from_text(cls: type[OptionsT], text: str) -> OptionsT:
        """The inverse of as_text."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values: dict[str, object] = {}
        for item in filter(None, text.split(",")):
            name, _, raw = item.partition("=")
            if name not in types:
                raise ValueError(f"{cls.__name__}: no option {name!r}")
            kind = str(types[name])
            values[name] = raw if "str" in kind else raw == "True" if "bool" in kind else int(raw)
        return cls(**values)
