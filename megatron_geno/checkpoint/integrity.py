"""The integrity of a checkpoint directory: ``checksums.json`` (written at save) holds the CRC32C of
every stored item (tensor chunk or object) and of ``.metadata`` and ``common.pt``; it is checked
before a load (the work split over the job's processes), and a mismatch names the file and the
tensor. ``structural_fault`` is the cheap check (files present, sizes) that finds a checkpoint a
killed save left incomplete.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import google_crc32c
import torch
from torch.distributed.checkpoint.metadata import Metadata

from megatron_geno.checkpoint.trust import (CHECKSUMS, COMMON, METADATA, CheckpointError,
                                            _check_storage_path, read_dcp_metadata)

log = logging.getLogger(__name__)

_READ_BLOCK = 16 << 20


def _crc_range(f, offset: int, length: int) -> int:
    f.seek(offset)
    crc, left = 0, length
    while left:
        block = f.read(min(left, _READ_BLOCK))
        if not block:
            return -1  # short file
        crc = google_crc32c.extend(crc, block)
        left -= len(block)
    return crc


def _crc_file(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    with path.open("rb") as f:
        return size, _crc_range(f, 0, size)


def _items_by_file(metadata: Metadata) -> dict[str, list]:
    files: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        files.setdefault(info.relative_path, []).append((index, info))
    for items in files.values():
        items.sort(key=lambda pair: pair[1].offset)
    return files


def _item_name(index) -> str:
    offsets = getattr(index, "offset", None)
    return index.fqn if offsets is None else f"{index.fqn}@{list(offsets)}"


def compute_checksums(ckpt: str | Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Returns the checksum entries of this process's share of the checkpoint's data files.

    share = (rank, world): the data files are split between processes by position in sorted
    order; rank 0 also covers .metadata and common.pt. merge the shares with merge_checksums.
    """
    ckpt = Path(ckpt)
    rank, world = share
    metadata = read_dcp_metadata(ckpt)
    files, items = {}, []
    for n, (name, entries) in enumerate(sorted(_items_by_file(metadata).items())):
        if n % world != rank:
            continue
        path = ckpt / name
        files[name] = {"size": path.stat().st_size}
        with path.open("rb") as f:
            for index, info in entries:
                items.append({"item": _item_name(index), "file": name, "offset": info.offset,
                              "length": info.length,
                              "crc32c": _crc_range(f, info.offset, info.length)})
    if rank == 0:
        for name in (METADATA, COMMON):
            size, crc = _crc_file(ckpt / name)
            files[name] = {"size": size, "crc32c": crc}
    return {"files": files, "items": items}


def merge_checksums(shares: Iterable[dict]) -> dict:
    """One checksums.json document from every process's compute_checksums result."""
    merged = {"format": 1, "algorithm": "crc32c", "files": {}, "items": []}
    for share in shares:
        merged["files"].update(share["files"])
        merged["items"].extend(share["items"])
    merged["files"] = dict(sorted(merged["files"].items()))
    merged["items"].sort(key=lambda item: (item["file"], item["offset"]))
    return merged


def write_checksums(ckpt: str | Path, document: dict) -> None:
    """Writes CKPT/checksums.json (durably: a crash never leaves half a file)."""
    from megatron_geno.files import write_text_atomic

    write_text_atomic(Path(ckpt) / CHECKSUMS, json.dumps(document, indent=0) + "\n")


def seal(ckpt: str | Path) -> None:
    """Computes and writes the checksums of a whole checkpoint from one process."""
    write_checksums(ckpt, merge_checksums([compute_checksums(ckpt)]))


def read_checksums(ckpt: str | Path) -> Optional[dict]:
    """Returns checksums.json, None when the checkpoint has none (older versions wrote none)."""
    path = Path(ckpt) / CHECKSUMS
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
        if document.get("algorithm") != "crc32c" or not isinstance(document.get("items"), list):
            raise ValueError("unknown layout")
        return document
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged ({str(err)[:200]})") from None


