"""`lowvram demo`: the whole path on a tiny random-weight model in the real checkpoint layout.

It writes a tiny Wan2.2-S2V-style folder (sharded DiT + index + config, a LoRA, umT5 .pth + tokenizer,
Wan2.1 VAE .pth, wav2vec2 folder), a 2-clip calibration set (a synthetic face-like image and a speech-like
waveform), then runs inspect, plan, quantize (fp8 and int8), run (two pipeline workers) and bench — the same
code a real user hits. The weights are random: the video shows noise, not a face.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lowvram.media import write_wav
from lowvram.model.config import DiTConfig


def demo_config() -> DiTConfig:
    from lowvram.synthetic_models import tiny_sizes

    return tiny_sizes().dit


def write_tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    """The whole tiny Wan2.2-S2V-14B-shaped folder; returns the LoRA file's path."""
    from lowvram.index import LORA_NAME
    from lowvram.synthetic_models import tiny_sizes, write_model_folder

    write_model_folder(root, tiny_sizes(), seed=seed)
    return root / LORA_NAME


def face_like_image(path: Path, h: int = 256, w: int = 256) -> None:
    """A synthetic portrait (no third-party faces): skin-toned ellipse, eyes, a mouth."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (70, 90, 120))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.25, h * 0.15, w * 0.75, h * 0.85], fill=(224, 180, 150))
    for x in (0.4, 0.6):
        d.ellipse([w * x - 10, h * 0.4 - 6, w * x + 10, h * 0.4 + 6], fill=(40, 40, 40))
    d.ellipse([w * 0.42, h * 0.62, w * 0.58, h * 0.7], fill=(150, 50, 60))
    img.save(path)


def speech_like_wave(path: Path, seconds: float, seed: int, rate: int = 16000) -> None:
    """Syllable-rate amplitude-modulated harmonics with pauses: a stand-in for speech, no voices shipped."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    pauses = (np.sin(2 * np.pi * 0.35 * t) > -0.6).astype(float)
    x = 0.3 * voice * syllables * pauses + 0.003 * rng.standard_normal(t.size)
    write_wav(path, x, rate)


