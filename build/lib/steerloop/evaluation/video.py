"""Episode videos: the car's camera beside the top-down map, written with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

PANEL = 320  # [px] height of the video and side of the top-down panel
FPS = 20


def compose_frame(camera: np.ndarray, top_down: np.ndarray, caption: str = "") -> np.ndarray:
    """(PANEL, W, 3) uint8 RGB: the camera image scaled to the panel height beside the map."""
    h, w = camera.shape[:2]
    width = int(round(w * PANEL * 0.75 / h))
    cam = cv2.resize(camera, (width, int(PANEL * 0.75)), interpolation=cv2.INTER_NEAREST)
    left = np.zeros((PANEL, width, 3), np.uint8)
    left[: cam.shape[0]] = cam
    if caption:
        cv2.putText(left, caption, (8, PANEL - 24), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    top = cv2.resize(top_down, (PANEL, PANEL), interpolation=cv2.INTER_AREA)
    return np.concatenate([left, top], axis=1)


class VideoWriter:
    """Append RGB frames; writes an MP4 (mp4v) when closed."""

    def __init__(self, path: str | Path, fps: int = FPS):
        self.path = Path(path)
        self.fps = fps
        self._writer = None

    def append(self, frame: np.ndarray) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = frame.shape[:2]
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                raise OSError(f"could not open {self.path} for writing a video (is the directory writable?)")
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
