"""`lowvram run`: conditioning once, then the (parallel) DiT stream, decoded and written block by block.

1. The plan is checked before anything is loaded (a layout that won't fit is refused, exit 3).
2. Conditioning runs in the launcher and is freed: reference image -> VAE encode (reference + motion latents),
   prompt -> umT5 (cached on disk per prompt), speech -> wav2vec2 features.
3. The DiT runs on `tp x pp` worker processes (or in-process for one device); each rank builds only its slice.
4. Finished block latents come back in order; the launcher decodes them with the streaming VAE decoder and
   appends the frames to the mp4 (audio muxed in), so the file grows while the DiT works and a killed run
   leaves a playable file of what was done.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.errors import CheckpointError, InputError, Interrupted, LowvramError, one_of
from lowvram.manifest import MANIFEST, check_tp_split, read_manifest
from lowvram.media import CRF
from lowvram.model.config import FPS, UPSTREAM_SEED, DiTConfig
from lowvram.memo import file_identity, memoized, tensor_digest
from lowvram.outputs import hold_lock, lock_path_for
from lowvram.placement import Placement, choose_layout, decode_device
from lowvram.plan import KV_DTYPES, Layout, check_gpus, check_layout
from lowvram.sink import BlockSink, make_progress

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
DEVICES = ("auto", "cuda", "cpu")
T5_DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
MP4_BYTES_PER_PIXEL = 0.5  # per frame: pessimistic H.264 (noise-like frames: 0.2 at crf 10 medium; faces ~10x less)


@dataclass
class RunOptions:
    model_dir: Path
    image: Path
    audio: Path
    prompt: str
    output: Path
    ckpt_dir: Path | None = None  # folder with T5 / VAE / wav2vec2 (default: the source checkpoint)
    lora: Path | None = None
    size: str = "704*384"
    seed: int = UPSTREAM_SEED
    device: str = "auto"
    tp: int | None = None
    pp: int | None = None
    gpus: str | None = None
    share_gpu: bool = False  # more ranks than visible GPUs: round-robin on them, each capped, gloo between them
    seconds: float | None = None
    num_clip: int | None = None  # upstream's --num_clip: at most this many 48-frame clips
    pose_video: Path | None = None  # upstream's --pose_video: its frames become cond_states (zeros without)
    crf: int = CRF  # x264 quality of the mp4 (upstream's quality 8 ~ crf 10)
    latents: Path | None = None
    kv: str = "bf16"
    t5_device: str | None = None
    t5_quantization: str | None = None
    ref_update: bool = True  # upstream multi-GPU: the first generated frame becomes the reference after clip 0
    compile: bool = True  # torch.compile the per-layer math (CUDA only)
    progress: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class Components:
    dit: Path
    quantized: bool
    cfg: DiTConfig
    t5: Path
    tokenizer: Path
    vae: Path
    wav2vec: Path
    lora: Path | None
    recipe: dict | None = None
    fmt: str = "bf16"
    manifest: dict | None = None  # a quantized folder's


def find_components(opts: RunOptions) -> Components:
    """Locate the DiT (bf16 checkpoint or quantized folder) and the conditioning models; one line per problem."""
    d = Path(opts.model_dir)
    if not d.exists():
        raise InputError(f"{d}: no such folder; pass the folder written by `lowvram quantize` or the checkpoint")
    if (d / MANIFEST).exists():
        m = read_manifest(d)
        cfg = DiTConfig.from_dict(m["config"])
        source = m.get("source", {})
        src_dir = source.get("path") or source.get("checkpoint") if isinstance(source, dict) else source
        ckpt = Path(opts.ckpt_dir or (src_dir if src_dir else d))
        if ckpt.is_file():
            ckpt = ckpt.parent
        comps = Components(d, True, cfg, ckpt / T5_FILE, ckpt / TOKENIZER_DIR, ckpt / VAE_FILE, ckpt / WAV2VEC_DIR,
                           None, m["recipe"], m["format"], m)
    else:
        if not (d / "config.json").exists():
            raise CheckpointError(f"{d}: neither a quantized folder (manifest.json) nor a checkpoint (config.json); "
                                  f"pass the Wan2.2-S2V-14B folder or the output of `lowvram quantize`")
        from lowvram.index import checkpoint_index

        cfg = DiTConfig.from_json(d / "config.json")
        for weights in (d, opts.lora) if opts.lora else (d,):
            checkpoint_index(weights)  # headers only: a missing shard or a pickle is refused before any compute
        ckpt = Path(opts.ckpt_dir or d)
        lora = opts.lora
        comps = Components(d, False, cfg, ckpt / T5_FILE, ckpt / TOKENIZER_DIR, ckpt / VAE_FILE, ckpt / WAV2VEC_DIR,
                           lora)
    for what, path, fix in [("text encoder", comps.t5, "--ckpt-dir pointing at the Wan2.2-S2V-14B folder"),
                            ("VAE", comps.vae, "--ckpt-dir pointing at the Wan2.2-S2V-14B folder"),
                            ("wav2vec2 folder", comps.wav2vec, "--ckpt-dir pointing at the Wan2.2-S2V-14B folder")]:
        if not path.exists():
            raise CheckpointError(f"{path}: the {what} is missing; download it or pass {fix}")
    return comps


def pick_device(opts: RunOptions) -> str:
    one_of("--device", opts.device, DEVICES)
    if opts.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif opts.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA GPU is visible; use --device cpu or check the driver")
    else:
        device = opts.device
    return device


def check_options(opts: RunOptions) -> None:
    """The flags that need no model, refused before anything is read or computed."""
    one_of("--kv", opts.kv, KV_DTYPES)
    if opts.seconds is not None and not 0 < opts.seconds < math.inf:
        raise InputError(f"--seconds {opts.seconds}: must be a positive number of seconds of video (e.g. 5)")
    if opts.num_clip is not None and opts.num_clip < 1:
        raise InputError(f"--num-clip {opts.num_clip}: must be at least 1 (each clip is 48 frames, 1.92 s)")
    if opts.num_clip is not None and opts.seconds is not None:
        raise InputError("--seconds and --num-clip both set the video's length; pass one of them")
    if not 0 <= opts.crf <= 51:
        raise InputError(f"--crf {opts.crf}: x264 quality must be 0-51 (lower is better; upstream's is about 10)")
    if opts.t5_device is not None and not T5_DEVICE_PATTERN.fullmatch(opts.t5_device):
        raise InputError(f"--t5-device {opts.t5_device}: use cpu, cuda or cuda:N")


def check_output_path(path: Path) -> Path:
    """Refuse an output that cannot be written at all (a folder, no write permission); returns the nearest
    existing folder on its path (VideoWriter creates the missing ones)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"-o {path}: is a folder; give a file name, e.g. -o {path / 'out.mp4'}")
    folder = next(p for p in path.absolute().parents if p.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"-o {path}: cannot write in {folder} ({err.strerror}); choose a writable folder") from None
    return folder


