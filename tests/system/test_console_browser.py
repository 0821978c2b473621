"""The web console in a real browser (Playwright + Debian's chromium) against the real stack through nginx:
`python -m app stack` with Redis, one gunicorn replica and one RQ worker.

Fills the new-job form with a tiny job and follows it to `succeeded` with a loss curve; filters its
predictions to the wrong ones; asks the trained model; cancels a running job; shows the server's field
error; opens /docs; promotes the job's version; launches a two-trial sweep and follows its leaderboard and
plot to the end; shows a rejected sweep's field errors; uploads a CSV on the Datasets page (its histogram, and a
wrong column's error), trains on it from the form's dropdowns and shows its 3×3 confusion matrix; shows a page
whose API answers 404; checks every page at 390 px; and sends the API token kept in sessionStorage.
A screenshot of each page goes to test-artifacts/console/. The tests run in file order and share the stack.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from urllib.parse import urlparse

import pytest
import requests
from playwright.sync_api import expect  # a missing Playwright fails these tests, never skips them

from app.ops.stack import free_ports
from tests.helpers import LONG_JOB, REPO_ROOT, running_stack, stack_redis_url

SCREENSHOTS = REPO_ROOT / "test-artifacts" / "console"
JOB_TIMEOUT_MS = 300_000
# Tiny, and with enough val rows that an untrained model gets some wrong.
FORM_JOB = {"train_limit": "16", "eval_limit": "16", "max_length": "32", "epochs": "1", "batch_size": "8"}
# Two quick trials (a grid over lr), both queued at once on the stack's one worker.
FORM_SWEEP = {
    "base": {"model": "minilm", "train_limit": 24, "eval_limit": 8, "max_length": 32, "epochs": 1, "batch_size": 8},
    "space": {"lr": [1e-4, 3e-4]},
    "trials": 2,
    "parallel": 2,
    "sampler": "grid",
    "pruner": "none",
}
SWEEP_TIMEOUT_MS = 180_000
UPLOAD_TIMEOUT_MS = 60_000
QUESTION = ("is the sky blue", "The sky appears blue because of Rayleigh scattering of sunlight.")
# A 3-class single-text set with its own column names: 20 rows per class (val, a stratified tenth, has 2 each).
TEAM_WORDS = {"billing": "invoice", "accounts": "password", "engineering": "crash"}
TICKETS_CSV = "id,message,team\n" + "".join(
    f"{i}-{team},{word} problem number {i},{team}\n" for i in range(20) for team, word in TEAM_WORDS.items()
)
TICKETS_FILE = {"name": "tickets.csv", "mimeType": "text/csv", "buffer": TICKETS_CSV.encode()}


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory):
    """The native stack as a user starts it (nginx in front); yields stack.json's state. Stopped at the end."""
    folder = tmp_path_factory.mktemp("console-stack")
    (port,) = free_ports(1)
    env = os.environ | {
        "TRACKER": "mlflow",  # the registry behind /models (a local SQLite store under ARTIFACTS_DIR)
        "ARTIFACTS_DIR": str(folder / "artifacts"),
        "HF_HUB_OFFLINE": "1",
        "NUM_THREADS": "1",
        "DEFAULT_MODEL": "minilm",
    }
    argv = [sys.executable, "-m", "app", "stack", "--replicas", "1", "--workers", "1", "--port", str(port)]
    with running_stack(argv, folder, env) as (_, state):
        yield state


@pytest.fixture(scope="module")
def shared():
    """What one test leaves for the next (the tiny job's id)."""
    return {}


