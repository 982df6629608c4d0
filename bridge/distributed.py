"""Distributed helpers: who we are under torchrun, and safe cleanup of Mosaic's shared memory.

Mosaic's own ``clean_stale_shared_memory`` unlinks every segment from prefix 0 upwards, including
those of a *live* job on the same machine. Here a segment is removed only when it belongs to us,
no running process maps it (a crashed run leaves segments that nobody maps), and it has not
changed for :data:`STALE_AFTER_S` (a loader starting elsewhere creates a segment a moment before
it maps it).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

__all__ = ["world_info", "broadcast_from_rank0", "all_gather_objects", "clean_stale_shared_memory",
           "stale_shared_memory", "release_shared_memory"]

logger = logging.getLogger(__name__)

_SHM_DIR = "/dev/shm"

#: A segment changed more recently than this is never stale: its creator may not have mapped it yet.
STALE_AFTER_S = 60.0


def _mosaic_name(name: str) -> bool:
    from sparkbridge.bridge.mosaic import SHM_NAME

    return SHM_NAME.match(name) is not None


def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torch.distributed, else torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, size, int(os.environ.get("LOCAL_RANK", 0))


def _one_process() -> bool:
    """No process group and none to set up (``WORLD_SIZE`` unset or 1): then Mosaic's
    ``maybe_init_dist`` does nothing, and is not imported for it (Mosaic's import is ~35 ms of a
    loader's construction in a fresh process, better spent while its shards load)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", 1)) == 1


def broadcast_from_rank0(compute):
    """``compute()`` on rank 0, the same value on every rank (``compute`` runs only on rank 0).
    When it raises, every rank raises that error (same class and message): a rank that waited for
    the value must not wait for the process group's timeout. Without a process group (one
    process, or torchrun before ``init_process_group``) one is set up from torchrun's environment
    for the call, as Mosaic does."""
    if _one_process():
        return compute()
    import torch.distributed as dist

    from sparkbridge.bridge.mosaic import maybe_init_dist

    destroy = maybe_init_dist()
    try:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return compute()
        failure = None
        box: list = [None]
        if dist.get_rank() == 0:
            try:
                box = [("value", compute())]
            except Exception as exc:
                failure = exc
                box = [("error", portable_error(exc))]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            if failure is not None:
                raise failure
            raise rebuilt_error(value, 0)
        return value
    finally:
        if destroy:
            dist.destroy_process_group()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (one all-gather of the default group)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def portable_error(exc: BaseException) -> tuple[Optional[bytes], str, str]:
    """An error as it travels to the other ranks: pickled when it survives the trip with its
    class and message intact, plus its class name and message (the fallback)."""
    import pickle

    name, message = type(exc).__name__, str(exc)
    try:
        data: Optional[bytes] = pickle.dumps(exc)
        back = pickle.loads(data)
        if type(back) is not type(exc) or str(back) != message:
            data = None
    except Exception:
        data = None
    return data, name, message


def rebuilt_error(portable: tuple[Optional[bytes], str, str], rank: int) -> BaseException:
    """Rank ``rank``'s error (:func:`portable_error`), to raise on this rank: the same class and
    message (:class:`~sparkbridge.errors.RankFailedError` naming both when it does not pickle)."""
    import pickle

    from sparkbridge.errors import RankFailedError

    data, name, message = portable
    exc: BaseException = pickle.loads(data) if data is not None else RankFailedError(f"rank {rank} failed: {name}: {message}")
    exc.add_note(f"(raised on rank {rank}; every rank of the job raises it)")
    return exc


def _mapped_shm_names() -> Optional[set[str]]:
    names: set[str] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    i = line.find(_SHM_DIR + "/")
                    if i >= 0:
                        names.add(line[i + len(_SHM_DIR) + 1:].split(" (deleted)")[0].strip())
        except OSError:
            continue  # exited, or another user's process (which cannot map our 0600 segments)
    return names


#: The inode of the initial PID namespace (the kernel's PROC_PID_INIT_INO).
_INIT_PID_NS_INODE = 0xEFFFFFFC


def _sees_every_process() -> bool:
    """Whether /proc shows every process of this host: not in a PID namespace of our own (a
    container). Why: a container may share the host's /dev/shm (``--ipc=host``) while its /proc
    shows only its own processes; a segment mapped by a job outside would look stale, and
    unlinking it breaks that live job (a rank joining later finds no segment)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino == _INIT_PID_NS_INODE
    except OSError:
        return False


def stale_shared_memory() -> list[str]:
    """Names of Mosaic segments in /dev/shm owned by us, unmodified for :data:`STALE_AFTER_S`, that
    no live process maps; none when this process cannot see every process that may map them
    (:func:`_sees_every_process`)."""
    if not os.path.isdir(_SHM_DIR):
        return []
    if not _sees_every_process():
        logger.info("this process has a PID namespace of its own (a container): processes outside it may map "
                    "Mosaic's shared memory unseen, so none is removed as stale (when no job runs on this host, "
                    "remove /dev/shm/NNNNNN_* segments by hand)")
        return []
    import time

    uid = os.getuid()
    settled = time.time() - STALE_AFTER_S
    ours = []
    for name in os.listdir(_SHM_DIR):
        if _mosaic_name(name):
            try:
                st = os.stat(os.path.join(_SHM_DIR, name))
            except OSError:
                continue
            if st.st_uid == uid and st.st_mtime < settled:
                ours.append(name)
    if not ours:
        return []
    mapped = _mapped_shm_names()
    if mapped is None:
        return []
    return sorted(n for n in ours if n not in mapped)


def clean_stale_shared_memory() -> int:
    """Remove stale Mosaic segments (see module doc); under torchrun only local rank 0 does it
    and the others wait for it. Returns how many segments were removed here."""
    import torch.distributed as dist

    from sparkbridge.bridge.mosaic import maybe_init_dist

    destroy = maybe_init_dist()  # as Mosaic's constructor does: a barrier needs a process group
    removed = 0
    _, _, local_rank = world_info()
    if local_rank == 0:
        for name in stale_shared_memory():
            try:
                os.unlink(os.path.join(_SHM_DIR, name))
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            logger.info("removed %d stale shared-memory segment(s) left by a crashed run", removed)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if destroy:
        dist.destroy_process_group()
    return removed


def release_shared_memory(dataset) -> int:
    """Close a ``StreamingDataset``'s shared memory now (see :func:`bridge.mosaic.release_shared_memory`);
    ``StreamingLoader.close`` does it."""
    from sparkbridge.bridge.mosaic import release_shared_memory as release

    return release(dataset)
