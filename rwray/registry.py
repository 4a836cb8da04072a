"""Registries as data: a name maps to a typed parameter model and a factory.

Every pluggable part (data source, model, method) is one `Entry`. The config schema is built from these
entries (a pydantic union discriminated on ``name``), so adding a part never touches the schema by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from rwray.errors import UnknownName

T = TypeVar("T")


class Params(BaseModel):
    """Base for every registered part's parameters: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    params: type[Params]
    build: Callable[..., T]
    doc: str = ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, params: type[Params], build: Callable[..., T], doc: str = "") -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, params, build, doc)

    def __getitem__(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def build(self, params: Params, *args: Any, **kwargs: Any) -> T:
        return self[params.name].build(params, *args, **kwargs)  # type: ignore[attr-defined]


def union_of(registry: Registry[Any]) -> Any:
    """The pydantic type accepting any registered part's Params, chosen by its ``name`` field.

    Each Params class declares ``name: Literal["<its name>"]``; an unknown name is reported with the valid choices.
    """
    from typing import Annotated, Union

    from pydantic import Field

    types = tuple(e.params for e in registry.entries())
    if len(types) == 1:  # a one-member union is just that type; its Literal name still rejects other names
        return types[0]
    return Annotated[Union[types], Field(discriminator="name")]  # type: ignore[valid-type]
