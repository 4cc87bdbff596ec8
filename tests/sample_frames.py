"""sample.py that also saves the frames it encodes, for comparisons that H.264 would blur.

    [torchrun --nproc_per_node P] tests/sample_frames.py FRAMES.npy [sample.py arguments]

libx264's output is not bit-reproducible from run to run here (two runs of the same frames decode up to 16/255
apart), so tests compare the frames handed to the encoder: float32 in [0, 1], (F, H, W, 3).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.video_io as video_io  # noqa: E402
import sample  # noqa: E402


def main() -> int:
    frames_path, argv = sys.argv[1], sys.argv[2:]
    write_video = video_io.write_video

    def write_and_save(frames, path, fps, *args, **kwargs):
        np.save(frames_path, np.asarray(frames, dtype=np.float32))
        return write_video(frames, path, fps, *args, **kwargs)

    video_io.write_video = write_and_save  # sample.main imports it from the module at call time
    return sample.main(argv)


if __name__ == "__main__":
    sys.exit(main())
