"""Command-line options generated from config dataclasses, so that each option is written once.

A field is an option: its type gives the flag's type, its default the flag's default (written into
``--help`` here, never by hand), and ``field(metadata=...)`` the rest:

- ``help`` (every option): what it does and, where it is ``None`` by default, what that means;
- ``choices``, ``metavar``: as for ``argparse``;
- ``positional``: an argument without a flag (``svp inspect OUT``);
- ``same_as``: no flag of its own; the enclosing config's option of that name sets it
  (``ModelConfig.seed`` is ``svp train``'s ``--seed``, which also seeds the data order).

The flag is the field's name with ``-`` for ``_`` (``max_steps`` → ``--max-steps``): flags, recipe
keys and recorded configs use one vocabulary. A field whose type is a dataclass nests that config
(``TrainConfig.model``, ``ModelConfig.projector``): its fields become options too, shown in a group
of their own, and its ``kind`` field takes the name of the field that holds the config
(``ModelConfig.projector.kind`` → ``--projector``). Types: ``bool`` → ``--x`` / ``--no-x``;
``tuple[T, ...]`` → comma-separated values; ``X | None`` → ``X``, unset by default; any other
union takes its first member on the command line (``str | list[str]``: a string).

Why not ``transformers.HfArgumentParser``: it cannot nest a config (``ModelConfig.projector``), a
field's type is always the flag's type (a ``tuple[str, ...]`` would parse a word as its letters,
and ``metadata["type"]`` is overwritten), a ``bool`` defaulting to False becomes ``--x [X]``, whose
optional value swallows a following positional (``svp inspect --html OUT``), every flag is listed
twice (``--max_steps``, ``--max-steps``), it has no positionals, and it only builds top-level
parsers, where ``svp``'s commands are sub-parsers.

**Recipes**: a job that takes them has ``--config RECIPE``, a YAML or JSON mapping of its options.
A key is an option's name (``lora_r: 16``) or a nested config by its field (``model: {lora_r: 16}``,
the shape ``asdict`` writes, so a run's ``run_config.json`` is a recipe that reproduces it); what
a run directory records beside its options (:data:`RUN_RECORD`) is skipped. A flag given on the
command line wins over the recipe, and the recipe over the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import SvpError

T = TypeVar("T")
# What run_config.json holds beside the options (trainer.checkpoint.write_run_config and
# trainer.loop.setup_training add it): a record of the run, which a recipe sets nothing from.
RUN_RECORD = ("data", "world_size", "git_commit", "libraries")
_UNSET = object()  # an option not given on the command line


class RecipeError(SvpError, ValueError):
    """A recipe file that cannot be read, or that names an option wrongly."""


class OptionError(SvpError, ValueError):
    """An option's value that no flag type refuses but its config does (``--pool-tokens 0``), or a
    combination of options that cannot run."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One field of a config as a command-line option."""

    path: tuple[str, ...]  # field names from the top config down, e.g. ("model", "projector", "kind")
    dest: str  # the option's name: its flag without dashes, its key in a recipe, its attribute in args
    field: dataclasses.Field
    hint: Any  # the field's resolved type
    owner: type  # the dataclass that declares the field

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def same_as(self) -> bool:
        return "same_as" in self.field.metadata

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and self.field.default_factory is dataclasses.MISSING

    @property
    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default

    def coerce(self, value: Any) -> Any:
        """A recipe's ``value`` as this option's type and among its choices, or ValueError."""
        value = _coerce(self.hint, value)
        choices = self.field.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value


