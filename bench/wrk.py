"""wrk as a second load generator for the HTTP load bench: the same requests, a C client.

The load bench's own client is Python; wrk (``scripts/fetch-wrk.sh`` puts Debian's build in
``.cache/wrk`` without root, or it is taken from PATH) checks that its figures are not the
client's. One connection, closed loop, ``--latency`` percentiles; the request bodies rotate as
in the Python client. wrk checks only the status (non-2xx responses count as errors), not the
answer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / ".cache" / "wrk"

# Rotates through the bodies given as files after "--" (one per prompt), as the Python client.
_SCRIPT = """
local bodies, path, n = {}, "/", 0
function init(args)
  path = args[1]
  for i = 2, #args do
    local f = assert(io.open(args[i], "rb"))
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
end
function request()
  n = n % #bodies + 1
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, bodies[n])
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def command() -> tuple[list[str], dict[str, str]] | None:
    """The wrk command and its environment, or None when wrk is not installed."""
    local = LOCAL / "usr" / "bin" / "wrk"
    if local.exists():
        libs = [str(p) for p in (LOCAL / "usr" / "lib").glob("*-linux-gnu")]
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libs)}
        return [str(local)], env
    found = shutil.which("wrk")
    return ([found], dict(os.environ)) if found else None


def run(port: int, path: str, bodies: Sequence[bytes], seconds: float) -> dict[str, Any]:
    """One closed-loop connection for ``seconds``: p50/p99 in ms, requests/s, errors."""
    found = command()
    if found is None:
        return {"error": "wrk not installed (scripts/fetch-wrk.sh)"}
    argv, env = found
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_SCRIPT)
        files = []
        for number, body in enumerate(bodies):
            file = Path(tmp) / f"body{number}.json"
            file.write_bytes(body)
            files.append(str(file))
        done = subprocess.run(
            [
                *argv,
                *("-t1", "-c1", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script)),
                *(f"http://127.0.0.1:{port}{path}", "--", path, *files),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=seconds + 30,
            check=False,
        )
    if done.returncode != 0:
        return {"error": f"wrk exited {done.returncode}: {done.stderr.strip()[:200]}"}
    return parse(done.stdout)


def parse(text: str) -> dict[str, Any]:
    """The figures of wrk's ``--latency`` report."""
    percentiles = {
        f"p{match[1]}_ms": float(match[2]) * _UNITS[match[3]]
        for match in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    }
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if rate is None or total is None or len(percentiles) != 2:
        return {"error": f"unreadable wrk report: {text.strip()[:200]}"}
    errors = int(non_2xx[1]) if non_2xx else 0
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    return {
        **percentiles,
        "throughput_rps": float(rate[1]),
        "requests": int(total[1]),
        "errors": errors,
    }
