import sys
from pathlib import Path

import pytest

# Let test modules import the shared helpers in this folder (tests/fixtures.py).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """The prompt cache and the record of verified files go to a folder of this session, not the user's
    ~/.cache (the CLI runs in subprocesses inherit it)."""
    import os

    folder = tmp_path_factory.mktemp("user-cache")
    old = os.environ.get("LOWVRAM_CACHE_DIR")
    os.environ["LOWVRAM_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("LOWVRAM_CACHE_DIR", None)
    else:
        os.environ["LOWVRAM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The demo's tiny Wan2.2-S2V-shaped folder (DiT shards, LoRA, umT5, VAE, wav2vec2) with a face and a speech
    file: (folder, LoRA path). Shared by the tests that run the CLI on it; treat it as read-only."""
    from lowvram.demo import face_like_image, speech_like_wave, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    lora = write_tiny_checkpoint(root)
    face_like_image(root / "face.png", 128, 128)
    speech_like_wave(root / "speech.wav", 1.6, seed=1)
    return root, lora
