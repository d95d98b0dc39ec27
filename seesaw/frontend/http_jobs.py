"""The OpenAI Files and Batches API over HTTP: uploads streamed to the data folder within
--max-upload-bytes, and batches run by the server's BatchService (routes only: the records are
`seesaw.frontend.job_store`'s, the runs `seesaw.frontend.batch_service`'s)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from seesaw.frontend.job_store import INPUT_PURPOSE, FileStore, public
from seesaw.frontend.openai_http import ApiError

if TYPE_CHECKING:
    from seesaw.frontend.http_server import HttpServer

CHUNK_BYTES = 1 << 16
MAX_FIELD_BYTES = 1024  # a form field beside the file (its purpose)
MAX_FILENAME_CHARS = 255


def add_routes(app: web.Application, server: HttpServer) -> None:
    routes = _Routes(server)
    app.add_routes([
        web.post("/v1/files", routes.upload), web.get("/v1/files", routes.list_files),
        web.get("/v1/files/{file_id}", routes.get_file), web.get("/v1/files/{file_id}/content", routes.content),
        web.delete("/v1/files/{file_id}", routes.delete_file),
        web.post("/v1/batches", routes.create_batch), web.get("/v1/batches", routes.list_batches),
        web.get("/v1/batches/{batch_id}", routes.get_batch), web.post("/v1/batches/{batch_id}/cancel", routes.cancel),
    ])


def _json(body, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _page(records: list[dict], request: web.Request) -> dict:
    """A list answer, paged as OpenAI pages: `after` an id, at most `limit` records."""
    after, limit = request.query.get("after"), request.query.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 10_000:
        raise ApiError(400, f"limit must be an integer from 1 to 10000, got {limit!r}", param="limit")
    if after is not None:
        ids = [record["id"] for record in records]
        records = records[ids.index(after) + 1:] if after in ids else []
    shown = [public(record) for record in records[:int(limit)]]
    return {"object": "list", "data": shown, "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None, "has_more": len(records) > int(limit)}


class _Routes:
    def __init__(self, server: HttpServer):
        self.server = server
        self.files: FileStore = server.jobs.files
        self.config = server.http

    # ------------------------------------------------------------ files

    async def upload(self, request: web.Request) -> web.Response:
        self.server.check_open()
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit + (1 << 20):
            raise ApiError(413, f"the upload is larger than {limit} bytes (--max-upload-bytes)")
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, f"an upload is multipart/form-data with a file and purpose, got {request.content_type!r}")
        file_id = FileStore.new_id()
        try:
            fields, filename, num_lines = await self._read_form(request, file_id)
            purpose = fields.get("purpose")
            if purpose != INPUT_PURPOSE:
                raise ApiError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
            if filename is None:
                raise ApiError(400, "the form has no file part", param="file")
            record = self.files.add(file_id, filename, purpose, num_lines, from_upload=True)
        finally:
            self.files.upload_path(file_id).unlink(missing_ok=True)
        return _json(public(record))

    async def _read_form(self, request: web.Request, file_id: str) -> tuple[dict[str, str], str | None, int]:
        """The form's small fields, and its file written to the upload path: its name and lines."""
        timeout_s = self.config.read_timeout_s
        reader = await asyncio.wait_for(request.multipart(), timeout_s)
        fields: dict[str, str] = {}
        filename, num_lines = None, 0
        while (part := await _within(reader.next(), timeout_s)) is not None:
            if part.name == "file" and filename is None:
                filename = (part.filename or "upload.jsonl")[:MAX_FILENAME_CHARS]
                num_lines = await self._write_file(part, self.files.upload_path(file_id), timeout_s)
            else:
                value = await _within(part.read_chunk(MAX_FIELD_BYTES + 1), timeout_s)
                if len(value) > MAX_FIELD_BYTES or not await _is_drained(part, timeout_s):
                    raise ApiError(413, f"the form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
                fields[part.name or ""] = value.decode(errors="replace")
        return fields, filename, num_lines

    async def _write_file(self, part, path, timeout_s: float) -> int:
        """Stream one file part to `path` within the upload limit; how many lines hold something."""
        limit, size = self.config.max_upload_bytes, 0
        with path.open("wb") as handle:
            while chunk := await _within(part.read_chunk(CHUNK_BYTES), timeout_s):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the file is larger than {limit} bytes (--max-upload-bytes)")
                handle.write(chunk)
        with path.open("rb") as source:
            return sum(1 for line in source if line.strip())

    async def list_files(self, request: web.Request) -> web.Response:
        return _json(_page(self.files.list(request.query.get("purpose")), request))

    def _file(self, request: web.Request) -> dict:
        file_id = request.match_info["file_id"]
        record = self.files.get(file_id)
        if record is None:
            raise ApiError(404, f"no file {file_id!r}", param="file_id")
        return record

    async def get_file(self, request: web.Request) -> web.Response:
        return _json(public(self._file(request)))

    async def content(self, request: web.Request) -> web.FileResponse:
        record = self._file(request)
        return web.FileResponse(self.files.data_path(record["id"]), headers={"Content-Type": "application/jsonl"})

    async def delete_file(self, request: web.Request) -> web.Response:
        record = self._file(request)
        if self.server.jobs.batches.uses(record["id"]):
            raise ApiError(409, f"file {record['id']} belongs to a batch still running; cancel it first",
                           code="conflict")
        self.files.delete(record["id"])
        return _json({"id": record["id"], "object": "file", "deleted": True})

    # ------------------------------------------------------------ batches

    async def create_batch(self, request: web.Request) -> web.Response:
        self.server.check_open()
        try:
            body = orjson.loads(await self.server.read_body(request))
        except orjson.JSONDecodeError as error:
            raise ApiError(400, f"the body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} in the body", param=unknown[0])
        for name in ("input_file_id", "endpoint", "completion_window"):
            if name not in body:
                raise ApiError(400, f"the body needs {name}", param=name)
        record = self.server.jobs.create(body["input_file_id"], body["endpoint"], body["completion_window"],
                                         body.get("metadata"))
        return _json(public(record))

    async def list_batches(self, request: web.Request) -> web.Response:
        jobs = self.server.jobs
        return _json(_page([jobs.view(record["id"]) for record in jobs.batches.list()], request))

    async def get_batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["batch_id"]
        record = self.server.jobs.view(batch_id)
        if record is None:
            raise ApiError(404, f"no batch {batch_id!r}", param="batch_id")
        return _json(public(record))

    async def cancel(self, request: web.Request) -> web.Response:
        return _json(public(self.server.jobs.cancel(request.match_info["batch_id"])))


async def _within(awaitable, timeout_s: float):
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the upload stalled for {timeout_s:.0f} s") from None


async def _is_drained(part, timeout_s: float) -> bool:
    return not await _within(part.read_chunk(1), timeout_s)

