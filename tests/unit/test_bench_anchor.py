"""bench/anchor_assets.py (control images) and bench/anchor_extra.sh (the harness patch)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from anchor_assets import build_cond

ADDED = ["H", "I", "N", "J", "K", "O", "L", "M", "P", "Q", "R", "S", "V", "W", "X", "Y", "Z"]


def _harness() -> Path | None:
    for candidate in (ROOT.parent / "shared" / "anchor_bench", Path("/work/shared/anchor_bench")):
        if (candidate / "run.sh").is_file() and (candidate / "harness" / "kohya_timed.py").is_file():
            return candidate
    return None


def test_control_images_pair_by_stem_and_keep_the_size(tmp_path):
    images = tmp_path / "10_test"
    images.mkdir()
    half = Image.new("RGB", (64, 48), (0, 0, 0))
    half.paste((255, 255, 255), (32, 0, 64, 48))  # one sharp vertical edge
    half.save(images / "a.png")
    Image.new("RGB", (40, 40), (90, 20, 200)).save(images / "b.jpg")
    (images / "a.txt").write_text("a caption")  # not an image: no control image for it
    out = tmp_path / "cond"
    assert build_cond(images, out) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # nothing else (sd-scripts rejects extras)
    edges = Image.open(out / "a.png")
    assert edges.mode == "RGB" and edges.size == (64, 48)
    column = [edges.getpixel((x, 20))[0] for x in range(64)]
    assert max(column[28:36]) == 255 and max(column[:20]) == 0  # a white line at the edge only
    assert Image.open(out / "b.png").size == (40, 40)


@pytest.mark.skipif(_harness() is None, reason="the shared anchor harness is not here")
def test_anchor_extra_adds_each_config_once(tmp_path):
    src = _harness()
    shutil.copy(src / "run.sh", tmp_path / "run.sh")
    (tmp_path / "harness").mkdir()
    for name in ("kohya_timed.py", "ours_timed.py"):
        shutil.copy(src / "harness" / name, tmp_path / "harness" / name)
    r = subprocess.run(["bash", str(ROOT / "bench" / "anchor_extra.sh"), str(tmp_path)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "run_extra.sh").read_text()
    assert subprocess.run(["bash", "-n", str(tmp_path / "run_extra.sh")], check=False).returncode == 0
    letters = re.findall(r"^DESC\[(\w)\]=", text, flags=re.MULTILINE)
    assert len(letters) == len(set(letters)), "a config letter is defined twice"
    assert set(ADDED) <= set(letters)
    for letter in ADDED:
        assert re.search(rf"^\s+{letter}\) ", text, flags=re.MULTILINE), f"no case for {letter}"
        assert f"NAME_{letter}=" in text
    assert "kohya_timed_parse.py" in text  # the parse mode runs the TI-aware copy
    parse_copy = (tmp_path / "harness" / "kohya_timed_parse.py").read_text()
    assert "support_text_encoder_caching=hasattr(args" in parse_copy
    for tool in ("kohya", "ours"):  # fused-backward configs count steps at the LR scheduler's step
        assert "LRScheduler" in (tmp_path / "harness" / f"{tool}_timed_sched.py").read_text()


def test_anchor_extra_stops_on_a_changed_harness(tmp_path):
    (tmp_path / "run.sh").write_text("#!/usr/bin/env bash\necho nothing to patch\n")
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "kohya_timed.py").write_text("sdxl_train_util.verify_sdxl_training_args(args)\n")
    r = subprocess.run(["bash", str(ROOT / "bench" / "anchor_extra.sh"), str(tmp_path)], capture_output=True,
                       text=True, check=False)
    assert r.returncode != 0 and "layout changed" in r.stderr
    assert not (tmp_path / "run_extra.sh").exists()
