"""
Shared test helpers. Outside data comes from ../shared (override with GPT_SHARED_DIR) when it is there; every test
that uses it falls back to text it writes itself.
"""

import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import traceback

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("GPT_SHARED_DIR", os.path.join(REPO, "..", "shared"))
sys.path.insert(0, REPO)

# tiktoken reads its GPT-2 BPE files from here instead of downloading them
_cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
if os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now, for a rendezvous of processes started by hand."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt2_bpe_available():
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")
        return True
    except Exception:
        return False


def generated_text(n_chars=200_000, seed=0):
    """Shakespeare-flavoured text with real structure (speakers, repeated words) so a model can learn from it."""
    import random
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "NURSE", "FRIAR", "MERCUTIO", "TYBALT"]
    words = ("the of and to my thou thee love night day sweet death fair heart light moon stars sword blood "
             "name rose kiss what is in that shall not be with have this for you but").split()
    out, size = [], 0
    while size < n_chars:
        line = f"{rng.choice(names)}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + ".\n\n"
        out.append(line.capitalize() if rng.random() < 0.1 else line)
        size += len(line)
    return "".join(out)[:n_chars]


def write_hellaswag(path, extra=()):
    """HellaSwag-style items in words of tiny Shakespeare and of generated_text alike (a char model can write them),
    one with three endings, then `extra` items; returns the path."""
    import json
    items = [{"ctx": "ROMEO:\nthe night is", "endings": ["sweet", "the the the", "death of love", "fair"], "label": 0},
             {"ctx": "JULIET:\nwhat is in a", "endings": ["name", "of of", "kiss", "moon"], "label": 0},
             {"ctx": "NURSE:\nthou shall not", "endings": ["be", "rose rose", "and to my"], "label": 2},
             {"ctx": "ROMEO:\nmy love is", "endings": ["fair", "sword", "in that", "the moon"], "label": 3},
             {"ctx": "TYBALT:\nthe sword", "endings": ["of death", "is", "with blood", "kiss"], "label": 2},
             {"ctx": "JULIET:\ngood", "endings": ["night", "day", "heart", "stars"], "label": 1}, *extra]
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(item) + "\n" for item in items))
    return path


def shakespeare_text_in(folder):
    """tiny Shakespeare from ../shared/data when present, else generated text of similar character, in `folder`."""
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if os.path.exists(path):
        return os.path.abspath(path)
    path = folder / "generated.txt"
    path.write_text(generated_text())
    return str(path)


@pytest.fixture
def shakespeare_path(tmp_path):
    return shakespeare_text_in(tmp_path)


@pytest.fixture(scope="session")
def prepared_shakespeare(tmp_path_factory):
    """data/shakespeare_char as `python prepare.py shakespeare_char` makes it, once per session: the tests that
    only train on it copy it (some 60 preparations took 1.5 s each of CI's time)."""
    folder = tmp_path_factory.mktemp("prepared")
    run_script("prepare.py", "shakespeare_char", f"--source={shakespeare_text_in(folder)}", cwd=folder)
    return folder / "data"


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KB file system (tmpfs), too small for a checkpoint or a dataset; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def run_script(script, *args, cwd, check=True, timeout=600, env=None):
    """Run one of the toolkit's scripts the way a user does, from `cwd` (env: variables to add or change); returns
    the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return _checked(proc, script, args, check)


def _checked(proc, script, args, check):
    """proc, unless check and it failed: then an AssertionError with the end of what it printed."""
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def killed_at_replace(n, pattern, script, *args, cwd):
    """Run a script in a process of its own that SIGKILLs itself (no handler runs: as the OOM killer, a lost node)
    just before its nth os.replace onto a path (relative to `cwd`) that the regular expression `pattern` matches whole:
    a kill at an exact moment of a file's life, which a kill at a random time finds only now and then."""
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_REPLACE, str(n), pattern, os.path.join(REPO, script),
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at replace {n} onto {pattern}:\n{proc.stderr[-3000:]}"
    return proc


_KILL_AT_REPLACE = """
import os, re, runpy, signal, sys
n, pattern, replace, seen = int(sys.argv[1]), re.compile(sys.argv[2]), os.replace, [0]
def replace_or_die(src, dst, *args, **kwargs):
    if pattern.fullmatch(os.path.relpath(os.path.abspath(dst))):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = replace_or_die
sys.argv = sys.argv[3:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python script.py` has it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_here(script, *args, cwd, check=True, env=None):
    """run_script in this process: the script runs as __main__ with these arguments, from `cwd`, with `env`'s
    variables, its output captured and its exit as a process's exit code. It saves an interpreter start (about 1.7 s,
    most of it importing torch) for tests of what a command prints and writes; what only a process of its own shows
    (signals, launches, a closed pipe, exact resume in a fresh process) stays with run_script."""
    path = os.path.join(REPO, script)
    out, err = io.StringIO(), io.StringIO()
    with _as_a_process(cwd, env, [path, *map(str, args)]), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter reads it: None is 0, a message is printed and exits 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    proc = subprocess.CompletedProcess([sys.executable, path, *map(str, args)], code, out.getvalue(), err.getvalue())
    return _checked(proc, script, args, check)


@contextlib.contextmanager
def _as_a_process(cwd, env, argv):
    """What a script may change for the process it runs in, put back after it: the working directory, the
    environment, sys.argv, the handlers of the signals the scripts catch."""
    before = os.getcwd(), dict(os.environ), sys.argv
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    os.chdir(cwd)
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    sys.argv = argv
    try:
        yield
    finally:
        os.chdir(before[0])
        os.environ.clear()
        os.environ.update(before[1])
        sys.argv = before[2]
        for s, handler in handlers.items():
            signal.signal(s, handler)
