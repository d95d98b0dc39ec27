"""The daemon protocol's shared terms (docs/protocol.md), written once for the server and its clients."""

from __future__ import annotations

VERSION = 1
CHAT = "chat"  # the endpoints a request names
COMPLETIONS = "completions"
ENDPOINTS = (CHAT, COMPLETIONS)
FINAL_FRAME_TYPES = frozenset({"result", "job_done", "job_status", "stats"})  # the last frame about a request
MAX_FRAME_BYTES = 8 << 20  # the server's default --max-frame-bytes; a larger frame is dropped unread
BUSY = "busy"  # the error code of a request or job refused for lack of room; a client may retry it
SHUTTING_DOWN = "shutting_down"
UNSUPPORTED_VERSION = "unsupported_version"
