"""Where the clean latents go: the VAE's streaming decode on its own thread, the mp4 growing block by block, and
the progress line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowvram.media import CRF, video_uint8
from lowvram.memo import file_identity, memoized, tensor_digest
from lowvram.outputs import partial_path, publish

if TYPE_CHECKING:
    from lowvram.runtime import RunOptions


class BlockSink:
    """Receives clean block latents (any order) and, on a background thread, decodes them in order and appends
    the frames to the mp4 — so the VAE decode of block b overlaps the DiT's work on the next blocks (its own CUDA
    stream on a GPU). A decode/write error is re-raised in the caller on the next put() or at close().

    The mp4 (and the latents file) grow under their partial names (`talk.partial.mp4`); `publish()` renames them
    over the targets once the run finished, so a failed run never touches the previous video."""

    def __init__(self, vae_path: Path, motion_latents, output: Path, audio: Path, device: str, num_blocks: int,
                 latents_path: Path | None, progress=None, max_frames: int | None = None, crf: int = CRF,
                 memo: dict | None = None):
        import queue
        import threading

        from lowvram.conditioning.vae import WanVAE, runtime_dtype
        from lowvram.media import VideoWriter

        def warmed_decoder():
            vae = WanVAE.load(vae_path, device=device, dtype=runtime_dtype(device))
            decoder = vae.streaming_decoder()
            decoder.warmup(motion_latents.to(device))
            return vae, decoder

        key = ("decoder", file_identity(vae_path), device, tensor_digest(motion_latents))
        self.vae, warmed = memoized(memo, key, warmed_decoder, 1)
        self.decoder = warmed.copy() if memo is not None else warmed  # the memo's copy stays at the warm-up
        self.output = Path(output)
        self.partial = partial_path(self.output)
        self.writer = VideoWriter(self.partial, audio_path=audio, crf=crf)
        self.max_frames = max_frames  # the video ends with the speech: the last block is cut there
        self.pending: dict[int, torch.Tensor] = {}
        self.next_in = 0  # next block to hand to the decoder thread
        self.next_block = 0  # blocks written to the mp4
        self.num_blocks = num_blocks
        self.latents_path = latents_path
        self.kept: dict[str, torch.Tensor] = {}
        self.progress = progress
        self.t0 = time.monotonic()
        self.first_frame_s: float | None = None
        self.block_times: list[float] = []  # seconds since t0 when each block reached the mp4
        self.block_frames: list[int] = []  # frames in the mp4 at that moment
        self.error: BaseException | None = None
        self.stream = torch.cuda.Stream(self.vae.device) if self.vae.device.type == "cuda" else None
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.thread = threading.Thread(target=self._decode_loop, name="lowvram-vae-decode", daemon=True)
        self.thread.start()

    def put(self, block: int, latent: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.pending[block] = latent
        while self.next_in in self.pending:
            x = self.pending.pop(self.next_in)
            if self.latents_path is not None:
                self.kept[f"block_{self.next_in:05d}"] = x.contiguous()
            self.queue.put(x)
            self.next_in += 1

    def _decode_loop(self) -> None:
        while (x := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure; the caller sees the error
            try:
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        self._decode_and_write(x)
                else:
                    self._decode_and_write(x)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self.error = err

    def _decode_and_write(self, x: torch.Tensor) -> None:
        frames = self.decoder.decode_block(x[None].to(self.vae.device))[0]
        if self.max_frames is not None:
            frames = frames[:, : max(0, self.max_frames - self.writer.frames_written)]
        self.writer.write(video_uint8(frames).cpu().numpy())
        if self.first_frame_s is None:
            self.first_frame_s = time.monotonic() - self.t0
        self.block_times.append(time.monotonic() - self.t0)
        self.block_frames.append(self.writer.frames_written)
        self.next_block += 1
        if self.progress is not None:
            self.progress(self.next_block, self.num_blocks, self.writer.frames_written)

    def close(self, raise_error: bool = True) -> None:
        """Finish the queued blocks, close the mp4 (playable even after an error), save the latents."""
        self.queue.put(None)
        self.thread.join()
        self.writer.close()
        if self.latents_path is not None and self.kept:
            from safetensors.torch import save_file

            save_file(self.kept, str(partial_path(self.latents_path)))
        if self.error is not None and raise_error:
            raise self.error

    def publish(self) -> bool:
        """Rename the finished files over the targets; True when an existing video was replaced."""
        if self.latents_path is not None and self.kept:
            publish(partial_path(self.latents_path), self.latents_path)
        return publish(self.partial, self.output)

    def kept_note(self) -> str:
        """What a stopped run left behind, for its one-line message."""
        kept = (f"{self.next_block} of {self.num_blocks} blocks ({self.writer.frames_written} frames) kept in "
                f"{self.partial}, playable")
        return kept + (f"; {self.output} was left as it was" if self.output.exists() else "")


class make_progress:
    """A rich progress line: blocks, frames, fps and ETA."""

    def __new__(cls, opts: RunOptions, total: int):
        if not opts.progress:
            return None
        return super().__new__(cls)

    def __init__(self, opts: RunOptions, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]blocks"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self.task = self.bar.add_task("run", total=total, info="")
        self.t0 = time.monotonic()
        self.bar.start()

    def __call__(self, done: int, total: int, frames: int) -> None:
        fps = frames / max(time.monotonic() - self.t0, 1e-9)
        self.bar.update(self.task, completed=done, info=f"{frames} frames, {fps:.2f} fps")

    def close(self) -> None:
        self.bar.stop()
