"""setup.py's extension decision and what an sdist carries, as a user's install sees them (no
compile is run here)."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
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


def copy_of_the_tree(into: Path) -> Path:
    """The source tree without what builds and runs leave in it."""
    tree = into / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".*_cache",
        ".benchmarks", "demo_out"))
    return tree


def test_the_sdist_carries_the_cuda_sources_and_the_decode_tables(tmp_path):
    """Built where the extension is skipped (as a CPU-only release job would), the sdist must
    still hold csrc/, or a GPU machine installing it has nothing to compile. Built from a copy:
    setuptools would reuse a file list left in the tree by an earlier build."""
    tree = copy_of_the_tree(tmp_path)
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir",
                             str(tmp_path)], cwd=tree, text=True, capture_output=True,
                            env={**os.environ, "CURKERNELS_SKIP_CUDA_BUILD": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("curkernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir()}
    expected |= {str(p.relative_to(ROOT))
                 for p in (ROOT / "curkernels" / "ops" / "measured").rglob("*.json")}
    assert expected and expected <= names, sorted(expected - names)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_a_tree_without_cuda_sources_is_refused_where_the_extension_would_build(tmp_path):
    tree = copy_of_the_tree(tmp_path)
    shutil.rmtree(tree / "csrc")
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tree, text=True,
                            capture_output=True, env={**os.environ, "CURKERNELS_FORCE_CUDA": "1"},
                            timeout=300)
    assert result.returncode != 0 and "holds no CUDA sources" in result.stderr
