"""Write the whole Wan2.2-S2V-14B download + LiveAvatar LoRA with random weights at the real sizes (~47 GB).

    python scripts/make_fullsize_checkpoint.py --out WORK/Wan2.2-S2V-14B [--dit-dir /dev/shm/Wan2.2-S2V-14B] \
        [--device cuda] [--tiny] [--json]

DiT (16.3B bf16, 4 shards + index + config.json) and `liveavatar.safetensors` (rank 128, 896 tensors) go to
--dit-dir (default --out; a RAM disk keeps the 32.6 GB off a small disk), umT5-XXL + tokenizer, the Wan2.1 VAE and
wav2vec2-large to --out; --dit-dir then links to them, so it looks like the download. Tensors are drawn on --device
(a GPU draws 16B values in seconds) and written one at a time. --tiny writes the demo's tiny model instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def check_space(sizes, out: Path, dit_dir: Path) -> None:
    """Exit with a clear message unless each filesystem has room for what goes onto it."""
    from lowvram.synthetic_models import planned_bytes

    need = planned_bytes(sizes)
    per_filesystem: dict[int, list] = {}
    for folder, nbytes in ((dit_dir, need["dit"]), (out, need["rest"])):
        folder.mkdir(parents=True, exist_ok=True)
        per_filesystem.setdefault(folder.stat().st_dev, [folder, 0])[1] += nbytes
    for folder, nbytes in per_filesystem.values():
        free = shutil.disk_usage(folder).free
        if free < nbytes * 1.02:
            sys.exit(f"error: {folder}: {free / 1e9:.1f} GB free, {nbytes / 1e9:.1f} GB to write there; free space "
                     f"or pass --dit-dir on another filesystem (e.g. /dev/shm)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for umT5, tokenizer, VAE, wav2vec2 (and the DiT)")
    ap.add_argument("--dit-dir", type=Path, default=None, help="folder for the DiT shards and the LoRA")
    ap.add_argument("--device", default="auto", help="where tensors are drawn: auto, cuda or cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="the demo's tiny sizes (seconds on a CPU)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    args = ap.parse_args(argv)

    import torch

    from lowvram.synthetic_models import full_sizes, tiny_sizes, write_model_folder

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = tiny_sizes() if args.tiny else full_sizes()
    dit_dir = args.dit_dir or args.out
    check_space(sizes, args.out, dit_dir)
    report = write_model_folder(args.out, sizes, dit_dir=dit_dir, seed=args.seed, device=device,
                                log=lambda msg: print(msg, flush=True))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
