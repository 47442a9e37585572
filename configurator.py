"""
nanoGPT's configuration experience with a real parser underneath.

Each script declares its settings as one dataclass whose fields are the defaults (read top to bottom, a comment
after each). Users override them the way nanoGPT taught them to:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are config files made of plain assignments (`n_layer = 6`), applied in order; `--key=value`
arguments come after and win. Unlike nanoGPT's exec-based configurator, every key and value is checked: an unknown
key names the closest known ones, a value of the wrong type says which type was expected, and `--help` lists every
key with its default. Problems are raised as ConfigError so scripts print one line and exit non-zero.
"""

import ast
import builtins
import dataclasses
import difflib
import errno
import inspect
import math
import os
import re
import select
import sys
import types
import typing


class UserError(Exception):
    """
    An expected mistake (a typo in a config, a missing dataset, a corrupt file): every script prints it as one line
    that says what to do and exits with code 2, without a traceback. Raise it anywhere below a script's main().
    """


class ConfigError(UserError):
    """A mistake in a config file or a command-line override, explained for the person who made it."""


def too_small(cfg, keys, minimum):
    """validate()'s problems for the keys of cfg whose values are below minimum (0: negative)."""
    rule = "cannot be negative" if minimum == 0 else f"must be at least {minimum}"
    return [f"{key}={getattr(cfg, key)} {rule}" for key in keys if getattr(cfg, key) < minimum]


def _closest(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _unwrap_optional(tp):
    """`int | None` -> (int, True); `int` -> (int, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def value_keys(cls):
    """The options of a config dataclass that take a value: every key but the bools, which a bare --key sets."""
    return {k for k, tp in typing.get_type_hints(cls).items() if _unwrap_optional(tp)[0] is not bool}


def _type_name(tp):
    base, optional = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base))
    return f"{name} or None" if optional else name


def _parse_string(key, text, tp):
    """Turn the text after `--key=` into a value of the field's type."""
    base, optional = _unwrap_optional(tp)
    if optional and text in ("None", "none", "null"):
        return None
    if base is str:
        return text
    if base is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key}={text}: expected a bool (True or False)")
    if base in (int, float):
        try:
            value = ast.literal_eval(text.replace("_", ""))
        except (ValueError, SyntaxError):
            value = None
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        value = _whole(value) if base is int else value
        if isinstance(value, float) and not math.isfinite(value):  # 1e400 is read as inf
            raise ConfigError(f"--{key}={text}: expected a finite number")
        if isinstance(value, base) and not isinstance(value, bool):
            return value
        raise ConfigError(f"--{key}={text}: expected {_type_name(tp)}")
    raise ConfigError(f"--{key}: fields of type {_type_name(tp)} cannot be set from the command line")


def _whole(value):
    """A float that is a whole number (1e9, as a count of tokens or characters is written) as an int; 1e100 is no
    count anyone means, nor exactly a float's whole number past 2**53."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53 else value


def _check_value(key, value, tp, where):
    """Values from config files are Python objects already; check they fit the declared type."""
    base, optional = _unwrap_optional(tp)
    if value is None and optional:
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool):
        raise ConfigError(f"{where}: {key} = {value!r}: expected int")
    value = _whole(value) if base is int else value
    if isinstance(value, float) and not math.isfinite(value):  # nan, inf: as on the command line
        raise ConfigError(f"{where}: {key} = {value!r}: expected a finite number")
    if isinstance(value, base):
        return value
    raise ConfigError(f"{where}: {key} = {value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


class _Recorder(dict):
    """A config file's namespace that notes every name set in it, by its own code's assignments and by what that code
    runs (`from base import *`, `exec(open("base.py").read())`, `globals().update(...)`): exec passes a dict subclass
    its stores. A branch not taken sets nothing; a name set to the value it had is still set."""

    def __init__(self, values):
        super().__init__(values)
        self.set = {}  # in the order set, as a dict keeps it

    def __setitem__(self, key, value):
        self.set[key] = None
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _read_config_file(path, visible=None):
    """
    Run a config file of plain assignments and return the names it sets (_private names, modules, functions and
    classes skipped), with their values. The file sees `visible` (the defaults and the earlier files' settings) as
    nanoGPT's exec in train.py's globals let it: `lr_decay_iters = max_iters`.
    """
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        bad = e.object[e.start:e.start + 1]
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start:,} is {bad!r}); save it as UTF-8") \
            from None
    namespace = _Recorder(visible or {})
    try:
        exec(compile(source, path, "exec"), namespace)
    except (Exception, SystemExit) as e:  # a config file is user code; any error in it (exit() too) is theirs to fix
        raise ConfigError(f"error in config file {path}: {type(e).__name__}: {e}") from None
    return {k: namespace[k] for k in namespace.set if not k.startswith("_") and k in namespace
            and not isinstance(namespace[k], (types.ModuleType, types.FunctionType, type))}


def field_comments(cls):
    """The trailing `# comment` of each field in a config dataclass's source and its bases' (bench.py's configs
    extend train.py's), used by --help."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first, so a subclass's own comment wins
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def _default(field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def help_text(cls, prog):
    lines = [f"usage: python {prog} [config_file.py ...] [--key=value ...]", "", "keys (default):"]
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = _default(f)
        note = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  --{f.name}={default!r} ({_type_name(f.type)}){note}")
    return "\n".join(lines)


def parse(cls, argv, prog=None):
    """
    Build a `cls` dataclass from config files and --key=value overrides in argv: the files first, in their order, then
    the options, wherever each stands (a file named after an option does not undo it).
    Returns (config, sources) where sources maps each changed key to where its value came from.
    Prints help and exits 0 on --help / -h.
    """
    prog = prog or sys.argv[0]
    hints, takes_value = typing.get_type_hints(cls), value_keys(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    # a default named as a builtin (prepare.py's `list`) would hide it from the files: visible once a file sets it
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls) if not hasattr(builtins, f.name)}
    values, sources = {}, {}
    if any(arg in ("--help", "-h") for arg in argv):
        print(help_text(cls, prog))
        sys.exit(0)
    for arg in sorted(argv, key=lambda arg: arg.startswith("--")):  # stable: files, then options, each in order
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in hints:
                raise ConfigError(f"unknown option --{key}{_closest(key, known)}; see --help for every key")
            if not eq:
                if key in takes_value:
                    raise ConfigError(f"--{key} needs a value: --{key}=...")
                text = "True"
            values[key] = _parse_string(key, text, hints[key])
            sources[key] = "command line"
        elif arg.endswith(".py"):
            if not os.path.exists(arg):  # config/x.py also works when run from outside the toolkit's folder
                beside = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), arg)
                arg = beside if os.path.exists(beside) else arg
            visible = {**defaults, **values}  # nanoGPT's files could read the settings so far
            for key, value in _read_config_file(arg, visible).items():
                if key not in hints:
                    close = _closest(key, known)
                    # config/ holds train.py's files: sample.py and evaluate.py take the run's out_dir instead
                    other = (f"; a name of the file's own starts with _ (_{key})" if "max_iters" in known else
                             f"; a config for train.py? give {os.path.basename(sys.argv[0])} the run's --out_dir "
                             "instead" if not close else "")
                    raise ConfigError(f"{arg}: unknown key {key!r}{close}{other}")
                values[key] = _check_value(key, value, hints[key], arg)
                sources[key] = arg
        else:
            before = argv[argv.index(arg) - 1] if argv.index(arg) else ""
            if before.startswith("--") and "=" not in before and \
                    before[2:].replace("-", "_") in takes_value:  # argparse's --max_iters 10
                raise ConfigError(f"unexpected argument {arg!r}: did you mean {before}={arg}? (a value follows its "
                                  "key after =)")
            raise ConfigError(f"unexpected argument {arg!r}: give config files (*.py) and --key=value options")
    return cls(**values), sources


