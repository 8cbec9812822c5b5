"""Settings declared once: each environment variable lives on the dataclass field it fills.

A field declared with :func:`variable` carries the variable's name, its documentation and its
bounds; its type is the field's annotation and its default the field's default. Parsing
(:func:`parse`), ``meterflow config`` and docs/configuration.md (:func:`table`) all read that
one declaration, so a name, a default or a bound cannot drift between them. A field whose type
is itself a declared dataclass (the rules' thresholds) is parsed from its own variables.

Types understood: ``str``, ``int``, ``float``, ``bool`` (``on``/``off``), ``Path``, ``date``,
``Literal[...]`` of strings (the allowed values), and ``dict[K, float]`` with ``keys`` (one
variable per key, the name's ``{key}`` filled in). A value the type cannot take raises one
:class:`~meterflow.core.errors.ConfigError` line naming the variable, never a traceback.

A secret (``variable(..., secret=True)``: a password, a URI that may carry one):

* may be given as ``NAME_FILE`` instead, the path of a file holding the value (as Docker
  secrets provide it; one trailing newline is dropped); both set is an error;
* is refused while it still holds the ``.env.example`` placeholder (:data:`PLACEHOLDER`),
  from the variable or from the file;
* is shown as ``***`` by :func:`redacted_repr` (``__repr__ = variables.redacted_repr`` in a
  settings class), and never by ``meterflow config``, which lists defaults only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from meterflow.core.errors import ConfigError

#: What .env.example puts where a secret must go; refused wherever a secret is read.
PLACEHOLDER = "CHANGE-ME"
_METADATA_KEY = "meterflow.variable"
T = TypeVar("T")


@dataclass(frozen=True)
class Variable:
    """How one field is read from the environment (its type and default are the field's)."""

    name: str
    doc: str
    minimum: float | None = None
    #: For ``dict`` fields: the keys, one variable each (``name`` holds ``{key}``).
    keys: tuple[str, ...] = ()
    #: A parser for a value no plain type describes (it raises ValueError with the remedy).
    parse: Callable[[str], Any] | None = None
    #: How the default is written in the docs, when ``str(default)`` would not say it.
    shown: str | None = None
    #: A secret: may come from ``NAME_FILE``, the placeholder is refused, reprs hide it.
    secret: bool = False


def variable(
    name: str,
    doc: str,
    default: Any = MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    minimum: float | None = None,
    keys: tuple[str, ...] = (),
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field read from the environment variable ``name`` (see the module doc)."""
    declared = Variable(name, doc, minimum, keys, parse, shown, secret)
    if default_factory is not None:
        return dataclasses.field(
            default_factory=default_factory, metadata={_METADATA_KEY: declared}
        )
    return dataclasses.field(default=default, metadata={_METADATA_KEY: declared})


@dataclass(frozen=True)
class Entry:
    """One variable as the docs list it."""

    name: str
    default: str
    kind: str
    doc: str


def _declared(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any, Variable | None]]:
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        yield field, hints[field.name], field.metadata.get(_METADATA_KEY)


def _is_declared(kind: Any) -> bool:
    return (
        isinstance(kind, type)
        and dataclasses.is_dataclass(kind)
        and any(declared is not None for _, _, declared in _declared(kind))
    )


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


def _convert(kind: Any, raw: str, declared: Variable, name: str) -> Any:
    """``raw`` (stripped, not empty) as ``kind``; a ConfigError naming ``name`` if it is not."""
    if declared.parse is not None:
        try:
            return declared.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r} {exc}") from None
    if get_origin(kind) is Literal:
        allowed = tuple(str(choice) for choice in get_args(kind))
        value = raw.lower()
        if value not in allowed:
            raise ConfigError(f"{name}={raw!r} must be {_either(allowed)}")
        return value
    if kind is bool:
        value = raw.lower()
        if value not in ("on", "off"):
            raise ConfigError(f"{name}={raw!r} must be on or off")
        return value == "on"
    if kind is int or kind is float:
        try:
            number: float = int(raw) if kind is int else float(raw)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{name}={raw!r} is not {noun}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}={raw!r} is not a finite number")
        if declared.minimum is not None and number < declared.minimum:
            raise ConfigError(f"{name}={raw!r} must be at least {declared.minimum:g}")
        return number
    if kind is Path:
        return Path(raw).expanduser().absolute()
    if kind is date:
        try:
            return date.fromisoformat(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a date (YYYY-MM-DD)") from None
    return raw


def _either(choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None or not value.strip() else value.strip()


#: The suffix of the variable that names a file holding a secret's value.
FILE_SUFFIX = "_FILE"


def secret_value(env: Mapping[str, str], name: str) -> str | None:
    """The secret ``name`` from ``env``, or from the file ``NAME_FILE`` names (one trailing
    newline dropped); None when neither is set. One ConfigError line when both are set, the
    file cannot be read or is empty, or the value is still the placeholder."""
    file_name = name + FILE_SUFFIX
    given, path = _raw(env, name), _raw(env, file_name)
    if given is not None and path is not None:
        raise ConfigError(f"{name} and {file_name} are both set: keep one")
    where = name
    if path is not None:
        try:
            given = Path(path).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                f"{file_name}={path} cannot be read ({reason}): point it at the file holding {name}"
            ) from None
        given = given.removesuffix("\n").removesuffix("\r")
        if not given:
            raise ConfigError(f"{file_name}={path} is empty: write {name} into it")
        where = f"{file_name}={path}"
    if given is not None and PLACEHOLDER in given:
        raise ConfigError(
            f"{where} still holds a {PLACEHOLDER} placeholder: set it (see .env.example; "
            "meterflow doctor checks them all)"
        )
    return given


def _key_name(declared: Variable, key: str) -> str:
    return declared.name.format(key=key.upper())


def parse(cls: type[T], env: Mapping[str, str], label: str = "") -> T:
    """An instance of the dataclass ``cls`` from ``env``: each declared field from its variable
    (absent or empty: the default), each field of a declared dataclass type from its own.

    A ValueError from the class itself (a rule between fields) becomes one ConfigError line,
    prefixed with ``label``.
    """
    values: dict[str, Any] = {}
    for field, kind, declared in _declared(cls):
        if declared is None:
            if _is_declared(kind):
                values[field.name] = parse(kind, env, field.metadata.get("label", field.name))
            continue
        if declared.keys:
            default = _default(field)
            value_kind = get_args(kind)[1]
            key_kind = get_args(kind)[0]
            values[field.name] = {
                key_kind(key): default[key_kind(key)]
                if (raw := _raw(env, _key_name(declared, key))) is None
                else _convert(value_kind, raw, declared, _key_name(declared, key))
                for key in declared.keys
            }
            continue
        raw = secret_value(env, declared.name) if declared.secret else _raw(env, declared.name)
        if raw is not None:
            values[field.name] = _convert(kind, raw, declared, declared.name)
    try:
        return cls(**values)
    except ConfigError:  # already one line naming its variable
        raise
    except ValueError as exc:
        raise ConfigError(f"{label or cls.__name__}: {exc}") from None


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _kind(kind: Any, declared: Variable) -> str:
    """The values a variable takes, as the docs say it."""
    if declared.keys:
        kind = get_args(kind)[1]
    at_least = "" if declared.minimum is None else f" ≥ {declared.minimum:g}"
    if declared.parse is not None:
        return "see meaning"
    if get_origin(kind) is Literal:
        return _either(tuple(f"`{choice}`" for choice in get_args(kind)))
    if kind is bool:
        return "`on` or `off`"
    if kind is int:
        return f"whole number{at_least}"
    if kind is float:
        return f"number{at_least}"
    if kind is Path:
        return "path"
    if kind is date:
        return "date"
    return "text"


def table(cls: type) -> list[Entry]:
    """Every variable ``cls`` reads, in declaration order (nested classes' in place)."""
    entries: list[Entry] = []
    for field, kind, declared in _declared(cls):
        if declared is None:
            if _is_declared(kind):
                entries.extend(table(kind))
            continue
        default = _default(field)
        if declared.keys:
            for key in declared.keys:
                value = default[next(k for k in default if _shown(k) == key)]
                entries.append(
                    Entry(
                        _key_name(declared, key),
                        _shown(value),
                        _kind(kind, declared),
                        declared.doc.format(key=key),
                    )
                )
            continue
        text = declared.shown if declared.shown is not None else _shown(default)
        doc = declared.doc
        if declared.secret:
            doc += f"; or `{declared.name}{FILE_SUFFIX}`, a file holding it"
        entries.append(Entry(declared.name, text, _kind(kind, declared), doc))
    return entries


#: How :func:`redacted_repr` shows a secret that is set.
REDACTED = "***"


def redacted_repr(self: Any) -> str:
    """A declared dataclass's repr with every secret that is set shown as ``***``; use as
    ``__repr__ = variables.redacted_repr`` in the class body."""
    parts = []
    for field in dataclasses.fields(self):
        if not field.repr:
            continue
        value = getattr(self, field.name)
        declared = field.metadata.get(_METADATA_KEY)
        shown = REDACTED if declared is not None and declared.secret and value else repr(value)
        parts.append(f"{field.name}={shown}")
    return f"{type(self).__name__}({', '.join(parts)})"


def default_text(cls: type, name: str) -> str:
    """The default of variable ``name`` as written in the docs (for :func:`env_value`)."""
    for entry in table(cls):
        if entry.name == name:
            return entry.default
    raise KeyError(f"{name} is not a meterflow variable")