def walk(config: type, path: tuple[str, ...] = (), holder: str | None = None) -> Iterator[Option]:
    """Every option of ``config``, nested configs' included, in field order (``path``, ``holder``:
    where a nested ``config`` lies, and the name of the field that holds it)."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from walk(hint, (*path, field.name), field.name)
        else:
            yield Option((*path, field.name), _dest(field, holder), field, hint, config)


def _dest(field: dataclasses.Field, holder: str | None) -> str:
    """The option a field is set by (see the module's docstring)."""
    if "same_as" in field.metadata:
        return field.metadata["same_as"]
    return holder if holder is not None and field.name == "kind" else field.name


def build(config: type[T], args: argparse.Namespace, holder: str | None = None) -> T:
    """The ``config`` that parsed ``args`` describe, its nested configs built likewise (``holder``:
    the name of the field that holds ``config``, for a nested one).

    A config's own checks (``__post_init__``) raise ValueError for values no flag type could
    refuse, such as ``--pool-tokens 0``: that is an :class:`OptionError`."""
    hints = typing.get_type_hints(config)
    values = {
        field.name: (build(hints[field.name], args, field.name) if dataclasses.is_dataclass(hints[field.name])
                     else getattr(args, _dest(field, holder)))
        for field in dataclasses.fields(config)
    }
    try:
        return config(**values)
    except ValueError as exc:
        raise OptionError(str(exc)) from exc


def add_options(parser: argparse.ArgumentParser, *configs: type) -> list[Option]:
    """Add every option of ``configs`` to ``parser``, one argument group per dataclass (titled by its
    name, described by its docstring's first paragraph); returns the options."""
    options = [option for config in configs for option in walk(config)]
    groups: dict[type, argparse._ArgumentGroup] = {}
    for option in options:
        if option.same_as:
            continue
        if option.owner not in groups:
            summary = " ".join((option.owner.__doc__ or "").strip().split("\n\n")[0].split())
            description = textwrap.fill(summary, 100, break_on_hyphens=False)
            groups[option.owner] = parser.add_argument_group(option.owner.__name__, description)
        _add_argument(groups[option.owner], option)
    return options


def _add_argument(group: argparse._ArgumentGroup, option: Option) -> None:
    metadata = option.field.metadata
    if not metadata.get("help"):
        raise TypeError(f"{option.owner.__name__}.{option.field.name} has no help text (field metadata 'help')")
    kwargs: dict[str, Any] = {"help": _help(option)}
    if "metavar" in metadata:
        kwargs["metavar"] = metadata["metavar"]
    if metadata.get("positional"):
        group.add_argument(option.dest, type=_converter(option), **kwargs)
    elif option.hint is bool:
        group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=option.default, **kwargs)
    else:
        group.add_argument(option.flag, type=_converter(option), default=None if option.required else option.default,
                           required=option.required, choices=metadata.get("choices"), **kwargs)


def _help(option: Option) -> str:
    """The field's help and its default, escaped for argparse's %-formatting."""
    text = option.field.metadata["help"]
    default = None if option.required else option.default
    if isinstance(default, bool):
        text += f" (default: {option.flag if default else '--no-' + option.flag[2:]})"
    elif isinstance(default, (tuple, list)):
        text += f" (default: {','.join(map(str, default))})"
    elif default is not None:
        text += f" (default: {default})"
    return text.replace("%", "%%")