def describe(cfg, sources):
    """The resolved config as printed at start-up: every key, with where non-default values came from."""
    lines = []
    for f in dataclasses.fields(cfg):
        origin = f"  <- {sources[f.name]}" if f.name in sources else ""
        lines.append(f"  {f.name} = {getattr(cfg, f.name)!r}{origin}")
    return "\n".join(lines)


def stdout_closed():
    """Whether standard output is a pipe whose reader has gone away: poll reports an error on its end."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor
        return False


def silence(stream):
    """A standard stream to nowhere, after its reader went away (a pipe's, a terminal's): later writes, and the flush
    at exit, fail no more."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def run(main, cls, validate=None, argv=None):
    """
    The entry point of every script: parse argv into `cls`, check it with validate(cfg) -> [problems] (all of them
    reported at once), then call main(cfg, sources). Any UserError becomes one line on stderr and exit code 2, and
    Ctrl-C's KeyboardInterrupt one line and the shell's code for it, 130 (what main was writing has been cleaned up on
    the way out, as for any other exception; main may raise its own KeyboardInterrupt saying what to do next).
    """
    try:
        try:
            cfg, sources = parse(cls, sys.argv[1:] if argv is None else argv)
            problems = validate(cfg) if validate else []
            if problems:
                raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
        except UserError:  # the same on every process of a launch: said once, by the first
            from distributed import detect_launch
            if detect_launch().rank != 0:
                sys.exit(2)
            raise
        return main(cfg, sources)
    except UserError as e:
        # one write: under torchrun, where every rank may say the same, print's two (text, newline) interleave
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except BrokenPipeError:
        if not stdout_closed():  # another pipe (a socket, a child's): a real error
            raise
        silence(sys.stdout)  # the reader of the output went away (`| head`): nothing left to say, and no one to hear
        sys.exit(141)  # as a shell reports a process ended by SIGPIPE
    except OSError as e:  # a folder the user may not write to (permissions, a read-only file system, a full disk, a
        # path through a file) is theirs to fix
        fixes = {errno.EACCES: "fix its permissions, or choose a folder this user can write to",
                 errno.EPERM: "fix its permissions, or choose a folder this user can write to",
                 errno.EROFS: "choose a folder this user can write to",
                 errno.ENOSPC: "free some space, or choose a folder on another disk",
                 errno.EDQUOT: "free some of your quota, or choose a folder it does not cover",
                 errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path"}
        if e.errno not in fixes:
            raise
        folders = [f"--{f.name}" for f in dataclasses.fields(cls) if f.name.endswith(("_dir", "_root"))]  # its own
        sys.stderr.write(f"error: {e.filename or 'a file'}: {e.strerror}; {fixes[e.errno]}" +
                         (f" ({', '.join(folders)})" if folders else "") + "\n")
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
