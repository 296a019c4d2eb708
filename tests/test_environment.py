"""A test run in an incomplete environment fails instead of skipping what it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HIDE = textwrap.dedent(
    """
    import os, sys

    class Hide:
        names = set(os.environ["HIDE_MODULES"].split(","))

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    """
)


def run_pytest(tmp_path: Path, hidden: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(HIDE)
    environment = {k: v for k, v in os.environ.items() if k != "DELF_TEST_REQUIRE_EXTRAS"}
    environment.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), HIDE_MODULES=hidden, **env)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_config.py")]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_missing_required_dependency_fails_the_run(tmp_path):
    result = run_pytest(tmp_path, "tensorflow,nbclient")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "missing test dependencies: tensorflow (tensorflow), nbclient" in result.stdout + result.stderr


@pytest.mark.slow
def test_missing_extra_fails_only_where_extras_are_required(tmp_path):
    assert run_pytest(tmp_path, "faiss").returncode == 0  # an optional extra: its tests skip
    result = run_pytest(tmp_path, "faiss", DELF_TEST_REQUIRE_EXTRAS="1")  # as in CI
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "faiss (pip install '.[faiss]')" in result.stdout + result.stderr
