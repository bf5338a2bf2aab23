"""Flag values from a mapping: a --config YAML file, or the settings the Python API takes.

A key is a flag's dest or one of its long names, with dashes or underscores (weight_decay, weight-decay, wd);
a value is converted and checked as the command line would (the flag's type and choices), and a switch takes
true or false. `settings_to_values` gives parse_args the values as defaults; `settings_to_argv` writes them
back as a command line (the API's classify).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import UserError

# Parser entries that are not settings of the job: they never come from, nor go to, a config file.
NOT_SETTINGS = {"help", "config"}


class ConfigFileError(UserError):
    """A --config file that cannot be used; the message names the file (and the key)."""


def read_config_file(path: str) -> dict:
    """The mapping of a --config YAML file."""
    import yaml
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigFileError(f"--config {path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"--config {path}: not a UTF-8 text file") from None
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigFileError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict) or not all(isinstance(key, str) for key in settings):
        raise ConfigFileError(f"--config {path}: not a mapping of flag names to values")
    return settings


def _normal(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _setting_value(action: argparse.Action, key: str, value, source: str):
    """`value` of setting `key` for `action`, converted and checked as the command line would."""
    where = f"{source}: {key}"
    flag = "/".join(action.option_strings) or action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: {flag} is a switch: give true or false, not {value!r}")
        # Keyed by the flag (no-checkpoints: true) the value says whether the flag is given; keyed by its dest
        # (save_checkpoints: false) it is the value itself.
        return value if _normal(key) == action.dest else action.const if value else action.default
    if value is None:
        if action.default is not None:
            raise ConfigFileError(f"{where}: {flag} needs a value (null only for flags whose default is none)")
        return None
    # A true/false value fits flags that take one (--trt True|False), whose default is a bool.
    if (isinstance(value, bool) and not isinstance(action.default, bool)) or isinstance(value, (list, dict)):
        raise ConfigFileError(f"{where}: {flag} takes one value, not {value!r}")
    try:
        converted = action.type(str(value)) if callable(action.type) else str(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise ConfigFileError(f"{where}: {flag} {err}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigFileError(f"{where}: {value!r} is not a choice of {flag} "
                              f"({', '.join(map(str, action.choices))})")
    return converted


def settings_to_values(settings: dict, source: str, parsers: list[argparse.ArgumentParser]
                       ) -> tuple[dict, list[str]]:
    """({dest: value} of the settings that `parsers` know, the keys they do not know). A key is a flag's dest or
    one of its long names, with dashes or underscores (weight_decay, weight-decay, wd)."""
    actions: dict[str, argparse.Action] = {}
    for parser in parsers:
        for action in parser._actions:
            if action.dest not in NOT_SETTINGS:
                for name in [action.dest, *(o for o in action.option_strings if o.startswith("--"))]:
                    actions.setdefault(_normal(name), action)
    values: dict = {}
    keys: dict[str, str] = {}
    unknown = []
    for key, value in settings.items():
        action = actions.get(_normal(key))
        if action is None:
            unknown.append(key)
            continue
        if action.dest in keys:
            raise ConfigFileError(f"{source}: {keys[action.dest]} and {key} both set {action.dest}")
        keys[action.dest] = key
        values[action.dest] = _setting_value(action, key, value, source)
    return values, unknown


def settings_to_argv(settings: dict, source: str, parsers: list[argparse.ArgumentParser]) -> list[str]:
    """A command line for `parsers` that sets `settings` (keyed as in a --config file): switches given when true,
    other flags as --flag=value. An unknown key is an error naming `source`."""
    options: dict[str, tuple[argparse.Action, str]] = {}
    for parser in parsers:
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            for name in [action.dest, *longs] if longs else []:
                options.setdefault(_normal(name), (action, longs[0]))
    argv = []
    for key, value in settings.items():
        if _normal(key) not in options:
            raise ConfigFileError(f"{source}: {key!r} is not one of its flags")
        action, option = options[_normal(key)]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            # Keyed by the flag, the value says whether to give it; keyed by the dest, it is the dest's value.
            given = value if _normal(key) != action.dest else value != action.default
            argv += [option] if given else []
        elif value is not None:
            argv.append(f"{option}={value}")
    return argv
