#!/usr/bin/env python3
"""Check that one of the project's entry scripts accepts a harness command line, without loading a model.

usage: anchor_parse_ours.py --proj PROJ_DIR --mode {train,gen} [--script sdxl_train_network.py] -- <args...>

The same interface as the harness' ``ours_timed.py``. The script's own ``main`` runs up to the point
where the models would load: for a trainer, parsing (with --config_file), the option checks, the
preflight, the dataset scan (every image and control image is read) and the method's data checks;
for the generator, parsing, the option checks, the output folder, the prompt plan and the guide images.
Then it stops (``library.training.setup.run_training`` / ``sdxl_gen_img._build_generator`` are replaced).
Prints ``[parse-ours] <script>: N args accepted``, exit 0; a rejected command line prints the
script's one-line error and exits non-zero. The checkpoint file only has to exist.
The check stands in for the GPU machine: the option checks' CUDA probe
(``library.config.schema._cuda_available``) answers True, so ``--fp8_base`` is checked as it would be there.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


class _Stop(Exception):
    """Raised where the models would load."""


def _stop(*_args, **_kwargs):
    raise _Stop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proj", required=True, help="the project's checkout")
    ap.add_argument("--mode", required=True, choices=["train", "gen"])
    ap.add_argument("--script", default="sdxl_train_network.py", help="the trainer (--mode train)")
    argv = sys.argv[1:]
    i = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:i])
    theirs = argv[i + 1:]
    proj = Path(a.proj).resolve()
    sys.path.insert(0, str(proj))
    from library.config import schema
    from library.errors import UserError

    if hasattr(schema, "_cuda_available"):  # the GPU machine's answer (--fp8_base needs CUDA)
        schema._cuda_available = lambda: True
    else:
        print("[parse-ours] note: no library.config.schema._cuda_available; CUDA-only options fail on a CPU")
    script = a.script if a.mode == "train" else "sdxl_gen_img.py"
    module = runpy.run_path(str(proj / script), run_name="anchor_parse")
    if a.mode == "train":
        from library.training import setup

        setup.run_training = _stop
    else:
        module["main"].__globals__["_build_generator"] = _stop
    try:
        module["main"](theirs)
    except _Stop:
        print(f"[parse-ours] {script}: {len(theirs)} args accepted")
        return 0
    except UserError as exc:
        print(f"[parse-ours] {script}: error: {exc}")
        return 2
    print(f"[parse-ours] {script}: returned before the model load (nothing checked past that point)")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
