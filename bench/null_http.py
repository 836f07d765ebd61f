"""The transport floor of the HTTP load bench: a server that reads each request (its
Content-Length body) and answers a fixed ``{}``, doing nothing else.

It runs on the same stack as ``kvcache serve`` (uvloop, an `asyncio.Protocol`) and gets the
same 8k-token bodies from the same client, so its p50 is what moving the bytes costs on this
machine (kernel copies, wake-ups, the client's own work), and kvcache's p50 minus it is what
kvcache's server and scoring add.

    python -m bench.null_http --port N
"""

from __future__ import annotations

import argparse
import asyncio

from kvcache.service.app import new_event_loop

_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # bytes of the request being read, once its head is in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                at = head.find(b"content-length:")
                size = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                self.need = end + 4 + size
            if len(self.buffer) < self.need:
                return
            del self.buffer[: self.need]
            self.need = -1
            assert self.transport is not None
            self.transport.write(_ANSWER)


def main() -> None:
    """Serve on 127.0.0.1:--port until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    loop = new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Connection, "127.0.0.1", port))
    loop.run_until_complete(server.serve_forever())


if __name__ == "__main__":
    main()
