"""A team's keys: each key's role decides what it may do, a non-admin sees and cancels only what it created, a
revoked key is refused at once, and the audit stream records who did what. The real app and a real Redis; jobs go
to queues no worker listens on, so they stay queued."""

from __future__ import annotations

import io

import pytest
from redis import Redis

from app.api import create_app
from app.service.keys import KeyStore
from tests.helpers import TINY_JOB, service_settings, write_relation_pairs

SWEEP = {"base": TINY_JOB, "space": {"lr": [1e-4, 2e-4]}, "trials": 2, "parallel": 1}
MAPPING = {"text_column": "query", "text_pair_column": "doc", "label_column": "relation"}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def error_of(response) -> dict:
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}, body
    return body["error"]


@pytest.fixture
def team(redis_url, tmp_path):
    """A service with no API_TOKEN and one key of each role (plus a second trainer): (client, store, keys)."""
    settings = service_settings(redis_url, tmp_path, max_jobs_per_client=100, max_queued_jobs=100)
    store = KeyStore(settings, Redis.from_url(redis_url))
    keys = {name: store.create(name, role) for name, role in [("boss", "admin"), ("alice", "trainer")]}
    keys |= {"bob": store.create("bob", "trainer"), "rita": store.create("rita", "reader")}
    return create_app(settings).test_client(), store, keys


def upload(client, path, key):
    data = {"file": (io.BytesIO(path.read_bytes()), path.name)}
    return client.post(
        "/datasets", query_string=MAPPING, data=data, content_type="multipart/form-data", headers=bearer(key)
    )


def test_each_role_may_do_what_its_row_says_and_is_403_elsewhere(team, tmp_path):
    client, _, keys = team
    csv = write_relation_pairs(tmp_path / "relations.csv", 60)
    # A reader reads and predicts (404: no model yet, past the key check), and nothing else.
    assert client.get("/jobs", headers=bearer(keys["rita"])).status_code == 200
    assert client.post("/predict", json={"text": "a"}, headers=bearer(keys["rita"])).status_code == 404
    for method, path, body in [("post", "/train", TINY_JOB), ("post", "/sweeps", SWEEP), ("get", "/audit", None)]:
        response = client.open(path, method=method.upper(), json=body, headers=bearer(keys["rita"]))
        assert response.status_code == 403 and error_of(response)["code"] == "forbidden", path
        assert "rita" in error_of(response)["message"] and "reader" in error_of(response)["message"]
    assert upload(client, csv, keys["rita"]).status_code == 403
    # A trainer trains, sweeps and uploads; promoting, deleting and the audit are an admin's.
    assert client.post("/train", json=TINY_JOB, headers=bearer(keys["alice"])).status_code == 202
    assert client.post("/sweeps", json=SWEEP, headers=bearer(keys["alice"])).status_code == 202
    dataset_id = upload(client, csv, keys["alice"]).get_json()["id"]
    for method, path, body in [
        ("post", "/models/champion", {"version": 1}),
        ("delete", f"/datasets/{dataset_id}", None),
        ("get", "/audit", None),
    ]:
        assert client.open(path, method=method.upper(), json=body, headers=bearer(keys["alice"])).status_code == 403
    assert client.delete(f"/datasets/{dataset_id}", headers=bearer(keys["boss"])).status_code == 204
    assert client.get("/audit", headers=bearer(keys["boss"])).status_code == 200


def test_a_trainer_sees_and_cancels_only_its_own_jobs_and_an_admin_all(team):
    client, _, keys = team
    mine = client.post("/train", json=TINY_JOB, headers=bearer(keys["alice"])).get_json()["job_id"]
    theirs = client.post("/train", json=TINY_JOB, headers=bearer(keys["bob"])).get_json()["job_id"]
    listed = client.get("/jobs", headers=bearer(keys["alice"])).get_json()
    assert [j["job_id"] for j in listed["jobs"]] == [mine] and listed["total"] == 1
    assert listed["jobs"][0]["owner"] == "alice"
    for path in (f"/jobs/{theirs}", f"/jobs/{theirs}/predictions"):
        assert client.get(path, headers=bearer(keys["alice"])).status_code == 404, path
    refused = client.post(f"/jobs/{theirs}/cancel", headers=bearer(keys["alice"]))
    assert refused.status_code == 404 and error_of(refused)["fields"] == {"job_id": "unknown job id"}
    assert client.get(f"/jobs/{theirs}", headers=bearer(keys["bob"])).get_json()["status"] == "queued"
    console = client.get("/console/jobs?status=queued", headers=bearer(keys["alice"])).get_json()
    assert [j["job_id"] for j in console["jobs"]] == [mine]  # the console's status filter: her own too
    assert client.post(f"/jobs/{mine}/cancel", headers=bearer(keys["alice"])).status_code == 200
    everyone = client.get("/jobs", headers=bearer(keys["boss"])).get_json()
    assert {j["job_id"] for j in everyone["jobs"]} == {mine, theirs}
    assert client.post(f"/jobs/{theirs}/cancel", headers=bearer(keys["boss"])).status_code == 200


