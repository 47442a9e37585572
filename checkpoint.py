"""
Checkpoint files: the one save/load pair every script uses.

A checkpoint is a torch.save'd dict with at least
    format       CHECKPOINT_FORMAT
    model        the model's state dict (no `_orig_mod.` / `module.` prefixes)
    model_args   the GPTConfig fields
    meta         the dataset's meta (tokenizer, vocab_size, eot_id), so sampling decodes with the right tokenizer
and, from train.py, optimizer, step, best_val_loss, config, rng states and the batch sampler's state.
Writes are whole-or-not-at-all: a temporary file in the same folder, fsync'ed, renamed over the old one.
"""

import copy
import difflib
import os
import re
import shutil
import sys
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import torch

from configurator import UserError

CHECKPOINT_FORMAT = 1
# what torch.compile and DistributedDataParallel put in front of parameter names
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(UserError):
    pass


def clean_state_dict(state_dict):
    """A state dict without the prefixes of compiled or DDP-wrapped models (older files may carry them)."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def _tensor_crc32(obj, crc=0):
    """CRC-32 over every tensor in a nested dict/list, in order: torch.load does not notice flipped bytes in tensor
    data (only a truncated archive), so checkpoints carry this to detect silent corruption."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().reshape(-1)
        # the array itself, not a bytes copy of it: zlib reads it in place and lets other threads run meanwhile
        return zlib.crc32(data.view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        for key, value in obj.items():
            crc = _tensor_crc32(value, zlib.crc32(str(key).encode(), crc))
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            crc = _tensor_crc32(value, crc)
    return crc


def _pickle_intact(path):
    """Whether the archive's pickled part (the settings, the vocabulary, the step: all but the tensors' data) matches
    the CRC-32 the zip format keeps for it: _tensor_crc32 covers the rest. zipfile checks it on reading. An archive
    written without CRCs (torch.serialization.set_crc32_options(False): every one 0) or of torch's older, unzipped
    format has none to check. Zip headers damaged where torch.load read past them fail too: the file is damaged."""
    try:
        if not zipfile.is_zipfile(path):
            return True
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".pkl") and (info.CRC or not info.file_size):
                    archive.read(info)
    except Exception:  # BadZipFile (a CRC), or what damaged headers make zipfile raise (NotImplementedError, ...)
        return False
    return True


def save_checkpoint(path, checkpoint):
    """Write `checkpoint` to `path` atomically: either the old file or the complete new one is there, never half."""
    checkpoint = {"format": CHECKPOINT_FORMAT, **checkpoint}
    checkpoint["crc32"] = _tensor_crc32({k: v for k, v in checkpoint.items() if k != "crc32"})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # make the rename itself durable (a power cut right after could otherwise lose it on some file systems)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


BEST = "best.pt"  # a run's best val loss, where ckpt.pt is its latest state (always_save_checkpoint=False)


def best_elsewhere(where, flag):
    """A note when `where` (a run's folder, or its ckpt.pt) is the run's latest state and its best.pt another: what
    `flag` to give for the best. None otherwise."""
    folder = where if os.path.isdir(where) else os.path.dirname(where) if os.path.basename(where) == "ckpt.pt" else None
    if folder is None:
        return None
    latest, best = os.path.join(folder, "ckpt.pt"), os.path.join(folder, BEST)
    if not (os.path.isfile(latest) and os.path.isfile(best)) or same_save(latest, best):
        return None
    return (f"note: {latest} is the run's latest state; its best val loss is in {best} (always_save_checkpoint="
            f"False): {flag}={best} for that one")


LINK_SUFFIX = ".tmplink"  # a link or copy being made (link_or_copy); save_checkpoint writes to <path>.tmp<pid>
UNFINISHED = re.compile(rf"(ckpt(_\d+)?|best)\.pt(\.tmp\d+|{re.escape(LINK_SUFFIX)})$")  # cut short by a kill


