"""The console's pages and data views without a browser or training: what the server renders and answers.

Jobs are put on queues no worker reads; finished jobs are recorded the way a worker records them (status,
registry, result), so the pages see exactly what they would see in production. The browser tests are in
test_console_browser.py.
"""

from __future__ import annotations

import io
import statistics
import time

from markupsafe import escape as html_escape
from rq.job import JobStatus
from rq.results import Result

from app.api import create_app
from app.engine import run_folder
from app.engine.boolq import read_jsonl
from app.engine.data import load_dataset
from app.params import TrainParams
from app.service import jobs
from app.service.datasets import DatasetStore
from tests.helpers import TINY_JOB, service_settings

JOBS_STORED = 2000
FEW_JOBS = 20
PAGES = (
    "/",
    "/console/new",
    "/console/ask",
    "/console/models",
    "/console/sweeps",
    "/console/datasets",
    "/console/audit",
    "/docs",
)
# A 3-class text-pair set with its own column names: 20 rows per class, so val (a stratified tenth) has each.
TEAM_WORDS = {"billing": "invoice", "accounts": "password", "engineering": "crash"}
TICKETS_CSV = "subject,body,team\n" + "".join(
    f"ticket {i} for {team},{word} problem number {i},{team}\n" for i in range(20) for team, word in TEAM_WORDS.items()
)


def queue_of(client):
    return client.application.extensions["boolq"].queue


def finished_job(queue, settings, params: dict, value: dict, ended_s_ago: int = 0):
    """A job recorded as a worker records a succeeded one: FINISHED, in the finished registry, with a result.

    The registry orders jobs by when their result expires (end + TTL, in seconds); ``ended_s_ago`` sets it.
    """
    job = jobs.enqueue_training(queue, TrainParams(**params), settings)
    with queue.connection.pipeline() as pipe:
        queue.remove(job, pipeline=pipe)
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        queue.finished_job_registry.add(job, 3600 - ended_s_ago, pipeline=pipe)
        Result.create(job, Result.Type.SUCCESSFUL, 3600, return_value=value, pipeline=pipe)
        pipe.execute()
    return job


def run_value(accuracy=0.625, learned=False) -> dict:
    metrics = {
        "accuracy": accuracy,
        "learned": learned,
        "majority_baseline": 0.625,
        "confusion_matrix": [[0, 3], [0, 5]],
        "loss_curve": [0.71, 0.69, 0.68],
        "dev_accuracy_per_epoch": [0.5],
    }
    return {"accuracy": accuracy, "n_eval": 8, "dev_accuracy": 0.5, "predictions": [], "metrics": metrics}


def test_the_jobs_page_lists_jobs_newest_first_with_the_learned_nothing_flag(client, settings):
    queue = queue_of(client)
    done = finished_job(queue, settings, TINY_JOB, run_value())
    queued = client.post("/train", json=TINY_JOB).get_json()["job_id"]
    html = client.get("/").get_data(as_text=True)
    assert html.index(queued[:8]) < html.index(done.id[:8])
    assert "learned nothing" in html and "62.5 %" in html
    rows = client.get("/console/jobs").get_json()["jobs"]
    assert [r["job_id"] for r in rows] == [queued, done.id]
    assert rows[1]["learned_nothing"] is True and rows[1]["progress"] == 1.0


def test_the_status_filter_and_paging(client, settings):
    queue = queue_of(client)
    done = [finished_job(queue, settings, TINY_JOB, run_value(), ended_s_ago=10 - i).id for i in range(3)]
    queued = client.post("/train", json=TINY_JOB).get_json()["job_id"]
    succeeded = client.get("/console/jobs?status=succeeded&per_page=2").get_json()
    assert succeeded["total"] == 3 and succeeded["pages"] == 2
    older = client.get("/console/jobs?status=succeeded&per_page=2&page=2").get_json()
    assert [r["job_id"] for r in succeeded["jobs"] + older["jobs"]] == done[::-1]
    assert [r["job_id"] for r in client.get("/console/jobs?status=queued").get_json()["jobs"]] == [queued]
    assert client.get("/console/jobs?status=").get_json()["total"] == 4  # the filter's "all"
    assert client.get("/?status=sleeping").status_code == 422


def test_the_new_job_form_has_every_train_param_with_its_default_rule_and_help(client, settings):
    html = client.get("/console/new").get_data(as_text=True)
    for name, field in TrainParams.model_fields.items():
        assert f'id="f-{name}"' in html and f'id="error-{name}"' in html, name
        assert html_escape(field.description) in html, name
    assert 'value="minilm"' in html  # the server's DEFAULT_MODEL, not the schema's
    assert "1 ≤ x ≤ 512" in html and "0 &lt; x &lt; 0.5" in html and "x ≥ 1" in html