def verify_checksums(ckpt: str | Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Checks this process's share of the checkpoint against checksums.json.

    Returns one message per fault (naming the file, and the tensor for item data); an empty list
    when everything matches or the checkpoint predates checksums (a warning is logged).
    """
    ckpt = Path(ckpt)
    document = read_checksums(ckpt)
    if document is None:
        log.warning("%s has no %s (written by an older version): its content is not verified",
                    ckpt, CHECKSUMS)
        return []
    rank, world = share
    names = sorted(document["files"])
    mine = {name for n, name in enumerate(names) if n % world == rank}
    faults, unusable = _file_faults(ckpt, document, mine)
    handles: dict[str, object] = {}
    try:
        for item in document["items"]:
            name = item.get("file")
            if name not in mine or name in unusable:
                continue
            if name not in handles:
                handles[name] = (ckpt / name).open("rb")
            crc = _crc_range(handles[name], int(item["offset"]), int(item["length"]))
            if crc != item["crc32c"]:
                faults.append(f"{ckpt / name}: tensor {item['item']} fails its content checksum "
                              f"(bytes {item['offset']}..{item['offset'] + item['length']})")
    finally:
        for handle in handles.values():
            handle.close()
    return faults


def _file_faults(ckpt: Path, document: dict, names) -> tuple[list[str], set]:
    """(faults, names unusable) of the files NAMES of checksums.json's document: each present,
    of the size written, and of its CRC32C where the file has one (.metadata, common.pt)."""
    faults, unusable = [], set()
    for name in sorted(names):
        _check_storage_path(ckpt, name)
        path, expected = ckpt / name, document["files"][name]
        if not path.exists():
            faults.append(f"{path} is missing")
            unusable.add(name)
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            faults.append(f"{path} has {size} bytes, {expected.get('size')} were written "
                          f"(truncated or damaged)")
            unusable.add(name)
            continue
        if "crc32c" in expected and _crc_file(path)[1] != expected["crc32c"]:
            faults.append(f"{path}: content checksum mismatch")
    return faults, unusable


def check_index_files(ckpt: str | Path) -> Optional[dict]:
    """Checks .metadata and common.pt (small) against checksums.json, and every data file's
    size, and returns the document for the load to check each item as it reads it (None, with
    a warning, for a checkpoint written before checksums existed)."""
    ckpt = Path(ckpt)
    document = read_checksums(ckpt)
    if document is None:
        log.warning("%s has no %s (written by an older version): its content is not verified",
                    ckpt, CHECKSUMS)
        return None
    faults, _ = _file_faults(ckpt, document, document["files"])
    if faults:
        raise CheckpointError(faults[0])
    return document


def gather_faults(faults: list[str]) -> list[str]:
    """Every process's faults, on every process (a collective when torch.distributed is up)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return faults
    shares: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, faults)
    return [fault for share in shares for fault in share]


def check_content(ckpt: str | Path) -> None:
    """Raises CheckpointError (the same on every rank) when any stored byte fails its checksum.

    The work is split between the processes of the job; each reads its share once.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    share = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
             if distributed else (0, 1))
    try:
        faults = verify_checksums(ckpt, share)
    except CheckpointError as err:
        faults = [str(err)]
    faults = gather_faults(faults)
    if faults:
        more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
        raise CheckpointError(faults[0] + more)


def structural_fault(ckpt: str | Path) -> Optional[str]:
    """Returns why CKPT is not a complete, loadable checkpoint (cheap checks), or None.

    Checks the files a load needs exist, .metadata is safe to read and names only present files,
    and file sizes match checksums.json when it exists. Content is check_content's job.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return f"{ckpt} does not exist"
    for name in ("metadata.json", COMMON):
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    try:
        metadata = read_dcp_metadata(ckpt)
        document = read_checksums(ckpt)
    except CheckpointError as err:
        return str(err)
    for name in _items_by_file(metadata):
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    for name, expected in (document or {}).get("files", {}).items():
        path = ckpt / name
        if not path.is_file() or path.stat().st_size != expected.get("size"):
            return f"{path} is missing or has the wrong size (truncated?)"
    return None