def unfinished_files(out_dir):
    """The files a checkpoint write killed midway (SIGKILL, out of memory, a node failure) left in out_dir: for the
    one process that holds the folder's lock to remove."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(os.path.join(out_dir, name) for name in names if UNFINISHED.match(name))


STEP_CHECKPOINT = re.compile(r"ckpt_(\d+)\.pt$")


def step_checkpoints(out_dir):
    """(step, path) of the numbered checkpoints ckpt_<step>.pt in out_dir, oldest first."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = STEP_CHECKPOINT.match(name)
        if m and os.path.isfile(os.path.join(out_dir, name)):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def link_or_copy(source, target):
    """target becomes source's contents at once (a hard link: no extra space; a copy where there are none)."""
    tmp = target + LINK_SUFFIX
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links on this file system
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:  # a full disk, a folder in the way: no half-made file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def best_linked(out_dir, checkpoint):
    """Make best.pt the checkpoint ckpt.pt holds, if that is the best and a kill between the save's files kept it
    from being linked (best.pt stayed an older, worse step than ckpt.pt recorded as the best: a trial). A later
    best.pt is another branch's, which the resume sets aside (train.set_aside_later). Whether it was needed."""
    latest, best = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, BEST)
    if not checkpoint.get("best") or os.path.exists(best) and (saved_step(best) or -1) >= checkpoint["step"]:
        return False
    link_or_copy(latest, best)
    return True


def saved_step(path):
    """The step of the checkpoint file at path, read without its tensors; None where it cannot be read."""
    try:
        return step_of(torch.load(path, map_location="cpu", mmap=True, weights_only=False))
    except Exception:  # not a checkpoint, or damaged: load_checkpoint says which, where it is read
        return None


def same_save(a, b):
    """Whether checkpoint files a and b hold one save: the same file (hard links), or copies of it (a copy of a run
    that did not keep its links, cp -r: a trial), told by their steps."""
    if os.path.samefile(a, b):
        return True
    step = saved_step(a)
    return step is not None and step == saved_step(b)


def kept_for_good(step, keep_every):
    """Whether a numbered checkpoint at `step` is a milestone of the rules in `keep_every`: pairs (interval, the last
    step it covers or None)."""
    return any(every and step % every == 0 and (until is None or step <= until) for every, until in keep_every)


def save_training_checkpoint(out_dir, checkpoint, step, keep_last_n, keep_every=(), best=False):
    """
    Save `checkpoint` as out_dir/ckpt.pt (always the latest complete one) and as ckpt_<step>.pt. Numbered checkpoints
    beyond the newest `keep_last_n` are deleted, except milestones, kept for good: steps that are a multiple of an
    interval in `keep_every`, pairs (interval, the last step it covers or None), one for every keep_every the run has
    had (a resume that drops or changes it never deletes the milestones kept before). best: it is also best.pt, which
    no later save replaces unless it is best.
    """
    latest = os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(latest, {**checkpoint, "best": best})  # first: what a resume reads (best_linked mends the rest)
    link_or_copy(latest, os.path.join(out_dir, f"ckpt_{step:08d}.pt"))
    if best:
        link_or_copy(latest, os.path.join(out_dir, BEST))
    numbered_all = step_checkpoints(out_dir)
    for s, path in numbered_all[:max(len(numbered_all) - keep_last_n, 0)]:
        if not kept_for_good(s, keep_every):
            os.remove(path)


def snapshot(obj, _copies=None):
    """
    A copy of a nested dict/list/tuple with every tensor copied to CPU memory: what a background write can take while
    training goes on updating the originals in place. Tensors that are the same view of one storage (the tied
    embedding and output weights) stay one tensor in the copy, so the file is no larger than a direct torch.save.
    """
    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(),
               obj.dtype)
        if key not in copies:
            copies[key] = obj.detach().to("cpu", copy=True)
        return copies[key]
    if isinstance(obj, dict):
        copied = copy.copy(obj)  # the same kind of dict, with its attributes (a state_dict's _metadata)
        for k, v in obj.items():
            copied[k] = snapshot(v, copies)
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, copies) for v in obj)
    return obj


