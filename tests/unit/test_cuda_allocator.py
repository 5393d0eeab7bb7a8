"""Every script asks PyTorch for expandable segments unless the user configured the allocator."""

from __future__ import annotations

import pytest

from library.cuda_allocator import EXPANDABLE, prefer_expandable_segments
from tests.conftest import run_main


def test_set_on_linux_when_nothing_is_configured():
    env = {"PATH": "/bin"}
    assert prefer_expandable_segments(env, "linux")
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == EXPANDABLE == "expandable_segments:True"


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_the_users_setting_wins(name):
    env = {name: "max_split_size_mb:128"}
    assert not prefer_expandable_segments(env, "linux")
    assert env == {name: "max_split_size_mb:128"}


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_not_set_where_the_driver_api_is_missing(platform):
    env: dict[str, str] = {}
    assert not prefer_expandable_segments(env, platform)
    assert env == {}


def test_a_script_sets_it_before_it_runs(monkeypatch):
    """run_cli sets it first: an option error exits before anything else, with the variable set."""
    import os

    import library.errors as errors

    seen = {}
    real = errors.run_cli

    def spy(main):
        def wrapped():
            seen["conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
            return main()
        return real(wrapped)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(errors, "run_cli", spy)
    r = run_main("sdxl_gen_img.py", ["--no_such_option"])
    assert r.returncode == 2
    assert seen["conf"] == EXPANDABLE
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ  # run_main puts the environment back
