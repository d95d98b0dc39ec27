"""The HTTP API's durable records, in its data folder: files (uploads and batch outputs) under
`files/`, batches under `batches/`. Each record is a JSON file written whole and renamed into
place, so a crash leaves the old record or the new one, never half of one. The batch lifecycle's
states and their order are here too (pure: no engine)."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

import orjson

INPUT_PURPOSE, OUTPUT_PURPOSE = "batch", "batch_output"
RUNNING_STATES = ("validating", "in_progress", "finalizing", "cancelling")  # a batch to resume after a restart
FINAL_STATES = ("completed", "failed", "cancelled", "expired")
_FILE_ID = re.compile(r"file-[0-9a-f]{24}")
_BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")


def write_record(path: Path, record: dict) -> None:
    """Write a JSON record whole: to a temporary file, synced, then renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    with temporary.open("wb") as handle:
        handle.write(orjson.dumps(record))
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def _read_records(folder: Path, pattern: re.Pattern) -> dict[str, dict]:
    records = {}
    for path in sorted(folder.glob("*.json")):
        if pattern.fullmatch(path.stem):
            records[path.stem] = orjson.loads(path.read_bytes())
    return records


def public(record: dict) -> dict:
    """A record as the API shows it: without the fields the server keeps for itself (`_*`)."""
    return {key: value for key, value in record.items() if not key.startswith("_")}


class FileStore:
    """Files by id: the bytes in `<id>.jsonl`, the description in `<id>.json`."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob("*.part"):
            leftover.unlink()  # an upload a crash cut short
        self._records = _read_records(folder, _FILE_ID)

    @staticmethod
    def new_id() -> str:
        return f"file-{secrets.token_hex(12)}"

    def data_path(self, file_id: str) -> Path:
        return self.folder / f"{file_id}.jsonl"

    def upload_path(self, file_id: str) -> Path:
        """Where an upload is written until it is whole."""
        return self.folder / f"{file_id}.part"

    def get(self, file_id: str) -> dict | None:
        return self._records.get(file_id) if _FILE_ID.fullmatch(file_id) else None

    def list(self, purpose: str | None = None) -> list[dict]:
        """Newest first."""
        found = [record for record in self._records.values() if purpose is None or record["purpose"] == purpose]
        return sorted(found, key=lambda record: (record["created_at"], record["id"]), reverse=True)

    def add(self, file_id: str, filename: str, purpose: str, num_lines: int, from_upload: bool = False) -> dict:
        """Describe a file whose bytes are in place (an upload's are moved there first)."""
        if from_upload:
            self.upload_path(file_id).replace(self.data_path(file_id))
        record = {"id": file_id, "object": "file", "bytes": self.data_path(file_id).stat().st_size,
                  "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                  "status": "processed", "status_details": None, "_lines": num_lines}
        write_record(self.folder / f"{file_id}.json", record)
        self._records[file_id] = record
        return record

    def delete(self, file_id: str) -> None:
        self._records.pop(file_id, None)
        (self.folder / f"{file_id}.json").unlink(missing_ok=True)
        self.data_path(file_id).unlink(missing_ok=True)


class BatchStore:
    """Batch records by id, each an OpenAI batch object (plus the ids of its output files, kept
    before they are shown)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._records = _read_records(folder, _BATCH_ID)

    def get(self, batch_id: str) -> dict | None:
        return self._records.get(batch_id) if _BATCH_ID.fullmatch(batch_id) else None

    def list(self) -> list[dict]:
        """Newest first."""
        return sorted(self._records.values(), key=lambda record: (record["created_at"], record["id"]), reverse=True)

    def unfinished(self) -> list[dict]:
        """Batches a stopped server left running, oldest first."""
        return [record for record in reversed(self.list()) if record["status"] in RUNNING_STATES]

    def uses(self, file_id: str) -> bool:
        """Whether an unfinished batch reads or writes the file."""
        return any(file_id in (record["input_file_id"], record["_output_id"], record["_error_id"])
                   for record in self._records.values() if record["status"] in RUNNING_STATES)

    def create(self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
               total: int) -> dict:
        now = int(time.time())
        record = {
            "id": f"batch_{secrets.token_hex(12)}", "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": metadata,
            "_output_id": FileStore.new_id(), "_error_id": FileStore.new_id(),
        }
        self.save(record)
        return record

    def move(self, record: dict, status: str, **fields) -> dict:
        """Record that a batch reached `status` (stamped `<status>_at`, as OpenAI names them)."""
        stamp = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
                 "failed": "failed_at", "cancelling": "cancelling_at", "cancelled": "cancelled_at"}.get(status)
        record = {**record, **fields, "status": status}
        if stamp is not None and record.get(stamp) is None:
            record[stamp] = int(time.time())
        self.save(record)
        return record

    def save(self, record: dict) -> None:
        write_record(self.folder / f"{record['id']}.json", record)
        self._records[record["id"]] = record
