"""Batch results on disk: appended as they finish, flushed at once, synced every few seconds and
at exit; what a previous run already wrote is found again on resume (a line torn by a crash is
cut off first), so a custom_id is never written twice."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson

from seesaw.frontend.batch_io import DUPLICATE_CODE

SYNC_EVERY_S = 2.0


def id_key(custom_id: str) -> int:
    """A custom_id as a nonzero 64-bit key (two ids share one with odds of about n^2 / 2^65)."""
    key = int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little")
    return key or 1


class KeySet:
    """A set of 64-bit keys in an open-addressing table: 16 to 32 bytes a key, so the ids of a
    million-line batch take tens of MB, not the hundreds a Python set of ints would."""

    def __init__(self, keys=()):
        self._table = np.zeros(1024, dtype=np.uint64)  # 0 marks an empty slot
        self._count = 0
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: int) -> bool:
        return self._table[self._slot(key)] == key

    def add(self, key: int) -> None:
        slot = self._slot(key)
        if self._table[slot] == key:
            return
        self._table[slot] = key
        self._count += 1
        if 2 * self._count > len(self._table):
            self._grow()

    def update(self, other: KeySet) -> None:
        for key in other._table[other._table != 0]:
            self.add(int(key))

    def _slot(self, key: int) -> int:
        """The slot holding `key`, or the empty one where it would go (linear probing)."""
        table, mask = self._table, len(self._table) - 1
        slot = key & mask
        while True:
            found = table[slot]
            if found == key or found == 0:
                return slot
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        keys = self._table[self._table != 0]
        self._table = np.zeros(2 * len(self._table), dtype=np.uint64)
        self._count = 0
        for key in keys:
            self.add(int(key))


class OutputError(ValueError):
    """An output file that cannot be used as asked."""


def check_output(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber results: an existing non-empty file needs --resume or --overwrite."""
    if resume and overwrite:
        raise OutputError("--resume and --overwrite contradict each other; pick one")
    if not resume and not overwrite and path.is_file() and path.stat().st_size > 0:
        raise OutputError(f"{path} already holds results: pass --resume to finish the batch it belongs to, "
                          f"or --overwrite to start it again")


def check_folder(flag: str, path: Path | None) -> None:
    """Refuse, before any work, a file to write later whose folder does not exist."""
    if path is not None and not path.parent.is_dir():
        raise OutputError(f"{flag} {path}: the folder {path.parent} does not exist")


def finished_ids(path: Path) -> tuple[KeySet, int]:
    """Keys of the custom_ids a results file holds, and how many lines; a torn last line (no
    newline, from a crash mid-write) is cut off so the file ends on a whole line."""
    done = KeySet()
    if not path.is_file():
        return done, 0
    size = path.stat().st_size
    whole = 0  # bytes up to the end of the last whole line
    count = 0
    with path.open("rb") as source:
        for number, line in enumerate(source, start=1):
            if not line.endswith(b"\n"):
                break
            whole += len(line)
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                custom_id = record["custom_id"]
                error = record.get("error") or {}
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as problem:
                raise OutputError(f"{path}, line {number}: not a batch result ({problem}); "
                                  f"the file is not one Seesaw wrote, or it was edited") from None
            count += 1
            if custom_id is None or error.get("code") == DUPLICATE_CODE:
                continue  # a repeated line's 400 says nothing of the request that owns the id
            done.add(id_key(str(custom_id)))
    if whole < size:
        with path.open("r+b") as repair:
            repair.truncate(whole)
    return done, count


def open_locked(path: Path, append: bool) -> BinaryIO:
    """Open a results file to write, refusing one that another run is writing now (each run holds
    a lock on its files); without `append` it starts empty."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputError(f"another run is writing {path}: wait for it, or pick another file") from None
    if not append:
        handle.truncate(0)
    return handle


class ResultSink:
    """Where results go: every line is written whole and flushed; files are synced to disk at
    least every SYNC_EVERY_S seconds and on close. Failed lines go to `errors` if given."""

    def __init__(self, output: Path, errors: Path | None = None, append: bool = True):
        self._files: list[BinaryIO] = [open_locked(output, append)]
        self._errors = None
        if errors is not None:
            try:
                self._errors = open_locked(errors, append)
            except OutputError:
                self._files[0].close()
                raise
        if self._errors is not None:
            self._files.append(self._errors)
        self._last_sync = time.monotonic()

    is_backlogged = False  # a file takes every line at once

    def write(self, line: dict, is_error: bool = False) -> None:
        target = self._errors if is_error and self._errors is not None else self._files[0]
        target.write(orjson.dumps(line) + b"\n")
        target.flush()
        if time.monotonic() - self._last_sync >= SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        for file in self._files:
            file.flush()
            os.fsync(file.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        for file in self._files:
            file.close()

    def __enter__(self) -> ResultSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
