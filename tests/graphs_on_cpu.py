"""Run a training script with ``--cuda_graphs`` replayed by the CPU graph emulation: a test aid, not for users.

    accelerate launch --multi_gpu --num_processes 2 ... tests/graphs_on_cpu.py sdxl_train_network.py ARGS

Every launched process puts tests/graph_emulator.py in place of torch's CUDA graph API and lets the
trainers' graph check see a CUDA device, then runs the script as ``python script ARGS`` would; so the
suite runs the graphed steps of several processes (captures, replays, the loop's gradient averaging
after each replay) on the CPU.
"""

from __future__ import annotations

import os
import runpy
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import graph_emulator  # noqa: E402  (after the repo root is importable)

if __name__ == "__main__":
    patch = pytest.MonkeyPatch()  # never undone: it lasts as long as this process
    graph_emulator.install(patch)
    graph_emulator.answer_as_gpu(patch)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
