"""A folder written by `lowvram quantize`, read from the runtime side: its layout, manifest.json and checks.

    OUT/manifest.json                      config, format, per-layer recipe, tp split, source, every file + sha256
    OUT/nonblock.safetensors               embeddings, head and the other non-layer tensors
    OUT/block_LLL[.tpRofN].safetensors     one file per layer (per tensor-parallel rank when split)

`read_manifest` refuses a manifest that does not describe a complete folder of its own format (one line, and
what to do); `file_problems` checks the files against it; `inspect_quantized` is what `lowvram inspect` reports.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lowvram.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_NAME = "lowvram-quantized"
FORMAT_VERSION = 1
NONBLOCK = "nonblock.safetensors"
QUANTIZED_FORMATS = ("fp8", "int8", "int4")
RERUN = "re-run `lowvram quantize` (same command) to rebuild it"


def block_file(layer: int, tp_rank: int = 0, tp_size: int = 1) -> str:
    if tp_size == 1:
        return f"block_{layer:03d}.safetensors"
    return f"block_{layer:03d}.tp{tp_rank}of{tp_size}.safetensors"


def folder_tp(manifest: dict) -> int:
    return int(manifest.get("tp", {}).get("size", 1))


def expected_files(manifest: dict) -> list[str]:
    """Every file a complete folder of this manifest's model and tp split holds."""
    n = folder_tp(manifest)
    layers = int(manifest["config"]["num_layers"])
    return [NONBLOCK] + [block_file(i, r, n) for i in range(layers) for r in range(n)]


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such quantized folder; run `lowvram quantize ... --out {folder}`")
    if not path.is_file():
        hint = " (quantization unfinished: re-run the same `lowvram quantize` command to resume)" \
            if (folder / "progress.json").exists() else ""
        raise CheckpointError(f"{folder}: no {MANIFEST}, not a finished quantized folder{hint}")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}); {RERUN}") from None
    if not isinstance(m, dict) or m.get("kind") != FORMAT_NAME or not isinstance(m.get("files"), dict) \
            or not isinstance(m.get("config"), dict):
        raise CheckpointError(f"{path}: not a lowvram quantized-folder manifest; {RERUN}")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {m.get('format_version')} is newer than this lowvram "
                              f"understands ({FORMAT_VERSION}); upgrade lowvram")
    check_format(path, m)
    missing = [name for name in expected_files(m) if name not in m["files"]]
    if missing:
        raise CheckpointError(f"{path}: does not list {missing[0]}" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1
                              else "") + f", which a tp-{folder_tp(m)} folder holds: the folder is incomplete or its "
                              f"manifest corrupt; {RERUN}")
    check_weight_dtypes(folder, m)
    return m


def check_format(path: Path, manifest: dict) -> None:
    """The top-level format must be the one its per-layer recipe uses (besides layers kept in bf16)."""
    fmt, recipe = manifest.get("format"), manifest.get("recipe")
    if fmt not in QUANTIZED_FORMATS or not isinstance(recipe, dict) or not recipe:
        raise CheckpointError(f"{path}: format {fmt!r} with {'a' if recipe else 'no'} recipe is not a quantized "
                              f"folder's ({', '.join(QUANTIZED_FORMATS)} with one format per layer); {RERUN}")
    other = sorted(name for name, f in recipe.items() if f not in (fmt, "bf16"))
    if other:
        raise CheckpointError(f"{path}: says format {fmt} but {len(other)} layers are {recipe[other[0]]} (first "
                              f"{other[0]!r}): the manifest does not match its files; {RERUN}")


def check_weight_dtypes(folder: Path, manifest: dict) -> None:
    """Every Linear weight in the files (headers only) is stored as its recipe format says, and no quantized
    weight sits where the recipe says bf16: a manifest edited or mixed up with other files is refused at load."""
    from lowvram.headers import dtype_name, read_header
    from lowvram.kernels.linear import WEIGHT_DTYPES

    recipe = manifest["recipe"]
    for name in sorted(manifest["files"]):
        path, listed = folder / name, int(manifest["files"][name].get("bytes", -1))
        if not path.is_file() or (listed >= 0 and path.stat().st_size != listed):
            continue  # missing or truncated: file_problems names it
        for key, entry in read_header(folder / name).tensors.items():
            module, _, leaf = key.rpartition(".")
            if leaf != "weight" or module not in recipe:
                continue
            want = WEIGHT_DTYPES.get(recipe[module])
            if entry.dtype != want and (want is not None or entry.dtype in WEIGHT_DTYPES.values()):
                raise CheckpointError(f"{folder / name}: {key} is {dtype_name(entry.dtype)}, but {MANIFEST} says "
                                      f"{module} is {recipe[module]}: the manifest does not match its files; {RERUN}")


