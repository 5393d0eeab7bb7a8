"""Print the metadata of a safetensors file (checkpoint, LoRA, embedding) as JSON.

    python tools/show_metadata.py FILE

JSON-valued keys (ss_datasets, ss_tag_frequency, ...) are decoded so the output nests properly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402


def decoded(metadata: dict[str, str]) -> dict:
    """Metadata with JSON-looking string values parsed."""
    out = {}
    for key in sorted(metadata):
        value = metadata[key]
        if value[:1] in "[{":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a .safetensors file")
    args = p.parse_args(argv)
    from library.models.checkpoint_io import read_safetensors_metadata

    print(json.dumps(decoded(read_safetensors_metadata(args.file)), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
