"""--help and option/config errors import no torch, diffusers, transformers or accelerate.

Those imports take ~9 s on a busy 2-core machine; keeping them out of the parsing and checking
path is what makes feedback quick. One subprocess runs every script's ``--help`` and one option or
config error and reports the heavy modules loaded after each (checked instead of timed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import ROOT, run_script

HEAVY = ("torch", "diffusers", "transformers", "accelerate")

_DRIVER = r"""
import json, runpy, sys, contextlib, io
heavy = {heavy!r}
report = {{}}
for name, argv in {cases!r}:
    script = name.split(" ")[0]
    sys.argv = [script] + argv
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    report[name] = {{"code": code, "heavy": [m for m in heavy if m in sys.modules],
                    "stderr": err.getvalue()[-400:], "stdout": out.getvalue()[:200]}}
print("REPORT" + json.dumps(report))
"""


def _trainers() -> list[str]:
    return sorted(p.name for p in ROOT.glob("sdxl_train*.py"))


def test_help_and_errors_import_no_heavy_libraries(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('mixed_precision = "fp32"\nepoch = 3\n', encoding="utf-8")
    cases = []
    scripts = _trainers() + ["sdxl_gen_img.py", "prepare_buckets_latents.py", "tools/cache_latents.py",
                             "tools/cache_text_encoder_outputs.py"]
    for script in scripts:
        cases.append((f"{script} --help", ["--help"]))
    for script in _trainers() + ["tools/cache_latents.py", "tools/cache_text_encoder_outputs.py"]:
        cases.append((f"{script} config", ["--config_file", str(bad)]))
        cases.append((f"{script} option", ["--pretrained_model_name_or_path", str(tmp_path / "no.safetensors"),
                                           "--output_dir", str(tmp_path), "--train_data_dir", str(tmp_path)]))
    # a cross-option error found after other checks passed (fp8's CUDA check, which needs torch, comes last)
    cases.append(("sdxl_train_network.py late", ["--pretrained_model_name_or_path", str(bad), "--output_dir",
                                                 str(tmp_path), "--train_data_dir", str(tmp_path), "--network_module",
                                                 "networks.lora", "--fp8_base", "--mixed_precision", "bf16",
                                                 "--lr_scheduler", "cosin"]))
    cases.append(("sdxl_gen_img.py option", ["--ckpt", str(tmp_path / "no.safetensors"), "--prompt", "x",
                                             "--outdir", str(tmp_path)]))
    cases.append(("prepare_buckets_latents.py option", [str(tmp_path), str(tmp_path / "no.json"),
                                                        str(tmp_path / "o.json"), "model"]))
    proc = run_script([sys.executable, "-c", _DRIVER.format(heavy=HEAVY, cases=cases)], cwd=ROOT, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(line[len("REPORT"):])
    for name, r in report.items():
        if name.endswith("--help"):
            assert r["code"] in (0, None) and "usage" in r["stdout"].lower(), (name, r)
        else:
            assert r["code"] == 2 and r["stderr"].strip().splitlines()[-1].startswith("error: "), (name, r)
        assert r["heavy"] == [], (name, r)
    assert "must be one of" in report["sdxl_train.py config"]["stderr"]
    assert "not found" in report["sdxl_train_network.py option"]["stderr"]
    assert "did you mean 'cosine'" in report["sdxl_train_network.py late"]["stderr"]
    assert set(_trainers()) >= {"sdxl_train.py", "sdxl_train_network.py"} and Path(ROOT / "sdxl_gen_img.py").is_file()
