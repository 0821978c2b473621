"""The shell blocks of the README and docs/ run as pasted, in order, with the default settings.

The blocks that start servers (Redis, a worker, gunicorn, `python -m app stack`, `make up`) are started as one
stack by the test, on a free port instead of 4000/5000; apt commands are checked for the packages CI installs.
Every other block runs in bash with `set -e`: a syntax error, a placeholder or a failing command fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from app.ops.stack import free_ports
from tests.helpers import REPO_ROOT, running_stack, service_settings, settings_env

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
# (file, heading prefix or None for the whole file): what runs against the native stack, in this order.
STACK_BLOCKS = (
    (README, "## Quick start"),
    (README, "## Your own data"),
    (DOCS / "service.md", None),
    (DOCS / "deploy.md", "### Without Docker"),
)
BLOCK_TIMEOUT_S = 600


def sections(text: str) -> dict[str, str]:
    """Heading line → the text under it, up to the next heading of any level."""
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def bash_blocks(section_text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", section_text, flags=re.DOTALL)


def doc_blocks(path, prefix: str | None) -> list[str]:
    if prefix is None:
        return bash_blocks(path.read_text())
    found = sections(path.read_text())
    (heading,) = [h for h in found if h.lstrip("#").strip().startswith(prefix.lstrip("#").strip())]
    return bash_blocks(found[heading])


def readme_blocks() -> list[str]:
    return [block for path, prefix in STACK_BLOCKS for block in doc_blocks(path, prefix)]


def installs(block: str) -> bool:
    """Blocks that install or run the whole demo (the Quick start's make lines, a venv): CI runs those itself."""
    return any(word in block for word in ("make demo", "pip install"))


def starts_servers(block: str) -> bool:
    return any(word in block for word in ("-m app stack", "-m app serve", "-m app worker", "apt-get install"))


def test_readme_has_no_placeholders_in_shell_blocks():
    texts = [README.read_text(), *(doc.read_text() for doc in sorted(DOCS.glob("*.md")))]
    placeholders = [b for text in texts for b in bash_blocks(text) if re.search(r"<[a-z_]+>", b)]
    assert placeholders == [], "a pasted <placeholder> is a shell syntax error"


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory):
    """The stack the README's "Without Docker" section starts, as pasted except for the port and state folder."""
    folder = tmp_path_factory.mktemp("readme")
    (stack_line,) = [line for b in readme_blocks() for line in b.splitlines() if "-m app stack" in line]
    argv = shlex.split(stack_line.split("#")[0])
    (port,) = free_ports(1)
    argv[argv.index("--port") + 1] = str(port)
    argv[0] = sys.executable if argv[0].endswith("python") else argv[0]
    env = os.environ | {"ARTIFACTS_DIR": str(folder / "runs")}  # the defaults otherwise: MLflow, the hub mode
    with running_stack(argv, folder, env):
        yield port, env


def run_block(block: str, port: int, env: dict) -> str:
    """Run one pasted block with bash -e against the service on ``port``; fail on an error or an API error body."""
    script = re.sub(r"localhost:(4000|5000)", f"localhost:{port}", block)
    proc = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    report = f"block ({proc.returncode}):\n{block}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0 and "syntax error" not in proc.stderr, report
    assert not re.search(r'"error":\s*\{', proc.stdout), report  # an API error body
    return proc.stdout


def test_readme_service_and_deploy_blocks_run_as_pasted(readme_stack):
    port, env = readme_stack
    ran = []
    for block in readme_blocks():
        if installs(block):
            continue
        if starts_servers(block):
            assert "apt-get install" not in block or {"nginx", "redis-server"} <= set(block.split())
            continue
        out = run_block(block, port, env)
        ran.append(out)
        if "wait=true" in block:  # each training block's own output says its job succeeded (not a 202 or a 4xx)
            assert re.search(r'"status":\s*"succeeded"|^succeeded ', out, flags=re.MULTILINE), out[-2000:]
            if "tracking errors:" in block:  # tracked with the default MLflow store: a failure shows as an error
                assert re.search(r"tracking errors: \{\}$", out, flags=re.MULTILINE), out[-2000:]
    assert len(ran) >= 2


def test_readme_lifecycle_blocks_run_as_pasted(redis_url, launcher, tmp_path):
    """Sweeps, promotion and the local sweep, against a worker and gunicorn with TRACKER=mlflow as the section says."""
    settings = service_settings(redis_url, tmp_path, tracker="mlflow")
    launcher.worker(settings)
    port = int(launcher.server(settings, workers=1).rsplit(":", 1)[1])
    outputs = [
        run_block(block, port, settings_env(settings))
        for block in doc_blocks(DOCS / "lifecycle.md", None)
        if not starts_servers(block)
    ]
    sweep, models, local, collected = outputs
    assert "finished" in sweep and "'promoted': True" in sweep, sweep
    assert '"champion"' in models and '"model":"champion"' not in models
    assert "best (chosen on dev accuracy)" in local
    totals = re.findall(r"^(would delete|deleted) \d+ item\(s\): [\d.]+ MB on this host", collected, flags=re.MULTILINE)
    assert totals == ["would delete", "deleted", "deleted"], collected  # gc --dry-run, gc, gc with a policy


def test_readme_training_block_runs_as_pasted(tmp_path):
    """Train from the command line, then ask the newest run, as the README shows (the tracker is the default)."""
    (block,) = doc_blocks(README, "## Train from the command line")
    env = os.environ | {"ARTIFACTS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"label"' in proc.stdout.splitlines()[-1]
    (hint,) = [line for line in proc.stdout.splitlines() if line.startswith("ask it: ")]
    asked = subprocess.run(
        ["bash", "-e", "-c", hint.removeprefix("ask it: ")], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert asked.returncode == 0 and '"label"' in asked.stdout, asked.stderr[-3000:]  # the hint works as pasted
