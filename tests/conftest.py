"""Shared fixtures: the tiny SDXL model, written once per test session in the real formats."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with tiny_sdxl.safetensors, tiny_sdxl_diffusers/ and train/10_sks shape/ images."""
    from tools.make_tiny_sdxl import main

    out = tmp_path_factory.mktemp("tiny_model")
    main([str(out), "--seed", "0", "--images", "8"])
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model_dir) -> Path:
    return tiny_model_dir / "tiny_sdxl.safetensors"


@pytest.fixture(scope="session")
def tiny_diffusers(tiny_model_dir) -> Path:
    return tiny_model_dir / "tiny_sdxl_diffusers"


def run_script(args: list[str], cwd: Path | None = None, timeout: int = 600):
    """Run one of the repo's scripts the way a user does; return the CompletedProcess."""
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