def test_sweeps_and_their_trials_and_datasets_belong_to_the_key_that_made_them(team, tmp_path):
    client, _, keys = team
    sweep_id = client.post("/sweeps", json=SWEEP, headers=bearer(keys["alice"])).get_json()["sweep_id"]
    (trial,) = client.get("/jobs", headers=bearer(keys["alice"])).get_json()["jobs"]
    assert trial["owner"] == "alice"  # the sweep's first trial is the sweep owner's job
    assert client.get("/sweeps", headers=bearer(keys["bob"])).get_json()["sweeps"] == []
    assert client.get(f"/sweeps/{sweep_id}", headers=bearer(keys["bob"])).status_code == 404
    assert client.post(f"/sweeps/{sweep_id}/cancel", headers=bearer(keys["bob"])).status_code == 404
    assert client.get("/jobs", headers=bearer(keys["bob"])).get_json()["total"] == 0
    (listed,) = client.get("/sweeps", headers=bearer(keys["boss"])).get_json()["sweeps"]
    assert listed["sweep_id"] == sweep_id and listed["owner"] == "alice"
    record = upload(client, write_relation_pairs(tmp_path / "r.csv", 60), keys["alice"]).get_json()
    assert record["owner"] == "alice"
    assert client.get("/datasets", headers=bearer(keys["bob"])).get_json()["datasets"] == []
    assert [d["id"] for d in client.get("/datasets", headers=bearer(keys["boss"])).get_json()["datasets"]] == [
        record["id"]
    ]


def test_a_revoked_or_unknown_key_is_401_at_once(team):
    client, store, keys = team
    assert client.get("/jobs", headers=bearer(keys["bob"])).status_code == 200
    store.revoke("bob")
    for headers in (bearer(keys["bob"]), bearer("bq_never-issued"), {}):
        response = client.get("/jobs", headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", headers
    assert client.get("/jobs", headers=bearer(keys["alice"])).status_code == 200


def test_the_first_key_closes_an_open_service_and_revoking_the_last_opens_it(redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path)
    client, store = create_app(settings).test_client(), KeyStore(settings, Redis.from_url(redis_url))
    opened = client.post("/train", json=TINY_JOB)  # open, as without API_TOKEN
    assert opened.status_code == 202
    key = store.create("anonymous", "trainer")
    assert client.get(f"/jobs/{opened.get_json()['job_id']}", headers=bearer(key)).status_code == 404  # not its own
    store.revoke("anonymous")
    key = store.create("ops", "admin")
    assert client.post("/train", json=TINY_JOB).status_code == 401
    assert client.get("/jobs").status_code == 401
    assert client.post("/train", json=TINY_JOB, headers=bearer(key)).status_code == 202
    # With keys, the Host/Origin rule of an open service gives way to the key (as with API_TOKEN).
    foreign = {"Origin": "http://evil.example"} | bearer(key)
    assert client.post("/train", json=TINY_JOB, headers=foreign, base_url="http://evil.example").status_code == 202
    store.revoke("ops")
    assert client.post("/train", json=TINY_JOB).status_code == 202


def test_api_token_is_an_admin_key_beside_the_named_ones(redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path, api_token="s3cret")
    store = KeyStore(settings, Redis.from_url(redis_url))
    alice = store.create("alice", "trainer")
    client = create_app(settings).test_client()
    job_id = client.post("/train", json=TINY_JOB, headers=bearer(alice)).get_json()["job_id"]
    assert client.get(f"/jobs/{job_id}", headers=bearer("s3cret")).get_json()["owner"] == "alice"
    assert client.post(f"/jobs/{job_id}/cancel", headers=bearer("s3cret")).status_code == 200
    assert client.get("/audit", headers=bearer("s3cret")).status_code == 200


def test_the_audit_stream_says_who_trained_cancelled_and_deleted_newest_first(team, tmp_path):
    client, _, keys = team
    job_id = client.post("/train", json=TINY_JOB, headers=bearer(keys["alice"])).get_json()["job_id"]
    client.post(f"/jobs/{job_id}/cancel", headers=bearer(keys["boss"]))
    dataset_id = upload(client, write_relation_pairs(tmp_path / "r.csv", 60), keys["alice"]).get_json()["id"]
    client.delete(f"/datasets/{dataset_id}", headers=bearer(keys["boss"]))
    entries = client.get("/audit?count=3", headers=bearer(keys["boss"])).get_json()["entries"]
    assert [(e["actor"], e["role"], e["action"], e["target"]) for e in entries] == [
        ("boss", "admin", "delete_dataset", dataset_id),
        ("boss", "admin", "cancel", job_id),
        ("alice", "trainer", "train", job_id),
    ]
    assert all(e["time"].startswith("20") for e in entries)
    assert client.get("/audit?count=0", headers=bearer(keys["boss"])).status_code == 422


def test_the_audit_stream_stays_bounded(redis_url, tmp_path):
    from app.service.audit import AuditLog

    settings = service_settings(redis_url, tmp_path, audit_max_entries=100)
    log = AuditLog(settings, Redis.from_url(redis_url))
    for n in range(1_000):
        log.record("alice", "trainer", "train", f"job-{n}")
    # MAXLEN ~ trims whole stream nodes (100 entries each): about the cap, never the thousand.
    assert Redis.from_url(redis_url).xlen(log.key) <= 200
    assert log.latest(1)[0].target == "job-999"


def test_keys_are_stored_hashed_and_a_planted_record_is_no_key(team, redis_url):
    client, store, keys = team
    connection = Redis.from_url(redis_url)
    stored = b"".join(connection.dump(k) or b"" for k in connection.keys(store.names.rsplit(":", 1)[0] + ":*"))
    assert all(key.encode() not in stored for key in keys.values())
    # Whoever writes to Redis could plant a record; one that does not read as a key is refused, not a 500.
    from app.service.keys import digest

    connection.set(store.record_key(digest("bq_planted")), '{"name": "x", "role": "root", "created_at": 0}')
    assert client.get("/jobs", headers=bearer("bq_planted")).status_code == 401
