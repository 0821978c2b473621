"""nginx as the shield, for real: the native rendering of the template in front of a real gunicorn replica.

Thousands of idle connections leave room for probes, slow clients are cut off, request rates per address are
limited with 429 JSON, and any over-limit body is a 413 JSON, chunked or not.
"""

from __future__ import annotations

import http.client
import socket
import time

import pytest
import requests

from tests.rate_limits import TRAIN_LIMIT, assert_held_to, paced_posts


def test_2600_idle_connections_leave_room_for_health_probes(behind_nginx):
    port = int(behind_nginx.rsplit(":", 1)[1])
    idle = []
    try:
        for _ in range(2600):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            idle.append(sock)
        for _ in range(8):
            started = time.monotonic()
            assert requests.get(f"{behind_nginx}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - started < 1.0
    finally:
        for sock in idle:
            sock.close()


def test_a_client_that_never_finishes_its_headers_is_cut_off_after_10_s(behind_nginx):
    port = int(behind_nginx.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        try:
            closed = sock.recv(1024) is not None
        except ConnectionResetError:
            closed = True
        assert closed and 8 < time.monotonic() - started < 15


def test_train_requests_from_one_address_are_held_to_2_a_second_with_bursts_of_20_and_refused_with_429_json(
    behind_nginx,
):
    """Measured, not raced: requests at 8 a second, each accepted or refused as nginx's limit allows at the times
    the client observed (tests/rate_limits.py), so a slow client cannot fail it, nor pass a wrong limit."""
    answers = paced_posts(behind_nginx, ["/train"], b"{bad", 8, TRAIN_LIMIT, at_least_s=8, at_most_s=40)
    assert_held_to(TRAIN_LIMIT, answers)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_any_over_limit_body_is_413_json(behind_nginx, chunked):
    body = b"x" * (3 * 1024 * 1024)
    data = (body[i : i + 65536] for i in range(0, len(body), 65536)) if chunked else body
    try:
        response = requests.post(
            f"{behind_nginx}/predict", data=data, headers={"Content-Type": "application/json"}, timeout=20
        )
    except requests.ConnectionError:
        pytest.fail("nginx reset the connection instead of answering 413")
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("status", "content_type", "size"),
    [(413, "application/json", 1_400_000), (415, "text/plain", 900_000)],
    ids=["413-over-max-content-length", "415-not-json"],
)
def test_a_body_the_replica_refuses_unread_leaves_its_connection_usable(
    replica_behind_nginx, status, content_type, size
):
    """The replica answers without reading the body, then drains it: closing on unread bytes resets the connection,
    and nginx, still sending the body, turned the 4xx into a 502 (schemathesis through nginx in CI)."""
    from app.ops.stack import UnixHTTPConnection

    connection = UnixHTTPConnection(replica_behind_nginx[0].removeprefix("unix:"), timeout=20)
    connection.request("POST", "/predict", body=b"0" * size, headers={"Content-Type": content_type})
    refused = connection.getresponse()
    assert refused.status == status and b'"error"' in refused.read()
    try:
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
    except (ConnectionError, http.client.HTTPException) as exc:
        pytest.fail(f"the replica closed the connection on the unread body: {exc!r}")
    finally:
        connection.close()


def test_a_dataset_uploads_through_nginx_above_the_json_limit_and_a_larger_one_is_413_json(behind_nginx):
    from tests.helpers import REPO_ROOT

    path = REPO_ROOT / "app" / "sample_data" / "relations" / "relations.csv"
    query = {"text_column": "query", "text_pair_column": "doc", "label_column": "relation"}
    padded = path.read_bytes() + b"".join(b'"pad %d","pad","unrelated"\n' % i for i in range(40_000))  # > 2 MB
    uploaded = requests.post(
        f"{behind_nginx}/datasets", params=query, files={"file": ("relations.csv", padded)}, timeout=120
    )
    assert uploaded.status_code == 201 and uploaded.json()["rows"]["train"] > 36_000, uploaded.text[:500]
    with socket.create_connection(("127.0.0.1", int(behind_nginx.rsplit(":", 1)[1])), timeout=20) as sock:
        sock.sendall(  # announces 200 MB (MAX_DATASET_MB is 100): nginx answers before reading a byte
            b"POST /datasets HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nContent-Length: 200000000\r\n\r\n"
        )
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and '"payload_too_large"' in head, head