class Writer:
    """
    Runs file writes (checkpoints, the loss plot) in the order they are submitted, on one worker thread when
    background=True, so training goes on while the disk works: torch.save and fsync of a checkpoint take from a few
    tenths of a second (the baby GPT, 128 MB) to many seconds (GPT-2 small with AdamW, 1.5 GB, on network storage),
    and every rank used to wait for them. background=False runs each write at once, in the caller's thread.
    A write that fails is not raised where it is submitted, in either mode: failed() says so at once, and check(),
    wait() and close() raise it. So a training loop can make every rank stop together at its next vote, instead of
    rank 0 stopping alone while the others wait for it in a collective.
    """

    def __init__(self, background):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") if background else None
        self._jobs = []

    @property
    def background(self):
        return self._pool is not None

    def submit(self, fn, *args):
        self._jobs = [job for job in self._jobs if not job.done() or job.exception() is not None]  # the failed stay
        if self._pool is not None:
            self._jobs.append(self._pool.submit(fn, *args))
            return
        job = Future()
        try:
            job.set_result(fn(*args))
        except Exception as e:
            job.set_exception(e)
        self._jobs.append(job)

    def failed(self):
        """Whether a write has failed (its error is raised by the next check(), wait() or close()); never waits."""
        return any(job.done() and job.exception() is not None for job in self._jobs)

    def check(self):
        """Raise the error of a write that has failed; return at once otherwise."""
        self._collect(block=False)

    def wait(self, raise_error=True):
        """Return once every submitted write is done; raise the first that failed, unless raise_error=False."""
        futures_wait(self._jobs)
        if raise_error:
            self._collect(block=True)

    def _collect(self, block):
        jobs, self._jobs = self._jobs, []
        for i, job in enumerate(jobs):
            if not (block or job.done()):
                self._jobs.append(job)
            elif job.exception() is not None:  # waits for it when block
                self._jobs.extend(jobs[i + 1:])  # still pending: a later failure is reported too
                job.result()  # re-raises the worker's exception here

    def close(self, report_only=False):
        """
        Wait for what was submitted and stop the worker. report_only=True, for a caller already failing with an error
        of its own: a failed write is printed to stderr instead of being raised over that error.
        """
        try:
            if report_only and not all(job.done() for job in self._jobs):
                print("waiting for the background write under way to finish...", file=sys.stderr)
            self.wait()
        except Exception as e:
            if not report_only:
                raise
            print(f"error: {e}", file=sys.stderr)
        finally:
            if self._pool is not None:
                self._pool.shutdown()


def is_checkpoint(path):
    """Whether an --init_from names one of this toolkit's checkpoints (a .pt file, or a run's folder holding ckpt.pt)
    rather than Hugging Face GPT-2 weights."""
    return path.endswith(".pt") or os.path.isfile(os.path.join(path, "ckpt.pt"))


