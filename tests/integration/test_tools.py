"""The model tools end to end, launched as users launch them: conversion and metadata."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_main, run_script

pytestmark = pytest.mark.slow


def test_convert_tool_round_trip_and_errors(tiny_ckpt, tmp_path):
    folder = tmp_path / "conv"
    r = run_script([sys.executable, "tools/convert_sdxl_checkpoint.py", str(tiny_ckpt), str(folder)])
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back.safetensors"
    r = run_main("tools/convert_sdxl_checkpoint.py", [str(folder), str(back)])  # the way back in-process
    assert r.returncode == 0, r.stderr
    a, b = load_file(tiny_ckpt), load_file(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = run_main("tools/convert_sdxl_checkpoint.py", [str(tmp_path / "nope.safetensors"),
                 str(tmp_path / "x.safetensors")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "file not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_show_metadata_tool(tiny_ckpt):
    r = run_script([sys.executable, "tools/show_metadata.py", str(tiny_ckpt)])
    assert r.returncode == 0, r.stderr
    assert '"modelspec.architecture": "stable-diffusion-xl-v1-base"' in r.stdout
