"""Slow and greedy clients against a real uvicorn Ferry, over raw sockets: the header and body read
timeouts, the header size bound, the concurrency cap, the keep-alive timeout, and the admin token checked
before any body is read.

The only timing assertions are "closed within the timeout plus a generous slack": the machines that run
these are small and busy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from conftest import Registry, Server, metric, start_server, stop_server

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S, BODY_TIMEOUT_S, KEEP_ALIVE_S = 1.0, 3.0, 1.0
MAX_CONCURRENCY, MAX_HEADER_BYTES = 2, 4096
SLACK_S = 15.0
ADMIN = "adm1n-token-for-limits"
ROW = {"model": "linear", "inputs": [[1, 2, 3, 4]]}


@pytest.fixture(scope="module")
def limited(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        registry,
        "linear=models:/linear@champion",
        tmp_path_factory.mktemp("limited"),
        {
            "FERRY_LIMITS__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "FERRY_LIMITS__BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "FERRY_LIMITS__KEEP_ALIVE_S": str(KEEP_ALIVE_S),
            "FERRY_LIMITS__MAX_CONCURRENCY": str(MAX_CONCURRENCY),
            "FERRY_LIMITS__MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
            "FERRY_ADMIN_TOKEN": ADMIN,
        },
    )
    yield server
    stop_server(server)


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=SLACK_S)


def until_closed(conn: socket.socket, within_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took; fails if it
    is still open after ``within_s``."""
    started = time.monotonic()
    received = b""
    while True:
        left = within_s - (time.monotonic() - started)
        assert left > 0, f"still open after {within_s} s; received {received[:300]!r}"
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            continue  # the assertion above fails
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def body_of(reply: bytes) -> dict[str, object]:
    parsed: dict[str, object] = orjson.loads(reply.split(b"\r\n\r\n", 1)[1])
    return parsed


def header(reply: bytes, name: bytes) -> bytes | None:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def partial_body(path: str = "/predict", extra: bytes = b"") -> bytes:
    """A request declaring a 100-byte JSON body and sending 12 bytes of it."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    return head.encode() + extra + b'\r\n{"inputs": ['


def rejected(server: Server, reason: str) -> float:
    return float(metric(httpx.get(f"{server.url}/metrics").text, "ferry_http_rejected_total", reason=reason))


# Headers ------------------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(limited: Server) -> None:
    with connect(limited) as conn:
        reply, _ = until_closed(conn, HEADER_TIMEOUT_S + SLACK_S)
    assert reply == b""  # nothing of a request arrived: nothing to answer


def test_partial_headers_get_408_and_the_connection_is_closed(limited: Server) -> None:
    before = rejected(limited, "header_timeout")
    with connect(limited) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and stalls
        reply, _ = until_closed(conn, HEADER_TIMEOUT_S + SLACK_S)
    assert status_of(reply) == 408, reply
    assert header(reply, b"connection") == b"close"
    error = body_of(reply)["error"]
    assert isinstance(error, dict) and error["code"] == "request_timeout"
    assert "FERRY_LIMITS__HEADER_TIMEOUT_S" in str(error["message"])
    assert rejected(limited, "header_timeout") == before + 1


def test_a_slowloris_dripping_header_bytes_is_closed_too(limited: Server) -> None:
    """uvicorn's keep-alive timer restarts with every byte; the header timeout does not."""
    closed = threading.Event()
    with connect(limited) as conn:
        conn.sendall(b"GET /health/live HTTP/1.1\r\n")

        def drip() -> None:
            try:
                while not closed.is_set():
                    conn.sendall(b"X-Drip: 1\r\n")
                    time.sleep(HEADER_TIMEOUT_S / 5)
            except OSError:
                pass

        dripping = threading.Thread(target=drip, daemon=True)
        dripping.start()
        try:
            reply, _ = until_closed(conn, HEADER_TIMEOUT_S + SLACK_S)
        finally:
            closed.set()
            dripping.join(10)
    assert status_of(reply) == 408, reply


def test_partial_headers_of_a_second_request_on_a_kept_alive_connection(limited: Server) -> None:
    with connect(limited) as conn:
        conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        first = conn.recv(65536)
        assert status_of(first) == 200 and header(first, b"connection") is None  # kept alive
        conn.sendall(b"GET /health/live HTTP/1.1\r\nHo")
        reply, _ = until_closed(conn, HEADER_TIMEOUT_S + SLACK_S)
    assert status_of(reply) == 408, reply


def test_headers_over_the_size_bound_get_431(limited: Server) -> None:
    before = rejected(limited, "header_size")
    with connect(limited) as conn:
        conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES))
        reply, _ = until_closed(conn, SLACK_S)  # at once, not after the header timeout
    assert status_of(reply) == 431, reply
    assert "FERRY_LIMITS__MAX_HEADER_BYTES" in reply.decode()
    assert rejected(limited, "header_size") == before + 1