@pytest.fixture
def page(browser, console_stack):
    """A fresh tab at 1280×800 that fails the test on any JavaScript error or blocked resource."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=console_stack["url"])
    tab = context.new_page()
    problems = []
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    tab.set_default_timeout(30_000)
    yield tab
    context.close()
    # HTTP errors the tests provoke (a 422, a 401, the 404 of a page whose API is missing) are answers,
    # not problems; script errors and anything the Content-Security-Policy refused are.
    assert [p for p in problems if "Failed to load resource" not in p] == []


def screenshot(page, name: str, full_page: bool = True) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def test_a_bad_value_shows_the_servers_message_next_to_its_field(page):
    page.goto("/console/new")
    field = page.get_by_label("Batch Size")
    field.fill("0")
    field.press("Enter")  # the keyboard submits the form
    error = page.locator("#error-batch_size")
    error.wait_for(state="visible")
    assert "greater than or equal to 1" in error.inner_text()
    assert field.get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "f-batch_size"
    screenshot(page, "new-job-field-error")


def test_a_tiny_job_from_the_form_succeeds_with_a_loss_curve(page, shared):
    page.goto("/console/new")
    assert page.get_by_label("Model").input_value() == "minilm"  # the server's DEFAULT_MODEL
    for name, value in FORM_JOB.items():
        page.locator(f"#f-{name}").fill(value)
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url("**/console/jobs/*")
    shared["job_id"] = page.locator("#job").get_attribute("data-job-id")
    expect(page.locator("#job-status")).to_have_text(re.compile("succeeded|failed|cancelled"), timeout=JOB_TIMEOUT_MS)
    assert page.locator("#job-status").inner_text() == "succeeded"
    assert int(page.locator("#loss-chart").get_attribute("data-points")) >= 2
    assert int(page.locator("#dev-chart").get_attribute("data-points")) == 1
    assert page.locator("#metrics-body").inner_text().startswith("val accuracy")
    assert page.locator("#confusion-body td").count() == 4
    screenshot(page, "job")


def test_wrong_only_leaves_exactly_the_wrong_predictions(page, console_stack, shared):
    job_id = shared["job_id"]
    rows = requests.get(f"{console_stack['url']}/jobs/{job_id}/predictions", timeout=30).json()["predictions"]
    wrong = sum(row["label"] != row["prediction"] for row in rows)
    page.goto(f"/console/jobs/{job_id}")
    table = page.locator("#predictions-body tr")
    expect(table).to_have_count(len(rows))
    assert page.locator("#predictions-body td").nth(1).inner_text() != "–"  # the question's text
    page.get_by_label("Wrong only").check()
    expect(page.locator("#predictions-count")).to_have_text(re.compile(f"^{wrong} wrong"))
    assert table.count() == wrong
    assert all(v == "no" for v in table.evaluate_all("rows => rows.map(r => r.dataset.correct)"))


def test_ask_answers_with_the_trained_model(page, shared):
    page.goto("/console/ask")
    page.get_by_label("Text", exact=True).fill(QUESTION[0])
    page.get_by_label("Text pair").fill(QUESTION[1])
    expect(page.locator(f"#ask-model option[value='{shared['job_id']}']")).to_have_count(1, timeout=30_000)
    page.get_by_label("Model").select_option(shared["job_id"])
    page.get_by_role("button", name="Ask").click()
    page.locator("#answer").wait_for(state="visible")
    assert page.locator("#answer-label").inner_text() in ("yes", "no")
    assert page.locator("#answer-score").inner_text().startswith("score 0.")
    assert page.locator("#answer-scores-body th").all_inner_texts() in (["yes", "no"], ["no", "yes"])  # top_k: all
    assert page.locator("#answer-model").inner_text() == shared["job_id"]
    screenshot(page, "ask")


def test_the_jobs_page_shows_a_new_job_without_a_reload(page, console_stack, shared):
    page.goto("/")
    expect(page.locator("#jobs-body tr")).to_have_count(1)
    shared["long_job_id"] = requests.post(f"{console_stack['url']}/train", json=LONG_JOB, timeout=30).json()["job_id"]
    expect(page.locator(f"#jobs-body tr[data-job-id='{shared['long_job_id']}']")).to_have_count(1, timeout=15_000)
    assert page.locator("#jobs-body tr").first.get_attribute("data-job-id") == shared["long_job_id"]


def test_a_running_job_is_cancelled_from_its_page(page, shared):
    job_id = shared["long_job_id"]
    page.goto(f"/console/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("running", timeout=120_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=60_000)
    assert page.get_by_role("button", name="Cancel job").is_hidden()


def test_the_jobs_page_lists_newest_first_and_filters_by_status(page, shared):
    page.goto("/")
    rows = page.locator("#jobs-body tr")
    assert rows.count() == 2
    assert rows.first.get_attribute("data-status") == "cancelled"  # the newest
    page.get_by_label("Status").select_option("succeeded")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**/?status=succeeded*")
    assert [r.get_attribute("data-job-id") for r in page.locator("#jobs-body tr").all()] == [shared["job_id"]]
    page.get_by_label("Status").select_option("")
    page.get_by_label("Status").press("Tab")  # the keyboard applies it too: Tab to the button, Enter
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Filter"
    page.keyboard.press("Enter")
    page.wait_for_url("**/?status=&*")
    screenshot(page, "jobs")


def test_api_docs_show_swagger_ui_over_the_services_openapi(page):
    page.goto("/docs")
    page.locator(".opblock-summary-path", has_text="/train").first.wait_for()
    assert page.locator(".opblock").count() >= 8
    screenshot(page, "docs", full_page=False)


def test_a_version_is_promoted_to_champion_from_the_models_page(page, console_stack, shared):
    page.goto("/console/models")
    row = page.locator("#models-body tr", has=page.locator(f"a[href$='{shared['job_id']}']"))
    row.get_by_role("button", name=re.compile("^Promote")).click()
    expect(row).to_contain_text("champion")
    champion = requests.get(f"{console_stack['url']}/models", timeout=30).json()["champion"]
    assert champion["job_id"] == shared["job_id"]
    screenshot(page, "models")


def test_a_tiny_sweep_launched_from_the_sweeps_page_fills_its_leaderboard_and_plot_live(page, console_stack):
    """Two trials of a grid over lr run as jobs on the stack's worker; the page follows them without a reload."""
    page.goto("/console/sweeps")
    expect(page.locator("#sweeps-body")).to_contain_text("No sweeps yet.")
    page.get_by_label("Sweep (JSON body of POST /sweeps)").fill(json.dumps(FORM_SWEEP, indent=2))
    page.get_by_role("button", name="Launch sweep").click()
    status, rows = page.locator("#sweep-status"), page.locator("#leaderboard-body tr")
    expect(status).to_have_text("running")
    expect(rows).to_have_count(2)  # both trials started (parallel 2): queued or running, no dev accuracy yet
    sweep_id = page.locator("#sweeps-body a").first.get_attribute("href").lstrip("#")
    expect(status).to_have_text(re.compile("finished|cancelled"), timeout=SWEEP_TIMEOUT_MS)
    assert status.inner_text() == "finished"
    assert page.get_by_role("button", name="Cancel sweep").is_hidden()
    best = requests.get(f"{console_stack['url']}/sweeps/{sweep_id}", timeout=30).json()["best"]
    assert best is not None
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.status)") == ["succeeded", "succeeded"]
    highlighted = page.locator("#leaderboard-body tr.best")
    expect(highlighted).to_have_count(1)
    assert highlighted.get_attribute("data-trial") == str(best["trial"]) and rows.first.get_attribute("class") == "best"
    assert best["job_id"][:8] in highlighted.inner_text()
    assert page.locator("#sweep-chart").get_attribute("data-points") == "2"
    assert page.locator("#sweep-chart canvas").count() == 1
    expect(page.locator("#sweep-caption")).to_contain_text("against lr (log axis)")
    expect(page.locator("#sweeps-body tr").first).to_contain_text("finished", timeout=10_000)  # the list follows
    screenshot(page, "sweeps")


