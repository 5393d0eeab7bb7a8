"""Run a script with accelerate's FSDP plugin on CPU processes (gloo): a test aid, not for users.

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 ... tests/fsdp_on_cpu.py sdxl_train.py ARGS

accelerate (1.15) applies its FSDP plugin only to GPU process groups: on CPU processes it silently
keeps ``MULTI_CPU`` (plain DDP), although torch's FSDP2 itself shards and trains over gloo. This
launcher sets the distributed type to FSDP once accelerate has chosen ``MULTI_CPU``, so the suite
runs the real FSDP2 code path (sharded weights, reduce-scattered gradients, gathering for saving)
on the CPU. Nothing else is changed; the script then runs as ``python script ARGS`` would.
"""

from __future__ import annotations

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        sys.exit("tests/fsdp_on_cpu.py: start it with accelerate launch --use_fsdp")
    AcceleratorState.__init__ = _init_with_fsdp
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
