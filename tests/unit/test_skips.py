"""A run skips only what tests/conftest.py's ALLOWED_SKIPS allows, and says what it skipped and why."""

from pathlib import Path

import pytest
import torch

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

GPU_ONLY = """
import pytest
import torch

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu():
    pass
"""


@pytest.fixture
def run_with_our_hooks(pytester, request):
    """Run pytest in this process on files planted under pytester's folder, with tests/conftest.py's hooks."""
    hooks = request.config.pluginmanager.get_plugin(str(CONFTEST))
    assert hooks is not None

    def run(files: dict[str, str]):
        pytester.makepyfile(**files)
        return pytester.runpytest("--import-mode=importlib", "-p", "no:cacheprovider", plugins=[hooks])

    return run


def test_a_skip_not_on_the_list_fails_its_test_and_the_run(run_with_our_hooks):
    result = run_with_our_hooks(
        {
            "tests/unit/test_planted": "import pytest\n\ndef test_planted():\n    pytest.skip('planted')\n",
            "tests/unit/test_fine": "def test_fine():\n    pass\n",
        }
    )
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped (planted), and this skip is not allowed by ALLOWED_SKIPS*"])


def test_a_module_skipping_itself_fails_the_run(run_with_our_hooks):
    result = run_with_our_hooks({"tests/unit/test_planted": "import pytest\n\npytest.skip(allow_module_level=True)\n"})
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*this skip is not allowed by ALLOWED_SKIPS*"])


def test_the_gpu_tests_skip_without_cuda_and_the_summary_says_so(run_with_our_hooks):
    result = run_with_our_hooks({"tests/unit/test_gpu_only": GPU_ONLY})
    assert result.ret == pytest.ExitCode.OK
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["skipped: nothing"])
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(
            ["skipped, as ALLOWED_SKIPS allows: 1 in tests/unit/test_gpu_only.py: needs a CUDA GPU"]
        )


def test_the_gpu_reason_elsewhere_is_not_allowed(run_with_our_hooks):
    result = run_with_our_hooks({"tests/unit/test_other": GPU_ONLY})
    if not torch.cuda.is_available():
        result.assert_outcomes(errors=1)  # a skip in setup (a skipif mark) fails as an error of the setup
        assert result.ret == pytest.ExitCode.TESTS_FAILED
