"""The skip policy of tests/conftest.py, run by pytest on small test files: only a missing GPU,
Transformer Engine or vLLM may skip; any other skip, in a test or at collection, fails the run."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

ALLOWED = '''
import pytest

@pytest.mark.skipif(True, reason="needs a GPU")
def test_gpu():
    pass

def test_cuda():
    pytest.skip("CUDA is not available")

def test_transformer_engine():
    pytest.skip("needs Transformer Engine (GPU machines)")

def test_vllm():
    pytest.skip("could not import 'vllm': No module named 'vllm'")

@pytest.mark.xfail(reason="an expected failure is not a skip")
def test_expected_failure():
    assert False
'''


@pytest.fixture()
def policy(pytester):
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    return pytester


def test_skips_for_a_gpu_transformer_engine_or_vllm_pass(policy):
    policy.makepyfile(test_allowed=ALLOWED)
    result = policy.runpytest_subprocess()
    result.assert_outcomes(skipped=4, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "skips not allowed" not in result.stdout.str()


def test_a_skip_for_another_reason_fails_the_run_and_is_named(policy):
    policy.makepyfile(test_allowed=ALLOWED, test_other="""
        import pytest

        def test_golden():
            pytest.skip("golden reference files not found")

        def test_passes():
            pass
        """)
    result = policy.runpytest_subprocess()
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skips not allowed*", "test_other.py::test_golden: Skipped: golden reference*"])
    assert "test_gpu" not in result.stdout.str().split("skips not allowed")[1]


def test_a_module_skipped_at_collection_fails_the_run(policy):
    policy.makepyfile(test_module="""
        import pytest

        pytest.importorskip("a_package_that_is_not_installed")

        def test_never_collected():
            pass
        """)
    result = policy.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skips not allowed*", "test_module.py: *a_package_that_is_not_installed*"])