def test_a_rejected_sweep_shows_the_servers_field_errors(page):
    page.goto("/console/sweeps")
    page.get_by_label("Sweep (JSON body of POST /sweeps)").fill('{"space": {"lr": [1e-4]}, "trials": 0}')
    page.get_by_role("button", name="Launch sweep").click()
    expect(page.locator("#sweep-error")).to_contain_text("trials: Input should be greater than or equal to 1")


def test_a_csv_uploaded_on_the_datasets_page_shows_its_label_histogram_and_preview(page, shared):
    page.goto("/console/datasets")
    expect(page.locator("#datasets-body")).to_contain_text("No datasets yet")
    page.get_by_label("File", exact=True).set_input_files(TICKETS_FILE)
    page.get_by_label("Text column").fill("message")
    page.get_by_label("Label column").fill("team")
    page.get_by_role("button", name="Upload").click()
    # The first upload a replica checks imports Hugging Face datasets and pyarrow: seconds on a busy machine.
    expect(page.locator("#upload-status")).to_contain_text("Stored as ", timeout=UPLOAD_TIMEOUT_MS)
    histogram = page.locator("#histogram-body tr")
    expect(histogram).to_have_count(3)
    assert histogram.evaluate_all("rows => rows.map(r => r.dataset.label)") == ["accounts", "billing", "engineering"]
    for label in TEAM_WORDS:  # 18 train and 2 val rows of each team: the split is stratified
        row = page.locator(f"#histogram-body tr[data-label='{label}']")
        assert row.locator("td[data-split='train']").inner_text().startswith("18 (33.3 %)")
        assert row.locator("td[data-split='val']").inner_text().startswith("2 (33.3 %)")
    expect(page.locator("#dataset-summary")).to_contain_text("54 / 6")
    expect(page.locator("#dataset-summary")).to_contain_text("33.3 %")  # the majority baseline
    assert page.locator("#preview-head th").all_inner_texts() == ["id", "message", "team"]
    first_row = page.locator("#preview-body tr").first.locator("td").all_inner_texts()
    assert first_row == ["0-billing", "invoice problem number 0", "billing"]
    shared["dataset_id"] = page.locator("#dataset-summary td").first.inner_text()
    expect(page.locator(f"#datasets-body tr[data-dataset-id='{shared['dataset_id']}']")).to_have_count(1)
    screenshot(page, "datasets")