def test_headers_under_the_bound_are_served(limited: Server) -> None:
    padding = {"X-Padding": "a" * (MAX_HEADER_BYTES // 2)}
    assert httpx.post(f"{limited.url}/predict", json=ROW, headers=padding).status_code == 200


# Bodies -------------------------------------------------------------------------------------------


def test_partial_body_gets_408_while_other_clients_are_served(limited: Server) -> None:
    before = rejected(limited, "body_timeout")
    with connect(limited) as slow:
        slow.sendall(partial_body())  # and stalls
        started = time.monotonic()
        for _ in range(10):  # one slot of the two is the slow client's; the other serves everyone
            r = httpx.post(f"{limited.url}/predict", json=ROW, timeout=SLACK_S)
            assert r.status_code == 200 and r.json()["outputs"] == [[21.0] * 3]
        served_s = time.monotonic() - started
        reply, _ = until_closed(slow, BODY_TIMEOUT_S + SLACK_S)
    assert served_s < BODY_TIMEOUT_S, "the others were not served while the slow body was pending"
    assert status_of(reply) == 408, reply
    assert header(reply, b"connection") == b"close"
    error = body_of(reply)["error"]
    assert isinstance(error, dict) and error["code"] == "request_timeout"
    assert "FERRY_LIMITS__BODY_TIMEOUT_S" in str(error["message"])
    assert rejected(limited, "body_timeout") == before + 1
    assert "Traceback" not in limited.log()


def test_partial_body_on_another_protocol_gets_its_error_shape(limited: Server) -> None:
    with connect(limited) as slow:
        slow.sendall(partial_body("/invocations"))
        reply, _ = until_closed(slow, BODY_TIMEOUT_S + SLACK_S)
    assert status_of(reply) == 408, reply
    assert set(body_of(reply)) == {"error_code", "message"}  # MLflow's shape


def test_a_whole_body_keeps_the_connection_alive(limited: Server) -> None:
    body = orjson.dumps(ROW)
    request = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(limited) as conn:
        for _ in range(3):
            conn.sendall(request)
            time.sleep(0.05)  # headers and body in separate reads
            conn.sendall(body)
            reply = b""
            while b'"outputs"' not in reply:
                chunk = conn.recv(65536)
                assert chunk, f"closed after {reply!r}"
                reply += chunk
            assert status_of(reply) == 200 and header(reply, b"connection") is None
        reply, _ = until_closed(conn, KEEP_ALIVE_S + SLACK_S)  # then idle: closed by keep-alive
    assert reply == b""


def test_admin_token_is_checked_before_the_body_is_read(limited: Server) -> None:
    """A 401 at once, not the body timeout's 408: the server never waited for the body."""
    with connect(limited) as conn:
        conn.sendall(partial_body("/admin/models/x").replace(b"POST", b"PUT", 1))
        reply, _ = until_closed(conn, BODY_TIMEOUT_S + SLACK_S)
    assert status_of(reply) == 401, reply
    assert header(reply, b"connection") == b"close"  # the rest of the body is not read
    with connect(limited) as conn:
        auth = f"Authorization: Bearer {ADMIN}\r\n".encode()
        conn.sendall(partial_body("/admin/models/x", auth).replace(b"POST", b"PUT", 1))
        reply, _ = until_closed(conn, BODY_TIMEOUT_S + SLACK_S)
    assert status_of(reply) == 408, reply  # with the token, the body is read, and must arrive in time


# The concurrency cap ------------------------------------------------------------------------------


def test_one_more_slow_request_than_the_cap_gets_503_with_retry_after(limited: Server) -> None:
    before = rejected(limited, "concurrency")
    conns = [connect(limited) for _ in range(MAX_CONCURRENCY + 1)]
    try:
        for conn in conns:
            conn.sendall(partial_body())
        replies: dict[int, bytes] = {}
        lock = threading.Lock()

        def read(i: int) -> None:
            reply, _ = until_closed(conns[i], BODY_TIMEOUT_S + SLACK_S)
            with lock:
                replies[i] = reply

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(conns))]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + SLACK_S
        while not replies and time.monotonic() < deadline:
            time.sleep(0.01)
        assert replies, "nobody was refused"
        # While the cap is reached: the probes and the scrape still answer.
        assert httpx.get(f"{limited.url}/health/ready").status_code == 200
        assert httpx.get(f"{limited.url}/health/live").status_code == 200
        assert httpx.get(f"{limited.url}/metrics").status_code == 200
        assert httpx.get(f"{limited.url}/ping").status_code == 200
        busy = httpx.post(f"{limited.url}/predict", json=ROW)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        for reader in readers:
            reader.join(BODY_TIMEOUT_S + 2 * SLACK_S)
    finally:
        for conn in conns:
            conn.close()
    statuses = sorted(status_of(r) for r in replies.values())
    assert statuses == [408] * MAX_CONCURRENCY + [503], replies
    refused = next(r for r in replies.values() if status_of(r) == 503)
    assert header(refused, b"retry-after") == b"1"
    assert header(refused, b"connection") == b"close"
    error = body_of(refused)["error"]
    assert isinstance(error, dict) and error["code"] == "overloaded"
    assert "FERRY_LIMITS__MAX_CONCURRENCY" in str(error["message"])
    assert rejected(limited, "concurrency") == before + 2  # the raw one and the httpx one
    scrape = httpx.get(f"{limited.url}/metrics").text
    assert metric(scrape, "http_requests_total", handler="/predict", status="503") >= 2
    # The slots are free again.
    assert httpx.post(f"{limited.url}/predict", json=ROW).status_code == 200


def test_no_refusal_left_a_traceback(limited: Server) -> None:
    log = limited.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