def make_clips(folder: Path, count: int = 2, seconds: float = 1.6, size: int = 128) -> Path:
    """A calibration/benchmark clip set of synthetic portraits and speech-like audio, with clips.json."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = ["a person talks warmly to the camera in a bright kitchen",
               "a person explains something calmly in a quiet studio"]
    entries = []
    for i in range(count):
        image, audio = f"face{i}.png", f"speech{i}.wav"
        face_like_image(folder / image, size, size)
        speech_like_wave(folder / audio, seconds, seed=10 + i)
        entries.append({"name": f"clip{i}", "image": image, "audio": audio, "prompt": prompts[i % len(prompts)]})
    (folder / "clips.json").write_text(json.dumps({"clips": entries}, indent=1))
    return folder


def run_demo(out: Path, device: str = "cpu", console=None) -> dict:
    """Every step of the real flow on the tiny model; returns where things are."""
    import time

    from rich.console import Console

    from lowvram.inspection import inspect_checkpoint
    from lowvram.plan import plan_report
    from lowvram.runtime import RunOptions, run

    console = console or Console()
    out = Path(out)
    t0 = time.monotonic()

    def step(msg: str) -> None:
        console.print(f"[bold cyan][{time.monotonic() - t0:5.1f}s][/] {msg}")

    console.print("[bold]lowvram demo[/]: a tiny model with RANDOM weights in the real Wan2.2-S2V-14B layout — "
                  "the video shows noise, not a face; every step below is the code path real weights take.")
    ckpt = out / "Wan2.2-S2V-tiny"
    step(f"writing the tiny checkpoint (sharded DiT + index + config, LoRA, umT5, tokenizer, VAE, wav2vec2) to {ckpt}")
    lora = write_tiny_checkpoint(ckpt)
    clips = make_clips(out / "clips")
    step(f"calibration/benchmark clips (synthetic portraits + speech-like audio): {clips}")

    report = inspect_checkpoint(ckpt, lora)
    step(f"inspect: {report['model']} model, {report['params']:,} params, complete={report['complete']}, "
         f"LoRA rank {report.get('lora', {}).get('rank')}")
    plan = plan_report(ckpt, "2x24", "128*128", "bf16", "pcie", "int8", "rtx4090")
    step(f"plan for 2x24 GB at 128*128: chosen {plan['chosen']} "
         f"(peak {next(r['peak_GiB'] for r in plan['layouts'] if r['name'] == plan['chosen'])} GiB per GPU)")

    from lowvram.quantize import QuantizeOptions, quantize_checkpoint

    quantized = {}
    for fmt in ("fp8", "int8"):
        q_dir = out / f"q-{fmt}"
        step(f"quantize {fmt}: calibrating on the 2 clips (block-streaming, one layer in memory) -> {q_dir}")
        rep = quantize_checkpoint(QuantizeOptions(ckpt=ckpt, out=q_dir, calib=clips, lora=lora, fmt=fmt,
                                                  device=device, calib_size="128*128", calib_blocks=2, rows=128,
                                                  progress=False))
        quantized[fmt] = q_dir
        err = rep.get("end_to_end", {}).get("final_rel_err_mean") if isinstance(rep, dict) else None
        step(f"  {fmt} written" + (f"; held-out 4-step latents vs bf16: relative error {err:.4f}"
                                   if isinstance(err, float) else ""))

    first = json.loads((clips / "clips.json").read_text())["clips"][0]
    video = out / "fp8_two_workers.mp4"
    share = device == "cuda" and torch.cuda.device_count() < 2
    where = ("gloo on the CPU" if device == "cpu" else "sharing the one GPU, gloo between them" if share
             else "NCCL, one GPU each")
    step(f"run: the fp8 folder on two pipeline workers ({where}) …")
    summary = run(RunOptions(model_dir=quantized["fp8"], ckpt_dir=ckpt, image=clips / first["image"],
                             audio=clips / first["audio"], prompt=first["prompt"], output=video, size="128*128",
                             device=device, pp=2, share_gpu=share, seconds=1.0, progress=False))
    step(f"wrote {video} ({summary['frames']} frames, layout {summary['layout']}, {summary['seconds']} s)")
    from lowvram.benchmarks.bench import BenchOptions, run_bench

    report_dir = out / "report"
    step("bench: bf16 baseline vs the fp8 and int8 folders on both clips (same seeds and reference shifts) …")
    run_bench(BenchOptions(baseline=str(ckpt), candidates=[str(quantized["fp8"]), str(quantized["int8"])],
                           clips=clips, out=report_dir, device=device, size="128*128", seconds=1.0, progress=True))
    step(f"report: {report_dir / 'report.html'} (also report.md, results.json)")
    result = {"checkpoint": str(ckpt), "clips": str(clips), "videos": [str(video)],
              "quantized": {k: str(v) for k, v in quantized.items()}, "report": str(report_dir / "report.html")}
    console.print(f"\n[bold green]done in {time.monotonic() - t0:.0f} s.[/] Video: {video}\n"
                  f"Report: {report_dir / 'report.html'}")
    console.print("The same with the real weights (see README.md):\n"
                  "  lowvram inspect  Wan2.2-S2V-14B --lora LiveAvatar/liveavatar.safetensors\n"
                  "  lowvram plan     Wan2.2-S2V-14B --gpus 4x24 --format fp8\n"
                  "  lowvram calib make --image me.jpg --audio me.wav --prompt \"...\" --out my-clips\n"
                  "  lowvram quantize Wan2.2-S2V-14B --lora LiveAvatar/liveavatar.safetensors --calib my-clips "
                  "--format fp8 --out q-fp8\n"
                  "  lowvram run      q-fp8 --ckpt-dir Wan2.2-S2V-14B --image me.jpg --audio talk.wav "
                  "--prompt \"...\" -o talk.mp4\n"
                  "  lowvram bench    --baseline Wan2.2-S2V-14B --candidate q-fp8 --clips my-clips --out report/",
                  markup=False, highlight=False)
    return result