def load_checkpoint(path):
    """
    Read a checkpoint written by save_checkpoint (or an older nanoGPT ckpt.pt) from a file or an out_dir. A truncated
    or corrupted file is refused with a message that names the newest other checkpoint to fall back to.
    """
    if os.path.isfile(path) and not path.endswith(".pt"):  # it was 'no checkpoint at notes.txt/ckpt.pt' (a trial)
        raise CheckpointError(f"{path} is a file, not a run's folder (nor a .pt checkpoint): give the folder that "
                              "holds ckpt.pt, or the checkpoint file")
    if os.path.isdir(path) or not path.endswith(".pt"):  # an out_dir
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        if os.path.basename(path) != "ckpt.pt":  # a file named by hand: the run's own names, for a typo
            there = [name for name in ("ckpt.pt", BEST) if os.path.isfile(os.path.join(folder, name))] + \
                [os.path.basename(p) for _, p in step_checkpoints(folder)]
            close = difflib.get_close_matches(os.path.basename(path), there, n=1)
            listed = ", ".join(there[:3] + (["..."] if len(there) > 6 else []) + there[3:][-3:])
            raise CheckpointError(f"no checkpoint file {path}" +
                                  (f"; did you mean {os.path.join(folder, close[0])}?" if close else "") +
                                  (f" ({folder} holds {listed})" if there else ""))
        if os.path.isfile(os.path.join(folder, "config.json")):  # export.py's output, or a Hugging Face download
            raise CheckpointError(f"no checkpoint at {path}: {folder} holds a Hugging Face model; give "
                                  f"--init_from={folder} to sample or evaluate it")
        # ckpt.pt deleted or moved by hand: the run's newest numbered checkpoint, else its best.pt
        numbered, best = step_checkpoints(folder), os.path.join(folder, BEST)
        newest = numbered[-1][1] if numbered else best if os.path.isfile(best) else None
        if newest:
            raise CheckpointError(f"no checkpoint at {path}, but the run's other checkpoints are there: "
                                  f"{read_instead(newest)}, or, to resume training from it, link it first: "
                                  f"ln -f {newest} {path}")
        raise CheckpointError(f"no checkpoint at {path}; train one first (python train.py ...) or check --out_dir")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        problem = None
    except Exception as e:  # torch raises many types for a truncated or garbled zip archive
        checkpoint, problem = None, f"is truncated or corrupt and cannot be loaded ({type(e).__name__})"
    newer = checkpoint.get("format", CHECKPOINT_FORMAT) if isinstance(checkpoint, dict) else CHECKPOINT_FORMAT
    if isinstance(newer, int) and newer > CHECKPOINT_FORMAT:  # first: its keys may be named as this code cannot know
        raise CheckpointError(f"{path} is a checkpoint of format {newer}, newer than this toolkit reads "
                              f"({CHECKPOINT_FORMAT}): update the toolkit (git pull)")
    if checkpoint is not None and (not isinstance(checkpoint, dict) or "model" not in checkpoint
                                   or "model_args" not in checkpoint):
        raise CheckpointError(f"{path} is not a GPT checkpoint (no model weights and model_args in it)")
    if checkpoint is not None and "crc32" in checkpoint:
        stored = checkpoint.pop("crc32")
        if _tensor_crc32(checkpoint) != stored:
            problem = "is corrupt: its tensors do not match the checksum written with them"
    if checkpoint is not None and not problem and not _pickle_intact(path):  # torch.load does not check it either
        problem = "is corrupt: its settings and vocabulary fail the checks of the archive that holds them"
    if problem:
        raise CheckpointError(f"{path} {problem}{_fallback_hint(path)}")
    checkpoint["model"] = clean_state_dict(checkpoint["model"])
    if "meta" not in checkpoint:  # nanoGPT's
        checkpoint["meta"] = meta = _nanogpt_meta(checkpoint)
        # the causal mask nanoGPT kept as a buffer when it ran without PyTorch 2's flash attention: not a weight
        checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not NANOGPT_MASK.fullmatch(k)}
        args = checkpoint["model_args"]
        if meta and meta["vocab_size"] < (args.get("vocab_size") or 0):
            from model import GPTConfig
            if GPTConfig(vocab_size=meta["vocab_size"]).padded_vocab_size == args["vocab_size"]:
                # nanoGPT writes GPT-2's vocabulary as 50,304, padding included; as the real 50,257 (padded here
                # too, the weights unchanged) no padding id is sampled, scored or exported
                checkpoint["model_args"] = {**args, "vocab_size": meta["vocab_size"]}
    return checkpoint


NANOGPT_MASK = re.compile(r"transformer\.h\.\d+\.attn\.bias")


def _nanogpt_meta(checkpoint):
    """
    The tokenizer of a checkpoint nanoGPT wrote, which does not record it, found where nanoGPT's sample.py looks:
    its dataset folder's meta.pkl (a char vocabulary; or the meta.json of our prepare.py), else GPT-2 BPE when the
    vocabulary is GPT-2's (50,257, or 50,304 padded). None when neither fits the model; the folder looked in is
    then kept in the checkpoint as "meta_searched", for the message.
    """
    from tokendata import GPT2_META, dataset_dir, nanogpt_char_meta, read_meta
    vocab_size = checkpoint["model_args"].get("vocab_size") or 0
    config = checkpoint.get("config") or {}
    if config.get("dataset"):
        folder = dataset_dir(config["dataset"], config.get("data_root", "data"))
        meta_json = os.path.join(folder, "meta.json")
        meta = read_meta(meta_json) if os.path.exists(meta_json) else nanogpt_char_meta(folder)
        if meta and meta["vocab_size"] <= vocab_size:
            return {k: meta.get(k) for k in ("tokenizer", "vocab_size", "eot_id")}
        checkpoint["meta_searched"] = folder
    return dict(GPT2_META) if vocab_size in (50257, 50304) else None


