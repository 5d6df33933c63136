"""A local HTTP server for download tests: hand-made files served from memory on
127.0.0.1 (port 0), with HTTP ``Range`` support that can be turned off, connections that
close early on request, and a log of what each request asked for. Nothing reaches the
internet."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field


@dataclass
class Served:
    """What the server holds and how it misbehaves; tests change it between requests."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True  # honour "Range: bytes=N-" (206); False: always the whole file (200)
    # path -> byte counts at which successive requests for it are cut (the connection is
    # closed after that many body bytes, the announced Content-Length unchanged)
    cut: dict[str, list[int]] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)


class _Handler(http.server.BaseHTTPRequestHandler):
    served: Served

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        s = self.served
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        s.requests.append((path, rng))
        body = s.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and s.ranges and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
            if start >= len(body):
                self.send_error(416, "Requested Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cuts = s.cut.get(path)
        stop = start + cuts.pop(0) if cuts else len(body)
        self.wfile.write(body[start:stop])
        self.wfile.flush()
        self.close_connection = True


class LocalServer:
    """``with LocalServer() as srv: srv.served.files["/a.bin"] = b"..."; srv.url("/a.bin")``."""

    def __init__(self) -> None:
        self.served = Served()
        handler = type("Handler", (_Handler,), {"served": self.served})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def closed_port_url(path: str = "/file.bin") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused: the offline case)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