def check_tp_split(folder: Path, manifest: dict, tp: int) -> None:
    """The folder's files are split for one tensor-parallel size; another needs `lowvram reshard`."""
    if tp != folder_tp(manifest):
        raise CheckpointError(f"{folder}: split for --tp {folder_tp(manifest)}, asked for tp {tp}; run "
                              f"`lowvram reshard {folder} --tp {tp}`")


def file_problems(folder: Path, manifest: dict, hashes: bool = True) -> dict[str, str]:
    """name -> what is wrong ('missing', a size or sha256 mismatch), for every listed file that is not intact.
    Without `hashes` the files' sizes and safetensors headers are checked, not their bytes (`lowvram plan`)."""
    from lowvram.headers import file_sha256, read_header

    problems = {}
    for name, entry in sorted(manifest["files"].items()):
        path = folder / name
        listed = int(entry.get("bytes", -1))
        if not path.is_file():
            problems[name] = "missing"
        elif listed >= 0 and (size := path.stat().st_size) != listed:
            problems[name] = f"{size:,} bytes, {MANIFEST} lists {listed:,} (truncated or changed)"
        elif not hashes:
            try:
                read_header(path)
            except CheckpointError:
                problems[name] = "corrupt safetensors header"
        elif (got := file_sha256(path)) != entry.get("sha256"):
            problems[name] = (f"sha256 {got[:12]}... does not match {MANIFEST} ({str(entry.get('sha256'))[:12]}...): "
                              f"the file was changed or is corrupt")
    return problems


def verify_folder(folder: str | Path, hashes: bool = True) -> dict:
    """Check every file listed in manifest.json (sizes, and sha256 with `hashes`, else headers); returns it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, problem in file_problems(folder, manifest, hashes).items():
        if problem == "missing":
            raise CheckpointError(f"{folder / name}: missing from the quantized folder; {RERUN}")
        raise CheckpointError(f"{folder / name}: {problem}; {RERUN}")
    return manifest


def inspect_quantized(folder: str | Path) -> dict:
    """What `lowvram inspect` reports for a quantized folder; `complete` is False (with a one-line `problem`) when
    a file is missing or does not match its checksum."""
    from lowvram.model.config import DiTConfig

    folder = Path(folder)
    m = read_manifest(folder)
    cfg = DiTConfig.from_dict(m["config"])
    problems = file_problems(folder, m)
    source = m.get("source") or {}
    lora = source.get("lora") or {}
    report = {
        "path": str(folder), "kind": "quantized", "model": cfg.name,
        "config": {"dim": cfg.dim, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads},
        "format": m["format"], "act": m.get("act"),
        "layers_by_format": dict(Counter(m["recipe"].values())),
        "keep_bf16": (m.get("keep_bf16") or {}).get("layers", []), "tp": folder_tp(m),
        "files": [{"name": n, "bytes": e.get("bytes"), "ok": n not in problems} for n, e in sorted(m["files"].items())],
        "source": {"path": source.get("path"), "lora": lora.get("path")},
        "checksums_ok": not problems, "complete": not problems, "problem": None,
    }
    if problems:
        name, what = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        report["problem"] = f"{folder / name}: {what}{more}; {RERUN}"
    return report


def quantized_renderables(report: dict) -> list:
    from rich.table import Table

    from lowvram.inspection import gb

    t = Table(title=f"quantized folder {report['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    c = report["config"]
    t.add_row("model", f"{report['model']}  (dim {c['dim']}, {c['num_layers']} layers, {c['num_heads']} heads)")
    act = f" ({report['act']} activations)" if report["format"] == "fp8" and report["act"] else ""
    t.add_row("format", f"{report['format']}{act}; layers: "
                        + ", ".join(f"{f} x{n}" for f, n in sorted(report["layers_by_format"].items())))
    if report["keep_bf16"]:
        t.add_row("kept bf16", ", ".join(report["keep_bf16"]))
    t.add_row("tensor parallel", f"split for --tp {report['tp']}")
    files = report["files"]
    t.add_row("files", f"{len(files)} files, {gb(sum(f['bytes'] or 0 for f in files))}")
    t.add_row("source", f"{report['source']['path']}" + (f" + LoRA {report['source']['lora']}"
                                                          if report["source"]["lora"] else ""))
    bad = [f["name"] for f in files if not f["ok"]]
    t.add_row("checksums", "[green]all OK[/]" if not bad else f"[red]{len(bad)} bad[/]: {', '.join(bad[:5])}")
    return [t]