def _converter(option: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return _coerce(option.hint, text)  # argparse checks the choices, naming them

    convert.__name__ = _type_name(option.hint)  # argparse's "invalid <name> value: 'x'"
    return convert


def _members(hint: Any) -> tuple[Any, ...] | None:
    """The types of a union (``X | None`` included), or None for any other type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _type_name(hint: Any) -> str:
    members = _members(hint)
    if members is not None:
        return " or ".join(_type_name(m) for m in members if m is not type(None))
    if typing.get_origin(hint) in (tuple, list):
        return f"comma-separated {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _coerce(hint: Any, value: Any) -> Any:
    """``value`` as ``hint``: a command-line string is parsed (``"3e-4"``, ``"q_proj,v_proj"``); a
    recipe's value is checked (YAML reads ``1e-3`` as a string: parsed likewise)."""
    members = _members(hint)
    if members is not None:
        if value is None and type(None) in members:
            return None
        for member in (m for m in members if m is not type(None)):
            try:
                return _coerce(member, value)
            except ValueError:
                continue
        raise ValueError(f"{value!r} is not of type {_type_name(hint)}")
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        items = [item for item in value.split(",") if item] if isinstance(value, str) else value
        if not isinstance(items, (tuple, list)):
            raise ValueError(f"{value!r} is not a list")
        args = typing.get_args(hint)
        kinds = [args[0]] * len(items) if origin is list or args[-1] is Ellipsis else list(args)
        if len(kinds) != len(items):
            raise ValueError(f"{value!r}: {len(kinds)} values expected, got {len(items)}")
        return origin(_coerce(kind, item) for kind, item in zip(kinds, items, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return hint(value)
        elif isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool):
            return hint(value)
    elif hint in (str, Path):
        if isinstance(value, (str, Path)):
            return hint(value)
    else:
        raise TypeError(f"no command-line form for a field of type {hint}")
    raise ValueError(f"{value!r} is not of type {_type_name(hint)}")


def read_recipe(path: Path, options: Sequence[Option], command: str) -> dict[str, Any]:
    """The option values (by name) that the recipe at ``path`` sets for ``svp command``.

    Every key must name an option of the command, as the module's docstring says; a value given
    twice (``seed`` and ``model.seed`` in a run config) must agree."""
    try:
        text = path.read_text()
        recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise RecipeError(f"cannot read {path}: {exc}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path} holds no mapping of option names to values")
    recipe = {key: value for key, value in recipe.items() if key not in RUN_RECORD}
    if recipe.pop("command", command) != command:
        raise RecipeError(f"{path} is a recipe for another command than `svp {command}`")
    by_path = {option.path: option for option in options}
    by_name = {option.dest: option for option in options if not option.same_as}
    nested = {option.path[:end] for option in options for end in range(1, len(option.path))}
    values: dict[str, Any] = {}
    unknown = []
    for key_path, value in _flatten(recipe, (), nested):
        option = by_path.get(key_path) or (by_name.get(key_path[0].replace("-", "_")) if len(key_path) == 1 else None)
        if option is None:
            unknown.append(".".join(key_path))
            continue
        try:
            value = option.coerce(value)
        except ValueError as exc:
            raise RecipeError(f"{path}: {'.'.join(key_path)}: {exc}") from None
        if values.get(option.dest, value) != value:
            raise RecipeError(f"{path}: {option.dest} is given twice, as {values[option.dest]!r} and {value!r}")
        values[option.dest] = value
    if unknown:
        raise RecipeError(f"{path}: not an option of `svp {command}`: {', '.join(unknown)}")
    return values


def _flatten(mapping: dict, prefix: tuple[str, ...],
             nested: set[tuple[str, ...]]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(field path, value) of every entry, a nested config's mapping entered."""
    for key, value in mapping.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and path in nested:
            yield from _flatten(value, path, nested)
        else:
            yield path, value


class OptionsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose options come from config dataclasses (:meth:`add_options`) and,
    where asked, from a recipe file (``--config``); a flag on the command line wins over both.

    ``svp``'s sub-parsers are of this class too (``add_subparsers`` makes its parsers of the class
    of the parser it belongs to)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.configs: list[type] = []
        self.options: list[Option] = []
        self.recipe_command: str | None = None

    def add_options(self, *configs: type, recipes_for: str | None = None) -> None:
        """Options of ``configs``; with ``recipes_for`` (the command's name), ``--config RECIPE`` too."""
        self.configs += configs
        self.options += add_options(self, *configs)
        if recipes_for is not None:
            self.recipe_command = recipes_for
            self.add_argument("--config", type=Path, metavar="RECIPE",
                              help="a recipe: a YAML or JSON file of these options by name (nested configs as "
                                   "mappings, e.g. model: {lora_r: 16}); a run's run_config.json is one. Flags "
                                   "given here override it")

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse, then give each option the command line's value, else the recipe's, else its default.

        The command line is parsed with every option unset and nothing required, so that an option
        the recipe sets need not be given, and the required ones are checked once the recipe is in."""
        actions = self._option_actions()
        if not actions:
            return super().parse_known_args(args, namespace)
        namespace = namespace if namespace is not None else argparse.Namespace()
        for dest in actions:
            setattr(namespace, dest, _UNSET)
        with self._required(False):
            namespace, extras = super().parse_known_args(args, namespace)
        recipe = self._recipe(namespace.config) if self.recipe_command and namespace.config else {}
        missing = []
        for dest, action in actions.items():
            if getattr(namespace, dest) is not _UNSET:
                continue
            if dest in recipe:
                setattr(namespace, dest, recipe[dest])
            elif self._declared_required(action):
                missing.append("/".join(action.option_strings))
            else:
                setattr(namespace, dest, action.default)
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, extras

    def format_usage(self) -> str:
        with self._required(True):  # also while parsing: --help, and the usage of an error
            return super().format_usage()

    def format_help(self) -> str:
        with self._required(True):
            return super().format_help()

    def _option_actions(self) -> dict[str, argparse.Action]:
        dests = {option.dest for option in self.options}
        return {action.dest: action for action in self._actions if action.option_strings and action.dest in dests}

    def _declared_required(self, action: argparse.Action) -> bool:
        return any(option.dest == action.dest and option.required for option in self.options)

    @contextlib.contextmanager
    def _required(self, required: bool) -> Iterator[None]:
        """Mark the required options ``required`` for a while (argparse reads the mark when it parses,
        where a recipe may set them, and when it shows the usage, where it should show them required)."""
        marked = [action for action in self._option_actions().values() if self._declared_required(action)]
        before = [action.required for action in marked]
        for action in marked:
            action.required = required
        try:
            yield
        finally:
            for action, state in zip(marked, before, strict=True):
                action.required = state

    def _recipe(self, path: Path) -> dict[str, Any]:
        try:
            return read_recipe(path, self.options, self.recipe_command)
        except RecipeError as exc:
            self.error(f"--config: {exc}")