# --------------------------------------------------------------------------------------------
# Checksums computed from the bytes as they are written (DESIGN decision 21): no second read.
#
# megatron-core's torch_dist writer (FileSystemWriterAsync) hands every item (tensor chunk or
# pickled object) to torch's ``_write_item`` through the writer's stream transforms
# (``writer.transforms``, torch.distributed.checkpoint's extension point for compression and the
# like). ``ChecksummingTransforms`` is such a transform that changes no byte: it passes each
# item's bytes to the file and computes their CRC32C on the way, then appends
# ``offset length crc`` to a sidecar ``FILE.crc32c`` beside the data file. The writers are
# forked processes (megatron-core's multiproc writer), so the sidecar is how the result leaves
# them; at sealing each rank reads its own sidecars (a few bytes per item), rank 0 merges them
# into checksums.json and removes them. The checkpoint's files are never read back.

SIDECAR = ".crc32c"
_CRC_BLOCK = 8 << 20  # the fixed buffer a memoryview is checksummed through (crc32c wants bytes)


def _extend(crc: int, data) -> int:
    if isinstance(data, bytes):
        return google_crc32c.extend(crc, data)
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _CRC_BLOCK):
        crc = google_crc32c.extend(crc, bytes(view[start:start + _CRC_BLOCK]))
    return crc


class _ChecksummingStream(io.IOBase):
    """One item's stream: writes pass to ``inner`` and into the item's CRC32C; close() records
    (offset, length, crc) in the data file's sidecar."""

    def __init__(self, inner, raw, sidecars: dict) -> None:
        super().__init__()
        self.inner, self.raw, self.sidecars = inner, raw, sidecars
        self.offset, self.length, self.crc = raw.tell(), 0, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self.inner.write(data)
        self.crc = _extend(self.crc, data)
        self.length += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.inner.close()
        path = str(self.raw.name) + SIDECAR
        if path not in self.sidecars:  # unbuffered: a forked writer ends with os._exit
            self.sidecars[path] = open(path, "ab", buffering=0)
        self.sidecars[path].write(f"{self.offset} {self.length} {self.crc}\n".encode())
        super().close()


def checksumming_transforms():
    """torch's writer transforms (no extension) with every item checksummed as it is written."""
    from torch.distributed.checkpoint.filesystem import _StorageWriterTransforms

    class ChecksummingTransforms(_StorageWriterTransforms):
        def __init__(self) -> None:
            super().__init__(())
            self.sidecars: dict = {}

        def transform_save_stream(self, write_item, raw_stream):
            inner, descriptors = super().transform_save_stream(write_item, raw_stream)
            return _ChecksummingStream(inner, raw_stream, self.sidecars), descriptors

    return ChecksummingTransforms()


def written_checksums(ckpt: str | Path, rank: int) -> dict:
    """{(file, offset): (length, crc)} from the sidecars of the data files rank wrote
    (torch_dist names them ``__RANK_N.distcp``); the sidecars are removed."""
    found = {}
    for sidecar in sorted(Path(ckpt).glob(f"__{rank}_*{SIDECAR}")):
        name = sidecar.name[:-len(SIDECAR)]
        for line in sidecar.read_text().splitlines():
            offset, length, crc = (int(x) for x in line.split())
            found[(name, offset)] = (length, crc)
        sidecar.unlink()
    return found


def seal_from_written(ckpt: str | Path, written: dict) -> dict:
    """The checksums.json document of a checkpoint whose items were checksummed as written
    (written: every rank's written_checksums merged); .metadata and common.pt, small files
    written by rank 0, are read. CheckpointError when a stored item has no checksum."""
    ckpt = Path(ckpt)
    metadata = read_dcp_metadata(ckpt)
    files, items = {}, []
    for name, entries in sorted(_items_by_file(metadata).items()):
        files[name] = {"size": (ckpt / name).stat().st_size}
        for index, info in entries:
            found = written.get((name, info.offset))
            if found is None or found[0] != info.length:
                raise CheckpointError(f"{ckpt / name}: no checksum was computed while writing "
                                      f"{_item_name(index)}")
            items.append({"item": _item_name(index), "file": name, "offset": info.offset,
                          "length": info.length, "crc32c": found[1]})
    for name in (METADATA, COMMON):
        size, crc = _crc_file(ckpt / name)
        files[name] = {"size": size, "crc32c": crc}
    return merge_checksums([{"files": files, "items": items}])