def step_of(checkpoint):
    """The step a checkpoint was saved at (nanoGPT's `iter_num`), or None."""
    return checkpoint.get("step", checkpoint.get("iter_num"))


def checkpoint_meta(checkpoint, out_dir):
    """The tokenizer meta a checkpoint (of out_dir, for the message) was trained with, or one line that says it
    cannot be known."""
    meta = checkpoint.get("meta")
    if not meta or "tokenizer" not in meta:
        searched = checkpoint.get("meta_searched")
        where = (f"its dataset folder {searched} holds no meta.pkl or meta.json that fits it" if searched else
                 "it names no dataset folder")
        raise CheckpointError(f"the checkpoint in {out_dir} does not say which tokenizer it was trained with, and "
                              f"{where} (an old nanoGPT checkpoint? run from the folder that holds its data/); "
                              "without it no text can be read or written")
    return meta


def read_instead(path):
    """How to read another checkpoint than the one asked for, in each script's words."""
    return f"give {path} instead (--init_from={path}; export.py: --out_dir={path})"


def _fallback_hint(bad_path):
    """Where to go instead of a bad checkpoint: the newest numbered one before it that is not the same file, to read
    as it is or, where the bad one is the run's ckpt.pt, to resume from."""
    bad = os.stat(bad_path)
    folder = os.path.dirname(os.path.abspath(bad_path))
    numbered = STEP_CHECKPOINT.match(os.path.basename(bad_path))
    latest = os.path.join(os.path.dirname(bad_path), "ckpt.pt")
    # what a resume reads: ckpt.pt, or the numbered checkpoint it is a link to (best.pt and others are only read)
    resumed = os.path.basename(bad_path) == "ckpt.pt" or (os.path.exists(latest) and os.path.samefile(latest, bad_path))
    for step, path in reversed(step_checkpoints(folder)):
        st = os.stat(path)
        if (st.st_ino, st.st_dev) == (bad.st_ino, bad.st_dev) or (numbered and step >= int(numbered.group(1))):
            continue
        path = os.path.join(os.path.dirname(bad_path), os.path.basename(path))
        read = read_instead(path)
        if not numbered and not resumed:  # best.pt, say: of no known step, so not "previous"
            return f"; another checkpoint of the run, {path} (step {step}), may be intact: {read}"
        if not resumed:
            return f"; the previous checkpoint {path} (step {step}) may be intact: {read}"
        # ln, not cp: cp would write through the hard link into the bad checkpoint's numbered name
        return (f"; the previous checkpoint {path} (step {step}) may be intact: ln -f {path} {latest} and resume "
                f"from it, or to sample or evaluate it, {read}")
    return ("; no earlier checkpoint to fall back to" +
            (": train anew, in another --out_dir or with this one's checkpoints deleted" if resumed else ""))


def model_from_checkpoint(checkpoint, where, **overrides):
    """Rebuild the GPT a checkpoint (read from `where`) holds, on CPU, in float32; `overrides` change GPTConfig
    fields such as dropout."""
    from model import GPT, GPT2_OPTIONS, GPTConfig
    args = {**GPT2_OPTIONS, **checkpoint["model_args"]}  # nanoGPT's, and older ones, have no options: GPT-2's
    unknown = [f"{k}={v!r}" for k, v in args.items() if k not in GPTConfig.__dataclass_fields__]
    if unknown:  # left out, the model would be another one, silently: a fork's checkpoint read by this code
        raise CheckpointError(f"{where}'s model sets {', '.join(unknown)}, which this model.py does not know: it was "
                              "trained by other code (a fork, or a later version of this toolkit); read it with that")
    args.update(overrides)
    model = GPT(GPTConfig(**args))
    state = dict(checkpoint["model"])
    rows = model.config.padded_vocab_size
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in state and state[key].size(0) < rows:  # nanoGPT's char checkpoints keep an unpadded vocabulary
            pad = state[key].new_zeros(rows - state[key].size(0), state[key].size(1))
            state[key] = torch.cat([state[key], pad])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model_args: {e}") from None
    return model
