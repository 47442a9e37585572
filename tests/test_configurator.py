import os
import re
from dataclasses import dataclass

import pytest

from conftest import REPO
from configurator import ConfigError, help_text, parse


@dataclass
class Cfg:
    batch_size: int = 12  # sequences per step
    learning_rate: float = 6e-4
    compile: bool | None = None
    out_dir: str = "out"
    decay_lr: bool = True


def test_overrides_and_types():
    cfg, sources = parse(Cfg, ["--batch_size=32", "--learning_rate=1e-3", "--compile=False", "--out_dir=x",
                               "--decay_lr"])
    assert cfg == Cfg(batch_size=32, learning_rate=1e-3, compile=False, out_dir="x", decay_lr=True)
    assert sources["batch_size"] == "command line"
    assert parse(Cfg, ["--learning_rate=1"])[0].learning_rate == 1.0
    assert parse(Cfg, ["--compile=None"])[0].compile is None


def test_config_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nbatch_size = 4\nlearning_rate = 2 * 1e-3\n_private = 1\n")
    cfg, sources = parse(Cfg, [str(path), "--batch_size=8"])
    assert cfg.batch_size == 8 and cfg.learning_rate == 2e-3 and sources["learning_rate"] == str(path)
    # an option before the file still wins over it (files first, then options: slurm/train.sbatch's own options
    # come before the user's config file); two files in their order
    (tmp_path / "d.py").write_text("batch_size = 16\nout_dir = 'd'\n")
    cfg, sources = parse(Cfg, ["--batch_size=8", str(path), str(tmp_path / "d.py")])
    assert (cfg.batch_size, cfg.out_dir, sources["batch_size"]) == (8, "d", "command line")