def test_an_upload_naming_a_missing_column_shows_the_servers_message_next_to_the_form(page):
    page.goto("/console/datasets")
    page.get_by_label("File", exact=True).set_input_files(TICKETS_FILE)
    page.get_by_label("Text column").fill("mesage")
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-error")).to_contain_text("no column 'mesage'", timeout=UPLOAD_TIMEOUT_MS)
    assert "id, message, team" in page.locator("#error-file").inner_text()  # the columns there are
    assert page.locator("#dataset-detail").is_hidden()


def test_a_job_on_the_uploaded_dataset_shows_a_confusion_matrix_with_its_label_names(page, shared):
    dataset_id = shared["dataset_id"]
    page.goto(f"/console/datasets#{dataset_id}")
    page.get_by_role("link", name="Train a model on it").click()
    page.wait_for_url(f"**/console/new?dataset={dataset_id}")
    expect(page.locator("#f-dataset")).to_have_value(dataset_id)
    expect(page.locator("#f-label_column option")).to_have_text(["the dataset's own: team", "id", "message", "team"])
    page.locator("#f-text_column").select_option("message")
    for name, value in FORM_JOB.items():
        page.locator(f"#f-{name}").fill(value)
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url("**/console/jobs/*")
    expect(page.locator("#job-status")).to_have_text(re.compile("succeeded|failed|cancelled"), timeout=JOB_TIMEOUT_MS)
    assert page.locator("#job-status").inner_text() == "succeeded"
    names = ["accounts", "billing", "engineering"]
    assert page.locator("#confusion-head th").all_inner_texts() == [f"predicted {n}" for n in names]
    assert page.locator("#confusion-body th").all_inner_texts() == [f"label {n}" for n in names]
    cells = [int(n) for n in page.locator("#confusion-body td").all_inner_texts()]
    assert len(cells) == 9 and sum(cells) == 6  # every val row, once
    assert page.locator("#per-class-body th").all_inner_texts() == names
    expect(page.locator("#predictions-body tr")).to_have_count(6)
    first = page.locator("#predictions-body tr").first.locator("td")
    assert "problem number" in first.nth(1).inner_text() and first.nth(3).inner_text() in names
    screenshot(page, "job-3-classes")