def check_output(path: Path, height: int, width: int, block_frames: int) -> None:
    """Refuse an output the video cannot be written to, before any compute: a folder, a place without write
    permission, or a disk without room for the first block."""
    folder = check_output_path(path)
    need = int(block_frames * height * width * MP4_BYTES_PER_PIXEL)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise InputError(f"-o {path}: {folder} has {free / 1e6:.1f} MB free, the first block alone needs "
                         f"~{need / 1e6:.1f} MB; free some space or write to another disk")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), so start-up figures include Python's and torch's imports."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))


class Timeline:
    """When each start-up step finished, in seconds since the process started (for `run --json`)."""

    def __init__(self):
        age = process_age_s()
        self.origin = time.monotonic() - (age if age is not None else 0.0)
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.monotonic() - self.origin, 2)


def prepare_conditioning(opts: RunOptions, comps: Components, device: str, capacity: float | None = None,
                         timeline: Timeline | None = None):
    """Image, prompt and speech -> (StreamInputs (DiT inputs), the frames the video keeps, the motion latents); the
    encoders are freed. `capacity`: the size of GPU planned for (where umT5 runs)."""
    from lowvram.conditioning.audio import audio_features
    from lowvram.conditioning.image import load_reference_image, max_area_for_size
    from lowvram.conditioning.text import TextEncoder
    from lowvram.conditioning.vae import WanVAE, runtime_dtype
    from lowvram.model.sampler import StreamInputs

    memo = opts.extra.get("memo")
    pixels, (h, w) = load_reference_image(opts.image, max_area_for_size(opts.size))
    feats = audio_features(opts.audio, comps.wav2vec, device=device)
    mark = timeline.mark if timeline is not None else (lambda name: None)
    mark("audio_features")
    frames = video_frames(feats.duration_s, opts, comps.cfg)
    blocks = min(feats.num_blocks, blocks_for_frames(frames, comps.cfg))
    audio = feats.frames(0, blocks * 4 * comps.cfg.frames_per_block).float().cpu()
    del feats
    pose_clips = math.ceil(blocks / comps.cfg.blocks_per_clip)

    def encode_image():
        vae = WanVAE.load(comps.vae, device=device, dtype=runtime_dtype(device))
        ref = vae.encode_reference(pixels.to(device)).float().cpu()
        motion = vae.encode_motion(pixels.to(device)).float().cpu()
        pose = None
        if opts.pose_video is not None:
            from lowvram.conditioning.pose import pose_latents

            pose = pose_latents(vae, opts.pose_video, pose_clips, (h, w))[:, :, : blocks * comps.cfg.frames_per_block]
        return ref, motion, pose

    pose_key = (file_identity(opts.pose_video), pose_clips) if opts.pose_video is not None else None
    ref, motion, pose = memoized(memo, ("image", file_identity(comps.vae), device, tensor_digest(pixels), pose_key),
                                 encode_image, 8)
    mark("vae_encode")
    t5_device = opts.t5_device or default_t5_device(device, capacity, opts.t5_quantization)
    small = comps.t5.stat().st_size < 2**30  # tiny test encoders run in float32; umT5-XXL in bf16 (11.4 GB)

    def encode_prompt():
        encoder = TextEncoder(comps.t5, comps.tokenizer, device=t5_device,
                              dtype=torch.float32 if small else torch.bfloat16, quantization=opts.t5_quantization)
        context = encoder.encode(opts.prompt).float().cpu()
        encoder.unload()
        return context

    context = memoized(memo, ("prompt", file_identity(comps.t5), t5_device, opts.t5_quantization, opts.prompt),
                       encode_prompt, 32)
    release_gpu(device)
    mark("text_encoder")
    if context.shape[-1] != comps.cfg.text_dim:
        raise CheckpointError(f"{comps.t5}: text encoder width {context.shape[-1]} != the DiT's text_dim "
                              f"{comps.cfg.text_dim}; the components come from different models")
    inputs = StreamInputs(context=context, ref_latents=ref, motion_latents=motion, audio=audio, num_blocks=blocks,
                          seed=opts.seed, latent_hw=(h // 8, w // 8), pose=pose)
    return inputs, frames, motion


def video_frames(audio_s: float, opts: RunOptions, cfg) -> int:
    """Frames the video keeps: it ends with the speech (upstream muxes with `-shortest`: no frames driven by the
    silence the audio features are padded with), or earlier with --seconds or --num-clip."""
    from lowvram.conditioning.vae import FIRST_DROP

    frames = math.ceil(audio_s * FPS - 1e-6)
    if opts.seconds is not None:
        frames = min(frames, math.ceil(opts.seconds * FPS - 1e-6))
    if opts.num_clip is not None:
        frames = min(frames, opts.num_clip * cfg.blocks_per_clip * 4 * cfg.frames_per_block - FIRST_DROP)
    return max(frames, 1)


def blocks_for_frames(frames: int, cfg) -> int:
    """Blocks to generate for `frames` video frames: the first block keeps 3 fewer (after the decoder's warm-up).
    The stream is causal, so stopping after the last needed block changes none of the frames before it."""
    from lowvram.conditioning.vae import FIRST_DROP

    per_block = 4 * cfg.frames_per_block
    return 1 + math.ceil(max(0, frames - (per_block - FIRST_DROP)) / per_block)


def release_gpu(device: str) -> None:
    """Hand the freed encoders' cached blocks (umT5: 10.7 GiB) back to the driver: the DiT ranks that load next
    are other processes, which this process's allocator cache would otherwise starve."""
    if device == "cuda":
        torch.cuda.empty_cache()


def default_t5_device(device: str, capacity: float | None = None, quantization: str | None = None) -> str:
    """umT5-XXL runs before the DiT loads and is freed: on the GPU when the (planned) card has room for it."""
    from lowvram.plan import t5_on_gpu

    if device != "cuda":
        return "cpu"
    return "cuda" if t5_on_gpu(capacity or torch.cuda.get_device_properties(0).total_memory, quantization) else "cpu"


def worker_spec(opts: RunOptions, comps: Components, layout: Layout, placement: Placement | None, device: str,
                inputs_path: str):
    """What every rank needs to build its slice and run (the same for spawned workers and torchrun ranks): the
    run's layout as chosen, where each rank runs."""
    from lowvram.parallel.worker import WorkerSpec

    return WorkerSpec(source=str(comps.dit), cfg=comps.cfg.to_dict(), tp=layout.tp, pp=layout.pp,
                      stages=layout.stages, inputs_path=inputs_path, device=device,
                      dtype="float32" if device == "cpu" else "bfloat16",
                      kv_dtype="fp8" if opts.kv == "fp8" else None, lora=str(comps.lora) if comps.lora else None,
                      quantized=comps.quantized, ref_update=opts.ref_update,
                      compile=device == "cuda" and opts.compile,
                      gpus=placement.gpus if placement else None, memory_caps=placement.caps if placement else None)


def run_under_torchrun(opts: RunOptions, comps: Components, device: str) -> dict:
    """Launched by an external `torchrun` (one process per rank, any number of nodes): rank 0 computes the
    conditioning and broadcasts it; the last stage's TP rank 0 decodes and writes the mp4."""
    import os

    import torch.distributed as dist

    from lowvram.parallel.engine import StageRunner, make_topology
    from lowvram.parallel.launch import init_distributed, place_ranks, shutdown_distributed
    from lowvram.parallel.worker import device_for, load_stage

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "gloo"
    if device == "cuda":
        local, visible = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
        backend = place_ranks(local, visible)[1]
        if local > visible and not opts.share_gpu:
            raise InputError(f"torchrun started {local} ranks on this machine but {visible} GPU(s) are visible; "
                             f"pass --share-gpu to run them on the visible GPUs (gloo between them) or start "
                             f"--nproc-per-node {visible}")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % visible)
    init_distributed(rank, world, backend)
    tp = opts.tp or 1
    pp = opts.pp or world // tp
    if tp * pp != world:
        raise InputError(f"--tp {tp} x --pp {pp} != {world} processes started by torchrun; make them agree")
    t_start = time.monotonic()
    box = [None]
    if rank == 0:  # the layout is chosen once, here, and handed to every rank with the conditioning
        from lowvram.plan import fixed_layout

        fmt = comps.fmt if comps.fmt in ("fp8", "int8", "int4") else "bf16"
        layout = fixed_layout(comps.cfg, tp, pp, fmt, comps.recipe)
        layout.vae_rank = (pp - 1) * tp  # the last stage's TP rank 0 receives the latents: it decodes
        box[0] = layout, prepare_conditioning(opts, comps, device)
    dist.broadcast_object_list(box, src=0)
    layout, (inputs, frames, motion) = box[0]
    spec = worker_spec(opts, comps, layout, None, device, inputs_path="")
    topo = make_topology(tp, pp)
    here = device_for(spec, rank)
    model = load_stage(spec, topo, here)
    sink = None
    with contextlib.ExitStack() as stack:
        if rank == layout.vae_rank:
            stack.enter_context(hold_lock(lock_path_for(opts.output), f"--output {opts.output}"))
            sink = BlockSink(comps.vae, motion, opts.output, opts.audio, str(here),  # decodes on its own GPU
                             inputs.num_blocks, opts.latents, make_progress(opts, inputs.num_blocks),
                             max_frames=frames, crf=opts.crf)
        try:
            StageRunner(model, topo, inputs, kv_dtype=torch.float8_e4m3fn if opts.kv == "fp8" else None,
                        on_latent=sink.put if sink else None, ref_update=opts.ref_update).run()
        finally:
            if sink is not None:
                sink.close()
                if sink.progress is not None:
                    sink.progress.close()
        replaced = sink.publish() if sink is not None else False
    shutdown_distributed()
    summary = {"rank": rank, "layout": layout.name, "stages": layout.stages, "rank_layers": {rank: model.layer_ids},
               "device": device, "seconds": round(time.monotonic() - t_start, 2)}
    if sink is not None:
        summary.update(output=str(opts.output), blocks=sink.next_block, frames=sink.writer.frames_written,
                       time_to_first_frame_s=sink.first_frame_s, replaced=replaced)
    return summary


def run(opts: RunOptions) -> dict:
    """The whole run; returns a summary (blocks, frames, seconds, layout, time to first frame)."""
    from lowvram.parallel.launch import under_torchrun

    timeline = Timeline()
    timeline.mark("imports")
    check_options(opts)
    device = pick_device(opts)
    comps = find_components(opts)
    check_layout(comps.cfg, opts.tp, opts.pp)
    if opts.gpus is not None:
        check_gpus(comps.cfg, opts.gpus)
    if under_torchrun():
        return run_under_torchrun(opts, comps, device)
    output = Path(opts.output)
    check_output_path(output)  # before the lock file is made beside it
    output.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path_for(output), f"--output {output}"):
        try:
            return run_locked(opts, comps, device, timeline)
        except KeyboardInterrupt:  # before the first block reached the sink (that case says what it kept)
            kept = f"{output} was left as it was" if output.exists() else "nothing was written"
            raise Interrupted(f"interrupted before the first block; {kept}") from None