def test_user_strings_are_escaped(client, settings):
    evil = "<img src=x onerror=alert(1)>"
    job = jobs.enqueue_training(queue_of(client), TrainParams(**(TINY_JOB | {"model": evil})), settings)
    for path in ("/", f"/console/jobs/{job.id}"):
        html = client.get(path).get_data(as_text=True)
        assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_pages_carry_a_content_security_policy(client):
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "default-src 'self'" in response.headers["Content-Security-Policy"], path
    assert client.get("/docs").get_data(as_text=True).count("vendor/swagger-ui/") == 2  # no CDN


def test_live_curves_come_from_the_worker_while_running_and_from_the_metrics_after(client, settings):
    queue = queue_of(client)
    running = jobs.enqueue_training(queue, TrainParams(**TINY_JOB), settings)
    running.meta["curves"] = {"loss": [[1, 0.7], [2, 0.69]], "dev_accuracy": []}
    running.save_meta()
    assert client.get(f"/console/jobs/{running.id}/live").get_json()["curves"]["loss"] == [[1, 0.7], [2, 0.69]]
    done = finished_job(queue, settings, TINY_JOB, run_value())
    live = client.get(f"/console/jobs/{done.id}/live").get_json()
    assert live["job"]["status"] == "succeeded"
    assert live["curves"] == {"loss": [[1, 0.71], [2, 0.69], [3, 0.68]], "dev_accuracy": [[1, 0.5]]}


def test_predictions_carry_the_text_and_a_text_pair_excerpt_and_filter_to_the_wrong_ones(
    client, settings, sample_data_dir
):
    job = finished_job(queue_of(client), settings, TINY_JOB, run_value())
    val = read_jsonl(sample_data_dir / "val.jsonl")[:8]
    run_dir = settings.artifacts_dir / job.id
    run_dir.mkdir(parents=True)
    predictions = [1, 1, 0, 1, 1, 1, 1, 1]
    run_folder.write_predictions(run_dir, val, predictions, [[0.4, 0.6]] * 8)
    wrong = [row.idx for row, p in zip(val, predictions, strict=True) if row.label != p]

    page = client.get(f"/console/jobs/{job.id}/predictions?per_page=5").get_json()
    assert page["total"] == 8 and page["pages"] == 2 and len(page["predictions"]) == 5
    first = page["predictions"][0]
    assert first["text"] == val[0].text and val[0].text_pair.startswith(first["text_pair"].rstrip("…"))
    assert len(first["text_pair"]) <= 240
    only_wrong = client.get(f"/console/jobs/{job.id}/predictions?wrong_only=true&per_page=200").get_json()
    assert [r["idx"] for r in only_wrong["predictions"]] == wrong


def upload_tickets(client) -> dict:
    query = "text_column=subject&text_pair_column=body&label_column=team"
    response = client.post(f"/datasets?{query}", data={"file": (io.BytesIO(TICKETS_CSV.encode()), "tickets.csv")})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_predictions_of_a_job_on_an_uploaded_dataset_carry_its_val_rows_texts(client, settings):
    dataset = upload_tickets(client)
    params = TINY_JOB | {"dataset": dataset["id"]}
    job = finished_job(queue_of(client), settings, params, run_value())
    spec = DatasetStore(settings, queue_of(client).connection).spec_for_training(TrainParams(**params))
    val = load_dataset(spec).val
    run_dir = settings.artifacts_dir / job.id
    run_dir.mkdir(parents=True)
    run_folder.write_predictions(run_dir, val, [0] * len(val), [[0.5, 0.3, 0.2]] * len(val))

    rows = client.get(f"/console/jobs/{job.id}/predictions?per_page=200").get_json()["predictions"]
    assert [(r["idx"], r["text"], r["text_pair"]) for r in rows] == [(e.idx, e.text, e.text_pair) for e in val]
    assert rows[0]["text"].startswith("ticket ") and "problem number" in rows[0]["text_pair"]