def test_config_file_reads_the_settings_so_far(tmp_path, monkeypatch):
    """As nanoGPT's exec in train.py's globals let its config files: a file reads the defaults and what earlier files
    set (a trial's `lr_decay_iters = max_iters` was a NameError). What it sets is its, however it sets it (another
    file's settings brought in by `from ... import *` or exec, as before); a branch not taken, a name it only reads,
    a function and a comprehension's variable set nothing. A default named as a builtin (prepare.py's `list`) does
    not hide it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "a.py").write_text("batch_size = 4\n")
    (tmp_path / "b.py").write_text("learning_rate = learning_rate * batch_size\n"
                                   "def _twice(x):\n    out_dir = 'no'\n    return 2 * x\n"
                                   "def helper():\n    pass\n"
                                   "_sizes = [decay_lr for decay_lr in (1, 2)]\n"
                                   "if batch_size > 100:\n    compile = True\n"
                                   "batch_size = _twice(batch_size)\n")
    cfg, sources = parse(Cfg, [str(tmp_path / "a.py"), str(tmp_path / "b.py")])
    assert (cfg.batch_size, cfg.learning_rate) == (8, 4 * 6e-4)
    assert sources == {"batch_size": str(tmp_path / "b.py"), "learning_rate": str(tmp_path / "b.py")}
    assert (cfg.out_dir, cfg.decay_lr, cfg.compile) == ("out", True, None)
    for bring in ("from a import *", f"exec(open({str(tmp_path / 'a.py')!r}).read())",
                  "globals().update(batch_size=4)"):
        (tmp_path / "c.py").write_text(f"{bring}\ndecay_lr = False\n")
        cfg, sources = parse(Cfg, [str(tmp_path / "c.py")])
        assert (cfg.batch_size, cfg.decay_lr, sources["batch_size"]) == (4, False, str(tmp_path / "c.py")), bring
    from prepare import PrepareConfig
    (tmp_path / "p.py").write_text("name = 'mine'\nsource = ','.join(list(('a.txt', 'b.txt')))\n")
    assert parse(PrepareConfig, [str(tmp_path / "p.py")])[0].source == "a.txt,b.txt"


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown option --batch_sise \(did you mean 'batch_size'\?\)"):
        parse(Cfg, ["--batch_sise=3"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'.*'learning_rate'"):
        parse(Cfg, [str(path)])
    from train import TrainConfig
    path.write_text("sequences = 64\nbatch_size = sequences\n")  # a helper name of the file's own
    with pytest.raises(ConfigError, match=r"unknown key 'sequences'; a name of the file's own starts with _ "
                                          r"\(_sequences\)$"):
        parse(TrainConfig, [str(path)])
    path.write_text("base = 1e-3\nlearning_rate = 2 * base\n")  # close to a key: the hint all the same (trial)
    with pytest.raises(ConfigError, match=r"unknown key 'base' \(did you mean 'bias'\?\); a name of the file's own "
                                          r"starts with _ \(_base\)$"):
        parse(TrainConfig, [str(path)])


def test_wrong_types():
    with pytest.raises(ConfigError, match="expected int"):
        parse(Cfg, ["--batch_size=1.5"])
    assert parse(Cfg, ["--batch_size=1e3"])[0].batch_size == 1000  # a whole number, as counts are written
    with pytest.raises(ConfigError, match="expected int"):
        parse(Cfg, ["--batch_size=1e100"])  # no count anyone means (sample.py once ran on with it, for ever)
    with pytest.raises(ConfigError, match="expected a bool"):
        parse(Cfg, ["--decay_lr=maybe"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse(Cfg, ["--batch_size"])
    for text in ("1e400", "-1e999"):  # read as inf: no number a setting means
        with pytest.raises(ConfigError, match=f"--learning_rate={text}: expected a finite number"):
            parse(Cfg, [f"--learning_rate={text}"])
    with pytest.raises(ConfigError, match=r"unexpected argument '10': did you mean --batch_size=10\? \(a value "
                                          r"follows its key after =\)"):  # argparse's spelling, in a trial
        parse(Cfg, ["--compile=False", "--batch_size", "10"])


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "c.py"
    for bad, message in (("learning_rate = float('nan')", "learning_rate = nan: expected a finite number"),
                         ("learning_rate = 1e400", "learning_rate = inf: expected a finite number"),
                         ("batch_size = 8\n# caf\xe9", "is not UTF-8 text (byte 20 is b'\\xe9'); save it as UTF-8"),
                         ("import sys; sys.exit(0)", "error in config file .*: SystemExit: 0")):
        path.write_bytes(bad.encode("latin-1"))  # the command line cannot spell nan; a trial's file could
        with pytest.raises(ConfigError, match=message if "SystemExit" in message else re.escape(message)):
            parse(Cfg, [str(path)])
    path.write_text("batch_size = '12'\n")
    with pytest.raises(ConfigError, match="expected int, got str"):
        parse(Cfg, [str(path)])
    path.write_text("batch_size = 2e1\n")
    assert parse(Cfg, [str(path)])[0].batch_size == 20 and type(parse(Cfg, [str(path)])[0].batch_size) is int
    path.write_text("batch_size = 2.5\n")
    with pytest.raises(ConfigError, match="expected int, got float"):
        parse(Cfg, [str(path)])


def test_help_lists_every_key():
    text = help_text(Cfg, "train.py")
    for key in ("batch_size", "learning_rate", "compile", "out_dir", "decay_lr"):
        assert f"--{key}=" in text
    assert "sequences per step" in text


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "config"))))
def test_every_shipped_config_is_valid(name):
    """Each config in config/ parses, passes train.py's checks, divides its batch on one process (and, where it sets
    total_batch_size for a node of GPUs, on 8), and trains on a recipe prepare.py knows, the one its header says to
    prepare."""
    import prepare
    import train
    path = os.path.join(REPO, "config", name)
    cfg, _ = parse(train.TrainConfig, [path])
    assert train.validate(cfg) == []
    for world_size in (1, 8) if cfg.total_batch_size else (1,):
        train.micro_steps_per_rank(cfg, world_size)  # raises where total_batch_size does not divide
    assert cfg.dataset in prepare.RECIPES
    with open(path) as f:
        assert f"python prepare.py {cfg.dataset}" in f.read()


@pytest.mark.parametrize("error, fix", [
    (PermissionError(13, "Permission denied", "/data/out"), "fix its permissions, or choose a folder this user can "
                                                            "write to"),
    (OSError(30, "Read-only file system", "/data/out"), "choose a folder this user can write to"),
    (OSError(28, "No space left on device", "/data/out"), "free some space, or choose a folder on another disk"),
    (OSError(122, "Disk quota exceeded", "/data/out"), "free some of your quota, or choose a folder it does not "
                                                       "cover"),  # a cluster's usual full disk
    (NotADirectoryError(20, "Not a directory", "/data/out"), "a part of the path is a file, not a folder: choose "
                                                             "another path")])
def test_a_folder_that_cannot_be_written_is_one_line(error, fix, capsys):
    """What a script meets in a folder it may not write to (found with a read-only out_dir, where train.py and
    prepare.py ended in a traceback; a full disk in prepare.py and an --out_dir under a file, in a later trial) is
    the user's to fix: one line naming the path, exit code 2."""
    from configurator import run

    @dataclass
    class Settings:
        out_dir: str = "out"
        hf_dir: str = ""
        data_root: str = "data"
        dtype: str = "float32"

    def main(cfg, sources):
        raise error

    with pytest.raises(SystemExit) as stop:
        run(main, Settings, argv=[])
    assert stop.value.code == 2
    # the script's own folder settings, not another's (export.py named prepare.py's --out_root: a trial)
    assert capsys.readouterr().err == f"error: /data/out: {error.strerror}; {fix} (--out_dir, --hf_dir, --data_root)\n"
    with pytest.raises(FileNotFoundError):  # any other OSError is not assumed to be the user's
        run(lambda cfg, sources: open("/no/such/file"), Settings, argv=[])

