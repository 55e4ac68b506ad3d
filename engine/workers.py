"""DataLoader worker processes under the engine's stop-signal contract, for every data source that uses them.

Launchers, schedulers and terminals deliver stop signals to a whole process group (torchrun, ``scancel``,
preemption, Slurm's pre-time-limit SIGUSR1 forwarded by srun to every process of the step, Ctrl-C); only the
training process acts on them (it checkpoints at the next step boundary, docs/reliability.md). A worker that
died of one would make the trainer's next batch fail ("DataLoader worker is killed by signal") before it can
save. :func:`init_worker` is the ``worker_init_fn`` of every loader with workers (pretraining's
``PretrainLoader``, finetuning's ``BatchLoader`` and evaluation, the VQ-KD image stream); :class:`Workers`
starts a loader's workers under :func:`workers_starting` and stops them when closed or before the interpreter
exits (:func:`shut_down_at_exit`); :func:`short_socket_tempdir` (called by :func:`workers_starting`) keeps the
workers able to send their batches when ``TMPDIR`` is a deep folder.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import weakref

log = logging.getLogger(__name__)

WORKER_IGNORED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

# glibc's mallopt(M_MMAP_THRESHOLD, ...): allocations from this size up get their own mapping, returned to
# the system when freed. glibc raises the threshold after each large free (up to 32 MiB on 64-bit), so a
# worker that builds batches of tens of MiB and variable-size temporaries (crops, flips, augmentations)
# soon serves them from its heap, which fragments and keeps growing: about 11 MiB more resident memory per
# batch in bench/finetune_stream.py until ~1 GB per worker. Fixing the threshold at glibc's initial value
# (128 KiB) switches that adjustment off; elsewhere (musl, macOS) nothing is done.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold in this process (see above); False where there is no glibc ``mallopt``."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except OSError:
        return False
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM, SIGUSR1 and SIGINT, and keeps its heap from
    growing with the batches it builds (:func:`fix_mmap_threshold`).

    Workers still end: when the loader shuts them down, and when the training process is gone (torch's
    worker loop watches its parent). Torch's own SIGTERM handler in the worker (exit when the parent sends
    it) is replaced, so a loader must be shut down before the interpreter exits, or multiprocessing's exit
    hook waits for such a worker forever: register it with :func:`shut_down_at_exit`.
    """
    stop = _stop_signals()
    for sig in stop:
        signal.signal(sig, signal.SIG_IGN)
    if stop:  # held by workers_starting() in the parent while this worker was forked: now ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)
    fix_mmap_threshold()


def _stop_signals() -> list[signal.Signals]:
    return [getattr(signal, name) for name in WORKER_IGNORED_SIGNALS if hasattr(signal, name)]


# A worker hands a batch's tensors to the training process as file descriptors, sent over a Unix socket that
# multiprocessing makes at <temp dir>/pymp-XXXXXXXX/listener-XXXXXXXX. Linux caps such a path at 107 bytes;
# past it the bind fails in the worker's sending thread, the batch is dropped, and the training process
# waits for it forever. A job's TMPDIR can be that deep (a scheduler's per-job folder, a test's tmp_path).
# Python 3.14 falls back to a short system folder in that case (multiprocessing.util._get_base_temp_dir);
# this does the same for the Pythons before it.
SOCKET_PATH_MAX = 107
PYMP_NAME, LISTENER_NAME = len("/pymp-XXXXXXXX"), len("/listener-XXXXXXXX")
LISTENER_SUFFIX = PYMP_NAME + LISTENER_NAME  # below the temp dir
SHORT_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def short_socket_tempdir() -> str | None:
    """Make multiprocessing's temporary folder short enough for its Unix sockets (see above), before a
    loader forks its workers (they inherit it). Returns the folder made, or None when the current one fits
    (or no short folder is writable: then nothing changes)."""
    from multiprocessing import process, util

    if not sys.platform.startswith("linux"):
        return None
    config = process.current_process()._config
    current = config.get("tempdir")  # multiprocessing's folder once made, else the one it would make
    folder = len(current) if current else len(tempfile.gettempdir()) + PYMP_NAME
    if folder + LISTENER_NAME <= SOCKET_PATH_MAX:
        return None
    base = next((d for d in SHORT_TEMP_DIRS if os.access(d, os.W_OK | os.X_OK)), None)
    if base is None:
        return None
    short = tempfile.mkdtemp(prefix="pymp-", dir=base)
    # removed at exit as multiprocessing removes its own (a forked worker clears the inherited finalizers)
    util.Finalize(None, shutil.rmtree, args=(short, True), exitpriority=-100)
    config["tempdir"] = short
    log.info("TMPDIR is too deep for the data workers' sockets: multiprocessing uses %s", short)
    return short


@contextlib.contextmanager
def workers_starting():
    """Around the start of a loader's workers (``iter(DataLoader(...))``): the stop signals are held in this
    thread, so a worker forked meanwhile inherits them held and cannot die of one before :func:`init_worker`
    ignores them (a loader that starts its workers each epoch would otherwise have that window every
    epoch). Held signals reach this process's own handlers when the block ends. Multiprocessing's temporary
    folder is made short enough first (:func:`short_socket_tempdir`)."""
    short_socket_tempdir()
    stop = _stop_signals() if hasattr(signal, "pthread_sigmask") else []
    held = signal.pthread_sigmask(signal.SIG_BLOCK, stop) if stop else None
    try:
        yield
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Workers:
    """The worker processes of one iteration of a DataLoader: ``Workers(loader)`` is ``iter(loader)`` with
    its workers forked under :func:`workers_starting` and registered with :func:`shut_down_at_exit`;
    iterate it for the batches, :meth:`close` stops the workers now (not whenever the garbage collector
    reaches the iterator). The one way every data source of the project starts its workers."""

    def __init__(self, loader) -> None:
        with workers_starting():  # no worker can die of a stop signal before it ignores them
            self.iterator = iter(loader)
        shut_down_at_exit(self)

    def __iter__(self):
        return self.iterator

    def close(self) -> None:
        # torch's iterator over worker processes has _shutdown_workers; a single-process one has none
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


_open_loaders: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def shut_down_at_exit(loader) -> None:
    """Have ``loader.close()`` called at interpreter exit, before multiprocessing joins the worker processes.

    ``atexit`` runs hooks last-registered first: this one is registered after torch's (set when torch is
    imported, it turns the DataLoader's own shutdown into a no-op) and after multiprocessing's (which
    SIGTERMs daemonic workers and joins them without a timeout), so it runs before both.
    """
    global _exit_hook_registered
    _open_loaders.add(loader)
    if not _exit_hook_registered:
        atexit.register(_close_open_loaders)
        _exit_hook_registered = True


def _close_open_loaders() -> None:
    for loader in list(_open_loaders):
        try:
            loader.close()
        except Exception as e:  # exiting anyway: say why a worker may linger, do not mask the exit status
            log.warning("could not shut down the data loader workers at exit: %r", e)
