"""Config files: a run's flags in TOML, read before the command line, so that a flag given there wins.

    python train_script.py --config configs/nnlab_vae.toml                 # a recipe
    python train_script.py --config configs/nnlab_vae.toml --epochs 5      # the command line overrides the file
    python train_script.py --config models/VAE.toml --run-name VAE_again   # a run again, from the settings it wrote

Keys are the flags' names, with dashes or underscores (`image-size` or `image_size`); tables such as [data] or
[training] only group keys and are flattened. A value goes through its flag's own type and choices, so a file
accepts exactly what the command line does; a key that is no flag, or a value of the wrong type, is one error
line naming the key and the file. `model = "VAE"` may stand in the file instead of `--model`: at the top, or
in a [model] table (TOML has no top-level key and table of the same name), as the recipes in configs/ do.

train_script.py writes the settings of every new run to <models-dir>/<run>.toml (write_settings), flat
`key = value` lines that read() gives back unchanged.
"""
import argparse
import difflib
import json
import os
import tempfile
import tomllib
from pathlib import Path

from common import UserError

# What a command does rather than how the run trains: never written to a settings file.
NOT_SETTINGS = ("config", "resume", "overwrite")


def read(path):
    """{key: value} of a TOML file, keys with underscores for dashes, one level of tables flattened."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file '{path}' not found; pass --config PATH to a .toml file (see configs/)") from None
    except OSError as err:
        raise UserError(f"cannot read config file '{path}' ({err.strerror or err})") from err
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"'{path}' is not valid TOML: {err}") from err
    flat, where = {}, {}
    for name, value in document.items():
        table = isinstance(value, dict)
        for key, item in (value.items() if table else [(name, value)]):
            if isinstance(item, dict):
                raise UserError(f"{path}: [{name}.{key}]: tables only group flags, one level deep; "
                                f"move its keys into [{name}]")
            normal = key.replace("-", "_")
            if normal in flat:
                raise UserError(f"{path}: '{key}' is given twice ({where[normal]} and {f'[{name}]' if table else 'top level'})")
            flat[normal], where[normal] = item, f"[{name}]" if table else "top level"
    return flat


def parser_values(parser, settings, path, keys=None):
    """The file's settings as the parser's flags would set them, {dest: value}, for parser.set_defaults; `keys`
    limits the check to those keys (train_script reads `model` first, to know which flags the model has)."""
    actions = {}
    for action in parser._actions:   # argparse keeps its flags here; it has no public list of them
        long_flags = [s for s in action.option_strings if s.startswith("--")]
        if long_flags and action.dest not in ("help", "config"):
            actions[long_flags[0][2:].replace("-", "_")] = action   # --flip, not --no-flip
    values = {}
    for key, value in settings.items():
        if keys is not None and key not in keys:
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; --help lists the flags"
            raise UserError(f"{path}: unknown key '{key}', not a flag of {parser.prog} for this model{hint}")
        action = actions[key]
        values[action.dest] = flag_value(action, value, f"{path}: {key}")
    return values


def flag_value(action, value, where):
    """A TOML value checked and converted as the command line converts the flag's text: booleans for switches,
    lists for flags taking several values, strings or numbers for the rest, then the flag's type and choices."""
    if action.nargs == 0:   # --flag / --no-flag, or store_true
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {json.dumps(value, default=str)}")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list such as [1, 2], got {json.dumps(value, default=str)}")
        if not value and action.nargs == "+":
            raise UserError(f"{where}: expected at least one value, got []")
        return [scalar(action, item, where) for item in value]
    return scalar(action, value, where)


def scalar(action, value, where):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: expected a {'string' if action.type in (None, str) else 'number'}, "
                        f"got {json.dumps(value, default=str)}")
    if action.type in (None, str):
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string in quotes, got {value}")
        converted = value
    else:
        if isinstance(value, str):   # "1e-3" in quotes is a string in TOML; the flag wants a number
            raise UserError(f"{where}: expected a number without quotes, got the string {json.dumps(value)}")
        try:
            converted = action.type(str(value))   # the flag's own check: range, integer or not
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise UserError(f"{where}: {err}") from err
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where}: {json.dumps(converted)} is not one of "
                        + ", ".join(json.dumps(c) for c in action.choices))
    return converted


def toml_value(value):
    """A Python value as TOML: booleans, integers, floats (repr is TOML's syntax, inf and nan included),
    strings (JSON's escapes are TOML's, but for DEL), and lists of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def write_settings(path, settings, comment):
    """Write {flag: value} as flat `key = value` lines under `comment` lines; None (a flag left to its default)
    has no TOML form and is listed in a comment. Written to a temporary file and renamed: never half a file."""
    path = Path(path)
    kept = {k: v for k, v in settings.items() if k not in NOT_SETTINGS}
    lines = [f"# {line}" for line in comment] + [f"{k} = {toml_value(v)}" for k, v in kept.items() if v is not None]
    unset = [k for k, v in kept.items() if v is None]
    if unset:
        lines.append(f"# left to their defaults: {', '.join(unset)}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"could not write '{path}' ({err.strerror or err}); pass a writable --models-dir") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
