"""The load bench's reading of wrk's report (text as wrk 4.1.0 prints it)."""

from __future__ import annotations

from bench import wrk

# Printed by wrk 4.1.0 (Debian's build) against `kvcache serve`: -t1 -c1 -d3s --latency.
REPORT = """Running 3s test @ http://127.0.0.1:45787/score_tokens
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   358.35us  163.51us   3.78ms   92.12%
    Req/Sec     2.86k   210.32     3.23k    63.33%
  Latency Distribution
     50%  322.00us
     75%  369.00us
     90%  470.00us
     99%    0.87ms
  8536 requests in 3.00s, 1.62MB read
Requests/sec:   2845.10
Transfer/sec:    552.90KB
"""


def test_report_figures_in_milliseconds() -> None:
    assert wrk.parse(REPORT) == {
        "p50_ms": 0.322,
        "p99_ms": 0.87,
        "throughput_rps": 2845.10,
        "requests": 8536,
        "errors": 0,
    }


def test_errors_are_non_2xx_responses_and_socket_errors() -> None:
    failing = REPORT.replace(
        "Requests/sec:",
        "  Socket errors: connect 0, read 2, write 0, timeout 1\n"
        "  Non-2xx or 3xx responses: 5\nRequests/sec:",
    ).replace("     99%    0.87ms", "     99%    1.20s")
    figures = wrk.parse(failing)
    assert figures["errors"] == 8
    assert figures["p99_ms"] == 1200.0


def test_an_unreadable_report_is_an_error_not_figures() -> None:
    assert "error" in wrk.parse("wrk: connection refused")