def run_locked(opts: RunOptions, comps: Components, device: str, timeline: Timeline | None = None) -> dict:
    """`run` once this process owns the output path."""
    from lowvram.conditioning.image import max_area_for_size, read_image, target_size
    from lowvram.parallel.engine import StageRunner, Topology
    from lowvram.parallel.worker import load_stage, run_worker

    img = read_image(opts.image)
    h, w = target_size(img.shape[0], img.shape[1], max_area_for_size(opts.size))
    check_output(opts.output, h, w, 4 * comps.cfg.frames_per_block)
    layout, placement = choose_layout(opts, comps, device, (h // 8, w // 8))
    vae_device = decode_device(device, layout, placement)
    if placement is not None and placement.launcher_cap is not None:
        from lowvram.parallel.launch import cap_memory

        for g in sorted({torch.cuda.current_device(), torch.device(vae_device).index}):
            cap_memory(torch.device("cuda", g), placement.launcher_cap)
    if comps.quantized:
        check_tp_split(comps.dit, comps.manifest, layout.tp)
    timeline = timeline or Timeline()
    timeline.mark("checks_and_plan")
    t_start = time.monotonic()
    inputs, frames, motion = prepare_conditioning(opts, comps, device, placement.capacity if placement else None,
                                                  timeline)
    conditioning_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    progress = opts.extra.get("progress") or make_progress(opts, inputs.num_blocks)  # the ui's per-block events
    sink = BlockSink(comps.vae, motion, opts.output, opts.audio, vae_device, inputs.num_blocks, opts.latents,
                     progress, max_frames=frames, crf=opts.crf, memo=opts.extra.get("memo"))
    sink.t0 = t_start  # block times count from the start of the run (conditioning included)
    timeline.mark("vae_decoder_ready")
    ranks: dict[int, dict] = {}
    timing: dict[int, dict] = {}
    rank_layers: dict[int, list[int]] = {}  # the layers each rank built: the layout's stages, as run

    def on_message(kind, rank, payload):
        if kind == "latent":
            sink.put(payload[0], torch.from_numpy(payload[1]))
        elif kind == "memory":
            ranks[rank] = payload
        elif kind == "timing":
            timing[rank] = payload
        elif kind == "layers":
            rank_layers[rank] = payload
    try:
        with tempfile.TemporaryDirectory(prefix="lowvram-run-") as tmp:
            spec = worker_spec(opts, comps, layout, placement, device, inputs_path=str(Path(tmp) / "inputs.pt"))
            torch.save(inputs, spec.inputs_path)
            if layout.tp * layout.pp == 1:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()  # the DiT's peak, not the conditioning's
                spec_key = {k: v for k, v in vars(spec).items() if k != "inputs_path"}
                model = memoized(opts.extra.get("memo"), ("dit", file_identity(comps.dit), repr(spec_key)),
                                 lambda: load_stage(spec, Topology(), torch.device(device)), 1)
                timeline.mark("dit_loaded")
                rank_layers[0] = model.layer_ids
                runner = StageRunner(model, Topology(), inputs, on_latent=sink.put, kv_offload=layout.offload,
                                     ref_update=opts.ref_update,
                                     kv_dtype=torch.float8_e4m3fn if opts.kv == "fp8" else None)
                runner.run()
                timing[0] = runner.timing
                from lowvram.parallel.launch import peak_memory

                ranks[0] = peak_memory(torch.device(device) if device == "cuda" else None)
            else:
                from lowvram.parallel.launch import spawn

                spawn(run_worker, (spec,), layout.tp * layout.pp, placement.backend if placement else "gloo",
                      on_message)
    except BaseException as err:
        if progress is not None:
            progress.close()
        sink.close(raise_error=False)  # keep what was written playable; report the original failure
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(f"interrupted; {sink.kept_note()}") from None
        if isinstance(err, LowvramError):
            raise type(err)(f"{err}; {sink.kept_note()}", err.exit_code) from None
        raise
    if progress is not None:
        progress.close()
    sink.close()
    replaced = sink.publish()
    elapsed = time.monotonic() - t_start
    if sink.first_frame_s is not None:
        timeline.marks["first_frame"] = round(t_start + sink.first_frame_s - timeline.origin, 2)
    return {"output": str(opts.output), "blocks": sink.next_block, "frames": sink.writer.frames_written,
            "seconds": round(elapsed, 2), "fps": round(sink.writer.frames_written / max(elapsed, 1e-9), 2),
            "layout": layout.name, "stages": layout.stages, "rank_layers": rank_layers, "device": device,
            "time_to_first_frame_s": sink.first_frame_s, "block_times_s": sink.block_times,
            "block_frames": sink.block_frames, "ranks": ranks, "stage_timing": timing, "replaced": replaced,
            "conditioning_gpu_alloc_bytes": conditioning_peak, "placement": placement.summary() if placement else None,
            "startup_s": timeline.marks}