def test_the_new_job_and_sweep_forms_pick_the_dataset_and_its_columns_from_dropdowns(client):
    form = client.get("/console/new").get_data(as_text=True)
    assert '<select id="f-dataset" name="dataset" data-picks="dataset"' in form
    assert '<option value="boolq">boolq (built in)</option>' in form
    for name in ("text_column", "text_pair_column", "label_column"):
        assert f'<select id="f-{name}" name="{name}" data-picks="column"' in form, name
    sweeps = client.get("/console/sweeps").get_data(as_text=True)
    assert '<select id="sweep-dataset" name="dataset">' in sweeps
    assert '<select id="sweep-label_column" name="label_column" data-picks="column">' in sweeps
    assert sweeps.count("console/dataset_picker.js") == form.count("console/dataset_picker.js") == 1


def test_the_datasets_page_is_in_the_navigation_with_an_upload_form(client):
    nav = client.get("/").get_data(as_text=True)
    assert '<a href="/console/datasets">Datasets</a>' in nav
    page = client.get("/console/datasets").get_data(as_text=True)
    assert 'aria-current="page">Datasets</a>' in page
    for field in ("upload-file", "upload-text_column", "upload-text_pair_column", "upload-label_column"):
        assert f'id="{field}"' in page and f'id="error-{field.removeprefix("upload-")}"' in page, field
    assert "console/datasets.js" in page


def test_predictions_of_an_unfinished_job_are_409(client):
    job_id = client.post("/train", json=TINY_JOB).get_json()["job_id"]
    assert client.get(f"/console/jobs/{job_id}/predictions").status_code == 409
    assert client.get("/console/jobs/no-such-job").status_code == 404


def test_the_console_loads_no_torch_nor_scikit_learn():
    import subprocess
    import sys

    probe = (
        "import sys, app.api.console, app.service.predictions; "
        "print(sorted({'torch', 'sklearn', 'transformers'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_the_jobs_page_with_2000_stored_jobs_costs_about_what_it_costs_with_20(client, settings):
    """The console's job listing reads one page of the Redis job index, so ``/`` costs about the same with 2,000
    jobs stored as with 20 (medians of 7 requests each, side by side on the same machine). Prints the figures."""
    queue = queue_of(client)

    def median_s(action, repeats=7):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def page_costs() -> tuple[float, float]:
        return median_s(lambda: client.get("/")), median_s(lambda: client.get("/?status=succeeded"))

    for _ in range(FEW_JOBS):
        finished_job(queue, settings, TINY_JOB, run_value())
    few = page_costs()
    for _ in range(JOBS_STORED - FEW_JOBS):
        finished_job(queue, settings, TINY_JOB, run_value())
    many = page_costs()
    print(f"\n/ and /?status=succeeded: {few[0] * 1000:.0f}, {few[1] * 1000:.0f} ms with {FEW_JOBS} jobs; "
          f"{many[0] * 1000:.0f}, {many[1] * 1000:.0f} ms with {JOBS_STORED}")  # fmt: skip
    for small, large in zip(few, many, strict=True):
        assert large < 2 * small + 0.02  # loading every job would cost 100x


def test_where_job_reads_need_the_token_pages_hold_no_job_data_and_the_data_views_ask_for_it(redis_url, tmp_path):
    settings = service_settings(redis_url, tmp_path, api_token="t0ken")
    client = create_app(settings).test_client()
    bearer = {"Authorization": "Bearer t0ken"}
    job_id = client.post("/train", json=TINY_JOB, headers=bearer).get_json()["job_id"]
    page = client.get("/").get_data(as_text=True)
    assert job_id[:8] not in page  # with API_TOKEN set, job reads need it
    assert 'data-rendered="no"' in page  # so the page's script asks for the rows with the key
    assert "train_limit" not in client.get(f"/console/jobs/{job_id}").get_data(as_text=True)
    for path in ("/console/jobs", f"/console/jobs/{job_id}/live"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=bearer).status_code == 200, path
    assert client.get(f"/console/jobs/{job_id}/predictions").status_code == 401
    open_reads = create_app(settings.model_copy(update={"public_reads": True})).test_client()
    page = open_reads.get("/").get_data(as_text=True)
    assert job_id[:8] in page and 'data-rendered="yes"' in page  # PUBLIC_READS=1: pages carry the data


def test_the_job_page_links_the_mlflow_run_only_when_tracking_goes_to_a_server():
    from app.api.console import mlflow_run_url

    def view(uri):
        mlflow = {"tracking_uri": uri, "experiment_id": "3", "mlflow_run_id": "abc"}
        return {"result": {"tracking": {"mlflow": mlflow}}}

    assert mlflow_run_url(view("http://mlflow:5000/")) == "http://mlflow:5000/#/experiments/3/runs/abc"
    assert mlflow_run_url(view("sqlite:////srv/runs/mlflow/mlflow.db")) is None
    assert mlflow_run_url({"result": None}) is None
