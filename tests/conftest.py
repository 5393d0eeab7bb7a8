"""Shared fixtures: the tiny SDXL model, written once per test session in the real formats."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# One intra-op thread per test process unless the caller says otherwise: on 2 shared cores (and with
# pytest-xdist's 2 workers) more OpenMP threads than cores spin against each other and run far slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with tiny_sdxl.safetensors, tiny_sdxl_diffusers/ and train/10_sks shape/ images."""
    from tools.make_tiny_sdxl import main

    out = tmp_path_factory.mktemp("tiny_model")
    main([str(out), "--seed", "0", "--images", "8"])
    return out


@pytest.fixture()
def dataset(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model's mixed-size DreamBooth images (caches stay out of the shared copy)."""
    dst = tmp_path / "train"
    shutil.copytree(tiny_model_dir / "train", dst)
    return dst


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


class ScriptResult:
    """What :func:`run_main` saw: ``returncode``, ``stdout`` and ``stderr``, as a CompletedProcess has."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr


_QUIETED_LOGGERS = ("transformers", "accelerate", "PIL", "diffusers")


def reset_global_state() -> None:
    """Forget accelerate's process-wide singletons, so the next Accelerator starts as in a new process."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def run_main(script: str, argv: list[str], cwd: Path | None = None) -> ScriptResult:
    """Run one of the repo's scripts in this process as ``python script argv...`` would, without a new
    interpreter (the imports are already paid): ``__main__`` runs, so the script's ``run_cli`` turns a
    UserError into its one ``error:`` line and exit 2; an uncaught exception is a traceback and exit 1.

    What a run changes process-wide is put back afterwards: sys.argv, sys.path, the working folder,
    the root logger's handlers and level (the scripts call ``logging.basicConfig(force=True)``),
    accelerate's singletons, torch's default dtype and thread count, the environment (the scripts set
    the CUDA allocator's variable).
    """
    import contextlib
    import io
    import logging
    import runpy
    import traceback

    import torch

    path = ROOT / script
    saved = (list(sys.argv), list(sys.path), os.getcwd(), torch.get_default_dtype(), torch.get_num_threads())
    saved_env = dict(os.environ)
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved_levels = {name: logging.getLogger(name).level for name in _QUIETED_LOGGERS}
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [str(path), *argv]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:  # sys.exit("message"): Python prints it and exits 1
                    print(exc.code, file=sys.stderr)
                    code = 1
            except Exception:  # what the interpreter would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        sys.argv[:], sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved[2])
        torch.set_default_dtype(saved[3])
        torch.set_num_threads(saved[4])
        for handler in root.handlers[:]:
            if handler not in saved_root[0]:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        reset_global_state()
    return ScriptResult([str(path), *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every test starts without accelerate's singletons from an earlier in-process run."""
    reset_global_state()
    yield
    reset_global_state()
