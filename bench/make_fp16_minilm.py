"""A copy of minilm with its weights stored in fp16 (45 MB instead of 91 MB), for machines that get the model as a
folder through a size-limited transfer (bench/gpu_check.py's GPU run). The engine loads any checkpoint in fp32 for
training, so the copy fine-tunes like the original up to the weights' rounding to 11 significant bits.

    python bench/make_fp16_minilm.py /tmp/minilm-fp16        # then: bench/gpu_check.py --model /tmp/minilm-fp16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from app.engine.model_names import resolve_model  # noqa: E402


def save_fp16_copy(source: str, folder: Path) -> int:
    """Save ``source``'s encoder (as stored: no classifier head) in fp16 with its tokenizer; the folder's bytes."""
    AutoModel.from_pretrained(resolve_model(source), dtype=torch.float16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model(source)).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write the copy")
    parser.add_argument("--source", default="minilm", help="the model to copy (alias or folder)")
    args = parser.parse_args()
    size = save_fp16_copy(args.source, args.folder)
    print(f"{args.folder}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
