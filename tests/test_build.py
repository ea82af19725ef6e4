"""setup.py's extension decision, as a user's install sees it (no compile is run here)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def setup_notice(**env) -> str:
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, text=True,
                            capture_output=True, env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "curkernels"
    return result.stderr


def test_skip_knob_gives_a_one_line_notice():
    notices = [line for line in setup_notice(CURKERNELS_SKIP_CUDA_BUILD="1").splitlines()
               if line.startswith("curkernels setup:")]
    assert len(notices) == 1 and "skipping the CUDA extension" in notices[0]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_toolkit_root_is_found_from_nvcc_even_through_a_wrapper():
    notice = setup_notice(CUDA_HOME="", CUDA_PATH="", TORCH_CUDA_ARCH_LIST="9.0")
    match = re.search(r"building curkernels._C with (\S+) for TORCH_CUDA_ARCH_LIST=9.0", notice)
    assert match, notice
    assert (Path(match.group(1)) / "include" / "cuda_runtime.h").is_file()
