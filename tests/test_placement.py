"""Where the ranks of a run go, on CPU: more ranks than GPUs only with --share-gpu (refused before anything loads
otherwise), each rank capped to what `plan` budgets for its GPU, gloo between ranks that share one, and the
point-to-point staging through host memory that gloo needs between CUDA ranks."""

import gc
import types
import weakref

import pytest
import torch

from fixtures import run_cli
from lowvram.errors import DoesNotFitError, InputError
from lowvram.model.config import s2v_14b
from lowvram.parallel.launch import place_ranks, spawn
from lowvram.plan import CUDA_CONTEXT, GiB, RunShape, allocator_caps, plan_layouts, plan_summary, vae_decode_bytes
from lowvram.placement import choose_layout, decode_device
from lowvram.runtime import Components, RunOptions, find_components, worker_spec

H200 = int(139.8 * GiB)


def fake_gpus(monkeypatch, count: int, total: int = H200):
    """A CPU machine that looks like `count` GPUs of `total` bytes to the planning code."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: types.SimpleNamespace(total_memory=total))


def comps_14b(fmt="int8") -> Components:
    return Components(dit=None, quantized=True, cfg=s2v_14b(), t5=None, tokenizer=None, vae=None, wav2vec=None,
                      lora=None, fmt=fmt)


LATENT = (88, 48)  # 704x384


def layout_for(gpus: str, **kw):
    """(layout, placement) that `lowvram run --gpus GPUS` would run."""
    opts = RunOptions(model_dir=None, image=None, audio=None, prompt="", output=None, gpus=gpus, **kw)
    return choose_layout(opts, comps_14b(), "cuda", LATENT)


def test_round_robin_and_the_backend():
    assert place_ranks(4, 1) == ([0, 0, 0, 0], "gloo")
    assert place_ranks(4, 2) == ([0, 1, 0, 1], "gloo")
    assert place_ranks(2, 2) == ([0, 1], "nccl")  # every rank has its own GPU: NCCL
    assert place_ranks(2, 8) == ([0, 1], "nccl")


def test_more_ranks_than_gpus_is_refused_with_what_to_do(monkeypatch):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(InputError) as err:
        layout_for("4x24")
    msg = str(err.value)
    assert msg.startswith("tp1xpp4 needs 4 GPUs but 1 is visible; pass --share-gpu")
    assert "each capped at 24 GiB" in msg and "--gpus 1x139" in msg and "\n" not in msg


def test_shared_gpu_runs_the_planned_layout_with_the_planned_budgets(monkeypatch):
    """`lowvram run --gpus 4x24 --share-gpu` on one GPU: the layout `plan --gpus 4x24` picks, four ranks on GPU 0
    over gloo, each allocator capped to 24 GiB less what else the plan puts on that card."""
    fake_gpus(monkeypatch, 1)
    layout, placement = layout_for("4x24", share_gpu=True)
    planned = next(l for l in plan_layouts(s2v_14b(), "4x24", RunShape(704, 384, 2), "int8") if l.fits)
    assert (layout.tp, layout.pp, layout.offload) == (planned.tp, planned.pp, False) == (1, 4, False)
    assert placement.gpus == [0, 0, 0, 0] and placement.backend == "gloo"
    assert placement.caps == allocator_caps(planned, 24 * GiB)
    vae_rank = next(r for r, m in enumerate(planned.per_gpu_bytes) if "vae_decode" in m)
    for r, cap in enumerate(placement.caps):
        launcher_share = vae_decode_bytes(RunShape(704, 384)) + CUDA_CONTEXT if r == vae_rank else 0
        assert cap == int(24 * GiB - CUDA_CONTEXT - launcher_share)
    assert placement.launcher_cap == int(24 * GiB - CUDA_CONTEXT)
    assert placement.gpus[layout.vae_rank] == 0
    row = next(r for r in plan_summary([planned], 24 * GiB))  # what `lowvram plan --json` reports for it
    assert row["name"] == "tp1xpp4" and row["allocator_caps"] == placement.caps


def test_two_gpus_four_ranks_round_robin(monkeypatch):
    fake_gpus(monkeypatch, 2, total=int(79.2 * GiB))
    layout, placement = layout_for("4x24", share_gpu=True, tp=2, pp=2)
    assert (layout.tp, layout.pp) == (2, 2)
    assert placement.gpus == [0, 1, 0, 1] and placement.backend == "gloo"
    with pytest.raises(DoesNotFitError, match=r"--gpus 6x30: 3 ranks of 30 GiB do not fit GPU 0 \(79.2 GiB\); "
                                              r"plan for what is here \(--gpus 6x26\)"):
        layout_for("6x30", share_gpu=True, tp=2, pp=3)
    with pytest.raises(DoesNotFitError, match=r"--gpus 1x96: a 96 GiB rank does not fit GPU 0"):
        layout_for("1x96")
    assert layout_for("2x80")[1].backend == "nccl"  # an "80 GB" card: 79.2 GiB is close enough


def test_an_override_without_gpus_shares_the_card_equally(monkeypatch):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(InputError, match=r"tp1xpp2 needs 2 GPUs but 1 is visible; .* each capped at 69 GiB"):
        layout_for(None, pp=2)
    layout, placement = layout_for(None, pp=2, share_gpu=True)
    assert (layout.tp, layout.pp) == (1, 2)
    assert placement.capacity == 69 * GiB
    assert all(c <= 69 * GiB - CUDA_CONTEXT for c in placement.caps)


def test_real_gpus_are_not_capped(monkeypatch):
    fake_gpus(monkeypatch, 4, total=int(23.6 * GiB))
    layout, placement = layout_for(None)
    assert layout.tp * layout.pp == 4 and placement.backend == "nccl" and placement.gpus == [0, 1, 2, 3]
    assert placement.caps == [None] * 4 and placement.launcher_cap is None


def test_one_big_gpu_emulating_a_24gb_card_caps_the_process(monkeypatch):
    fake_gpus(monkeypatch, 1)
    layout, placement = layout_for("1x24", kv="fp8")
    assert (layout.tp, layout.pp, layout.offload) == (1, 1, True)  # fp8 weights + fp8 KV streamed from host RAM
    assert placement.backend == "nccl" and placement.caps == [int(24 * GiB - CUDA_CONTEXT)]  # VAE in-process


# ----- through the CLI: refused before anything loads -------------------------------------------------------


def test_cli_refuses_before_loading_anything(tiny_ckpt, tmp_path, monkeypatch):
    import lowvram.runtime

    root, lora = tiny_ckpt
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(lowvram.runtime, "prepare_conditioning", lambda *a: pytest.fail("conditioning ran"))
    code, out, err = run_cli("run", str(root), "--image", str(root / "face.png"), "--audio", str(root / "speech.wav"),
                             "--prompt", "a baker talks", "--lora", str(lora), "--size", "128*128", "--device", "cuda",
                             "--gpus", "2x24", "-o", str(tmp_path / "x.mp4"))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == ["error: tp1xpp2 needs 2 GPUs but 1 is visible; pass --share-gpu to run the 2 ranks on it, "
                     "each capped at 24 GiB, or --gpus 1x139 to plan for what is here"], err
    assert not (tmp_path / "x.mp4").exists()


def test_conditioning_frees_its_encoders(tiny_ckpt, monkeypatch, tmp_path):
    """wav2vec2, the VAE encoder and umT5 are unreferenced (not waiting for the garbage collector) when the launcher
    hands its GPU cache back, right before the DiT ranks start."""
    import lowvram.conditioning.audio as audio
    import lowvram.conditioning.text as text
    import lowvram.conditioning.vae as vae
    import lowvram.runtime as runtime

    root, lora = tiny_ckpt
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(tmp_path))  # a cached prompt would not load umT5 at all
    loaded = []
    for module, name in ((text, "load_t5_encoder"), (vae, "load_wan_vae")):
        def spy(*a, _real=getattr(module, name), **kw):
            obj = _real(*a, **kw)
            loaded.append(weakref.ref(obj if isinstance(obj, torch.nn.Module) else obj.model))
            return obj
        monkeypatch.setattr(module, name, spy)

    class Wav2Vec(audio.Wav2Vec2Encoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            loaded.append(weakref.ref(self))
    monkeypatch.setattr(audio, "Wav2Vec2Encoder", Wav2Vec)
    monkeypatch.setattr(vae.WanVAE, "encode_motion", vae.WanVAE.encode_reference)  # 1 frame, not 73 (CPU time)
    at_release = []
    monkeypatch.setattr(runtime, "release_gpu", lambda device: at_release.append([r() is None for r in loaded]))
    gc.disable()  # reference counting only: what it does not free would stay on the GPU until a collection
    try:
        opts = RunOptions(model_dir=root, image=root / "face.png", audio=root / "speech.wav", prompt="a baker talks",
                          output=None, lora=lora, size="128*128", device="cpu", t5_device="cpu")
        runtime.prepare_conditioning(opts, find_components(opts), "cpu")
    finally:
        gc.enable()
    assert at_release == [[True, True, True]]


# ----- gloo point-to-point through host buffers --------------------------------------------------------------


def wire_tensors():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g)
    return [x.t().to(torch.bfloat16), torch.arange(7, dtype=torch.int64), x[:, 1:3]]  # two non-contiguous views


def channel_worker(rank, world, out_queue):
    from lowvram.parallel.engine import Channel

    ch = Channel("cpu", staged=True)
    sent = wire_tensors()
    if rank == 0:
        ch.send(sent, 1)
        ch.flush()
        return None
    got = ch.recv([(tuple(t.shape), t.dtype) for t in sent], 0)
    same = all(a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b) for a, b in zip(got, sent))
    out_queue.put(("result", rank, same))
    return None


def test_staged_channel_delivers_exact_tensors_over_gloo():
    results = []
    spawn(channel_worker, (), 2, "gloo", lambda kind, rank, payload: kind == "result" and results.append(payload))
    assert results == [True]


# ----- one layout, from plan to every rank ---------------------------------------------------------------------


@pytest.mark.parametrize("gpus,kv", [("1x24", "fp8"), ("1x24", "bf16"), ("2x24", "fp8"), ("4x24", "bf16"),
                                     ("4x24", "fp8"), ("8x24", "bf16")])
def test_the_ranks_get_the_layout_plan_printed(monkeypatch, gpus, kv):
    """`lowvram plan` and `lowvram run` with the same --gpus: every rank's spec carries the layout plan chose (tp,
    pp, its stage split, the offload mode), each rank's allocator cap is plan's, and the launcher decodes on the GPU
    plan gave the VAE decoder; where plan finds nothing that fits, run refuses too."""
    import lowvram.plan as plan

    fake_gpus(monkeypatch, int(gpus.split("x")[0]))
    monkeypatch.setattr(plan, "model_source", lambda model_dir: (s2v_14b(), None, "int8"))
    report = plan.plan_report("a quantized folder", gpus, "704*384", kv, "pcie", None, "rtx4090")
    if report["chosen"] is None:
        with pytest.raises(DoesNotFitError):
            layout_for(gpus, kv=kv)
        return
    printed = next(row for row in report["layouts"] if row["name"] == report["chosen"])
    layout, placement = layout_for(gpus, kv=kv)
    assert layout.name == printed["name"] and layout.mode == printed["mode"]
    opts = RunOptions(model_dir=None, image=None, audio=None, prompt="", output=None, gpus=gpus, kv=kv)
    spec = worker_spec(opts, comps_14b(), layout, placement, "cuda", "inputs.pt")
    assert (spec.tp, spec.pp, spec.stages) == (printed["tp"], printed["pp"], printed["stages"])
    assert spec.memory_caps == printed["allocator_caps"] and len(spec.gpus) == printed["tp"] * printed["pp"]
    vae_rank = next(r for r, m in enumerate(printed["per_gpu_bytes"]) if "vae_decode" in m)
    assert decode_device("cuda", layout, placement) == f"cuda:{spec.gpus[vae_rank]}"
