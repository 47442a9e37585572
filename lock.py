"""
An exclusive lock on a folder while one process writes into it: train.py's out_dir (train.lock) and prepare.py's
dataset folder (prepare.lock).
"""

import os
import platform


class FolderLock:
    """
    An exclusive lock on folder/name while a process lives, so that a second one started on the same folder (a sweep
    that forgot --out_dir, a job launched twice, two prepare.py runs of one name) is refused instead of both writing
    the same files. The OS lets go of it when the process ends, however it ends; the file stays, saying which process
    held it last. After __enter__, `holder` names the process holding it when it was taken already, else None. Only
    where fcntl exists (not on Windows); enabled=False (other ranks, an evaluation) takes nothing. A folder this lock
    made is removed on the way out if nothing but the lock file came into it.
    """

    def __init__(self, folder, name, enabled=True):
        self.path, self.enabled = os.path.join(folder, name), enabled
        self.file, self.holder, self.made_folder = None, None, False

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        if not self.enabled:
            return self
        folder = os.path.dirname(self.path)
        self.made_folder = not os.path.isdir(folder)
        for attempt in range(10):  # a file system whose inodes fstat and stat tell otherwise: the tenth lock holds
            os.makedirs(folder, exist_ok=True)
            self.file = open(self.path, "a+b", buffering=0)  # unbuffered: nothing left to fail at close (a full disk)
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                self.holder = named_holder(self.file)
                self.file.close()
                self.file = None
                return self
            if self._still_there() or attempt == 9:
                break
            # the file its last holder removed on the way out (with the folder it made), between our open and our
            # lock: a third process may have the new one, so holding this one would keep no one out
            self.file.close()
        try:  # who holds it, for the message of a run refused; not worth failing over (a full disk)
            self.file.seek(0)
            self.file.truncate()
            self.file.write(f"process {os.getpid()} on {platform.node()}\n".encode())
        except OSError:
            pass
        return self

    def _still_there(self):
        """Whether the file locked is the one at self.path."""
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.file.fileno())
        return (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev)

    def __exit__(self, *exc):
        if self.file is None:
            return
        folder = os.path.dirname(self.path)
        try:
            alone = self.made_folder and os.listdir(folder) == [os.path.basename(self.path)]
        except FileNotFoundError:  # the folder moved or removed under its holder: nothing here to clean
            alone = False
        if alone:  # nothing came of the run
            os.remove(self.path)  # still locked: a process that opened it meanwhile is refused, then finds it gone
            try:
                os.rmdir(folder)
            except OSError:  # another process's lock file came in since (it made the folder again, in its place)
                pass
        self.file.close()  # and with it the lock


def held_by(folder, name):
    """Who holds folder/name now (what the holder wrote there), or None: asked with a shared lock taken and let go at
    once, which writes nothing and takes nothing from the holder."""
    try:
        import fcntl
        with open(os.path.join(folder, name), "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return named_holder(f)
            return None  # closing the file lets go of the shared lock
    except (ImportError, OSError):  # no fcntl (Windows), or no lock file: no one
        return None


def named_holder(file):
    """Who holds a lock file, as the holder wrote it there (read from where the file is)."""
    return file.read().decode(errors="replace").strip() or "another process"
