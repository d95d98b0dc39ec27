"""Batch results on disk: appended as they finish, flushed at once, synced every few seconds and
at exit; what a previous run already wrote is found again on resume (a line torn by a crash is
cut off first), so a custom_id is never written twice."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import BinaryIO

import orjson

SYNC_EVERY_S = 2.0


def id_key(custom_id: str) -> int:
    """A custom_id as a 64-bit key: a million of them fit in a few tens of MB."""
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little")


class OutputError(ValueError):
    """An output file that cannot be used as asked."""


def check_output(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber results: an existing non-empty file needs --resume or --overwrite."""
    if resume and overwrite:
        raise OutputError("--resume and --overwrite contradict each other; pick one")
    if not resume and not overwrite and path.is_file() and path.stat().st_size > 0:
        raise OutputError(f"{path} already holds results: pass --resume to finish the batch it belongs to, "
                          f"or --overwrite to start it again")


def finished_ids(path: Path) -> tuple[set[int], int]:
    """Keys of the custom_ids a results file holds, and how many lines; a torn last line (no
    newline, from a crash mid-write) is cut off so the file ends on a whole line."""
    done: set[int] = set()
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
            except (orjson.JSONDecodeError, KeyError, TypeError) as error:
                raise OutputError(f"{path}, line {number}: not a batch result ({error}); "
                                  f"the file is not one Seesaw wrote, or it was edited") from None
            done.add(id_key(str(custom_id)))
            count += 1
    if whole < size:
        with path.open("r+b") as repair:
            repair.truncate(whole)
    return done, count


class ResultSink:
    """Where results go: every line is written whole and flushed; files are synced to disk at
    least every SYNC_EVERY_S seconds and on close. Failed lines go to `errors` if given."""

    def __init__(self, output: Path, errors: Path | None = None, append: bool = True):
        mode = "ab" if append else "wb"
        self._files: list[BinaryIO] = [output.open(mode)]
        self._errors = errors.open(mode) if errors is not None else None
        if self._errors is not None:
            self._files.append(self._errors)
        self._last_sync = time.monotonic()

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