@pytest.mark.parametrize("api, path", [("/models", "/console/models"), ("/sweeps", "/console/sweeps")])
def test_a_page_says_when_the_server_lacks_its_api(page, api, path):
    """As where the console is served beside an API without it: the page's calls go to a path that 404s."""
    page.route(
        lambda url: urlparse(url).path.startswith(api),
        lambda route: route.continue_(url=route.request.url.replace(api, "/no-such-api", 1)),
    )
    page.goto(path)
    notice = page.locator(".notice:not([hidden])")  # the models page also holds a hidden alias-warning notice
    expect(notice).to_be_visible()
    assert "not available on this server" in notice.inner_text()


@pytest.mark.parametrize(
    "path", ["/", "/console/new", "job", "/console/ask", "/console/models", "/console/sweeps", "/console/datasets"]
)
def test_every_page_fits_a_390_px_screen(browser, console_stack, path, shared):
    context = browser.new_context(viewport={"width": 390, "height": 844}, base_url=console_stack["url"])
    tab = context.new_page()
    tab.goto(f"/console/jobs/{shared['job_id']}" if path == "job" else path)
    tab.wait_for_load_state("networkidle")
    assert tab.evaluate("document.documentElement.scrollWidth") <= 390  # wide tables scroll inside their box
    screenshot(tab, "narrow-" + (path.strip("/").replace("/", "-") or "jobs"))
    context.close()


def test_the_token_is_asked_once_kept_in_session_storage_and_sent_as_a_bearer_header(browser, console_stack, tmp_path):
    """A replica with API_TOKEN (in-process, on the stack's Redis, on a queue no worker reads)."""
    from werkzeug.serving import make_server

    from app.api import create_app
    from tests.helpers import service_settings

    settings = service_settings(stack_redis_url(console_stack), tmp_path, api_token="s3cret-token")
    server = make_server("127.0.0.1", free_ports(1)[0], create_app(settings), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    context = browser.new_context(base_url=f"http://127.0.0.1:{server.server_port}")
    try:
        tab = context.new_page()
        tab.goto("/console/new")
        tab.get_by_label("Token", exact=True).fill("s3cret-token")  # asked on the first 401: the form's datasets
        tab.get_by_role("button", name="Save").click()
        tab.locator("#f-train_limit").fill("16")
        tab.get_by_role("button", name="Start training").click()
        tab.wait_for_url("**/console/jobs/*")
        assert tab.evaluate("sessionStorage.getItem('boolq-api-token')") == "s3cret-token"
        assert context.cookies() == []
        assert "s3cret" not in tab.url
        tab.once("dialog", lambda dialog: dialog.accept())
        tab.get_by_role("button", name="Cancel job").click()  # no second prompt: the stored token is sent
        expect(tab.locator("#job-status")).to_have_text("cancelled")
    finally:
        context.close()
        server.shutdown()


def test_the_audit_page_shows_an_admin_key_who_did_what_and_a_trainer_key_why_not(
    browser, launcher, redis_url, tmp_path
):
    """A real gunicorn replica with named keys and no API_TOKEN (on a queue no worker reads)."""
    from redis import Redis

    from app.service.keys import KeyStore
    from tests.helpers import TINY_JOB, service_settings

    settings = service_settings(redis_url, tmp_path)
    store = KeyStore(settings, Redis.from_url(redis_url))
    admin, trainer = store.create("ops", "admin"), store.create("alice", "trainer")
    url = launcher.server(settings, workers=1)
    job = requests.post(f"{url}/train", json=TINY_JOB, headers={"Authorization": f"Bearer {trainer}"}).json()
    for key, expected in ((admin, None), (trainer, "may not audit")):
        context = browser.new_context(base_url=url)
        tab = context.new_page()
        tab.goto("/console/audit")
        tab.get_by_label("Token", exact=True).fill(key)
        tab.get_by_role("button", name="Save").click()
        if expected is None:
            row = tab.locator("#audit-body tr").first
            for text in ("alice", "trainer", "train", job["job_id"]):
                expect(row).to_contain_text(text)
            screenshot(tab, "audit")
        else:
            expect(tab.locator("#audit-error")).to_contain_text(expected)
        context.close()
