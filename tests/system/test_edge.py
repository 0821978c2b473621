"""Issue 28 item 4 and issue 27 item 6: replicas answer only nginx, and /metrics adds up a replica's gunicorn
workers. Real gunicorn (2 workers) behind the real nginx of the template, on Redis."""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import string
import subprocess
import sys
import threading

import pytest
import requests

from app.config import Settings
from app.ops.nginx_config import native_layout, render_nginx_conf
from app.ops.stack import Stack, StackOptions, free_ports
from tests.helpers import TINY_JOB, nginx_in_front, service_settings

EDGE_SECRET = "edge-" + "0123456789abcdef"


@pytest.fixture(scope="module")
def edge(launcher, redis_url, tmp_path_factory):
    """2 replicas on TCP (as in compose) with EDGE_SECRET, 2 gunicorn workers each, sharing a metrics folder as the
    native stack's do, behind nginx sending the secret; yields one replica's URL and nginx's."""
    folder = tmp_path_factory.mktemp("edge")
    settings = service_settings(redis_url, folder, edge_secret=EDGE_SECRET, prometheus_multiproc_dir=folder / "m")
    api_urls = [launcher.server(settings, workers=2) for _ in range(2)]
    with nginx_in_front(folder, api_urls, edge_secret=EDGE_SECRET) as url:
        yield api_urls[0], url


@pytest.mark.slow
def test_a_replica_with_an_edge_secret_answers_nginx_and_refuses_whoever_goes_around_it(edge):
    api_url, nginx_url = edge
    assert requests.get(f"{nginx_url}/jobs", timeout=30).status_code == 200
    # nginx replaces a client's own header of that name: no guessing through it either.
    assert requests.get(f"{nginx_url}/jobs", headers={"X-Edge-Secret": "a-guess-0123456789"}, timeout=30).ok
    for headers in ({}, {"X-Edge-Secret": "wrong-but-long-enough"}, {"X-Edge-Secret": EDGE_SECRET[:-1]}):
        direct = requests.get(f"{api_url}/jobs", headers=headers, timeout=30)
        assert direct.status_code == 403 and direct.json()["error"]["code"] == "not_through_the_edge", direct.text
        assert api_url.rsplit(":", 1)[1] not in direct.text
    # A forged X-Forwarded-For straight at the replica queues nothing (it would dodge the per-client cap).
    forged = requests.post(f"{api_url}/train", json=TINY_JOB, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=30)
    assert forged.status_code == 403
    # Probes (a kubelet, a container healthcheck) ask the replica itself.
    assert requests.get(f"{api_url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{api_url}/readyz", timeout=30).status_code == 200


@pytest.mark.slow
def test_the_native_stacks_replicas_listen_only_on_unix_sockets_in_its_private_folder(replica_behind_nginx, tmp_path):
    socket_url, nginx_url = replica_behind_nginx
    path = socket_url.removeprefix("unix:")
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0  # only the stack's user enters the folder
    assert requests.get(f"{nginx_url}/jobs", timeout=30).status_code == 200
    if os.geteuid() == 0:  # another local user cannot connect (as root the test can become one)
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable  # one that nobody may run
        other = subprocess.run([python, "-c", connect], user="nobody", capture_output=True, text=True, cwd="/")
        assert other.returncode != 0 and "PermissionError" in other.stderr, other.stderr

    options = StackOptions(replicas=2, workers=0, port=free_ports(1)[0], state_dir=tmp_path / "state")
    stack = Stack(options, Settings(artifacts_dir=tmp_path))
    stale = stack.state_dir / "metrics" / "counter_4242.db"  # a previous run's counts
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    stack.plan()
    assert not stale.exists()  # and every replica adds up the same folder
    assert {replica.own_env["PROMETHEUS_MULTIPROC_DIR"] for replica in stack.of_role("api")} == {str(stale.parent)}
    for number, replica in enumerate(stack.of_role("api"), start=1):
        socket_path = stack.state_dir / f"api-{number}.sock"
        assert "--socket" in replica.argv and "--port" not in replica.argv and "--host" not in replica.argv
        assert replica.argv[replica.argv.index("--socket") + 1] == str(socket_path)
        assert f"server unix:{socket_path} " in (stack.state_dir / "nginx.conf").read_text()
    assert not re.search(r"server 127\.0\.0\.1:\d+", (stack.state_dir / "nginx.conf").read_text())


def requests_counted(metrics: str, endpoint: str) -> float:
    pattern = rf'boolq_http_requests_total\{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*\}} (\S+)'
    return sum(float(value) for value in re.findall(pattern, metrics))


@pytest.mark.slow
def test_counters_scraped_20_times_through_nginx_with_2_replicas_of_2_workers_never_decrease_and_add_up(edge):
    _, nginx_url = edge
    answered_by = set()

    def ask(session):  # concurrent requests: the workers of both replicas take some (each has its own X-Replica)
        for _ in range(10):
            answered_by.add(session.get(f"{nginx_url}/healthz", timeout=30).headers["X-Replica"])

    for _ in range(5):  # until 3 or more processes answered: then both replicas did (2 workers each)
        threads = [threading.Thread(target=ask, args=(requests.Session(),)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(answered_by) >= 3:
            break
    assert len(answered_by) >= 3, answered_by

    scraped, scrapers = [], set()
    for _ in range(20):
        for _ in range(5):
            assert requests.get(f"{nginx_url}/healthz", timeout=30).status_code == 200
        answer = requests.get(f"{nginx_url}/metrics", timeout=30)
        scrapers.add(answer.headers["X-Replica"])
        scraped.append(requests_counted(answer.text, "/healthz"))
    steps = [after - before for before, after in zip(scraped, scraped[1:], strict=False)]
    assert steps == [5.0] * 19, (steps, scrapers)  # every worker's requests, whichever worker answered the scrape


def series_count(nginx_url: str) -> int:
    text = requests.get(f"{nginx_url}/metrics", timeout=30).text
    return sum(1 for line in text.splitlines() if line.startswith("boolq_http_"))


@pytest.mark.slow
def test_a_thousand_random_method_names_leave_the_series_count_unchanged(edge):
    _, nginx_url = edge
    port = int(nginx_url.rsplit(":", 1)[1])
    rng = random.Random(0)

    def send_random_methods(count: int) -> set[int]:
        statuses = set()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(count):
            method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(4, 12)))
            connection.request(method, "/jobs")
            answer = connection.getresponse()
            answer.read()
            statuses.add(answer.status)
            if answer.will_close:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.close()
        return statuses

    send_random_methods(1)  # the one `other` series
    before = series_count(nginx_url)
    statuses = send_random_methods(1000)
    assert series_count(nginx_url) == before, statuses
    assert 'method="other"' in requests.get(f"{nginx_url}/metrics", timeout=30).text


def test_the_native_rendering_sends_no_edge_secret_and_drops_a_clients_own(tmp_path):
    """Replicas on sockets need no secret; an empty proxy_set_header value is not passed on at all."""
    conf = render_nginx_conf(native_layout("127.0.0.1:1", ["unix:/x/api-1.sock"], tmp_path))
    assert 'proxy_set_header X-Edge-Secret "";' in conf
