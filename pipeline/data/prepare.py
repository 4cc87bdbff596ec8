"""Turn raw footage or captioned clips into a dataset folder (docs/dataset.md).

    python -m pipeline.data.prepare scenes RAW_DIR OUT_DIR [--threshold 27] [--detector content|none]
    python -m pipeline.data.prepare captions CLIPS_DIR [--csv captions.csv --video-column video --text-column caption]

`scenes`: every video under RAW_DIR is split into scenes at its cuts (PySceneDetect's ContentDetector; --detector
none keeps each file as one scene), each scene is trimmed to its longest centred run of whole 3-s segments (scenes
shorter than 3 s are dropped), and the kept runs are written back to back as OUT_DIR/videos/<name>.mp4 at the source
frame rate and size. metadata.jsonl gets one line per video with consecutive segments, `scene_start` where a scene
begins and empty texts, ready for captioning.

`captions`: clips that already carry a caption — a <clip>.txt next to each <clip>.mp4, or a CSV with a video and a
caption column — become metadata.jsonl in CLIPS_DIR: each clip is one scene of floor(duration / 3) segments, every
segment with the clip's caption.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

import av

from ..atomic import atomic_path
from .format import SEGMENT_SECONDS, DatasetError, SegmentInfo, VideoRecord, write_metadata

logger = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
SCENEDETECT_HINT = ("scene detection needs PySceneDetect (it brings OpenCV): pip install scenedetect==0.7.2; "
                    "or pass --detector none to keep every file as one scene")


def probe(path: str | os.PathLike) -> tuple[Fraction, int]:
    """(frame rate, number of frames) of a video file, counting frames by decoding when the header has none."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.base_rate
        if rate is None:
            raise DatasetError(f"{path}: the video stream has no frame rate")
        frames = stream.frames or sum(1 for _ in container.decode(stream))
    return Fraction(rate), frames


def detect_scenes(path: str | os.PathLike, detector: str = "content", threshold: float = 27.0
                  ) -> list[tuple[int, int]]:
    """Scenes as [start, end) frame ranges. detector: "content" (PySceneDetect) or "none" (the whole file)."""
    rate, frames = probe(path)
    if detector == "none":
        return [(0, frames)]
    if detector != "content":
        raise ValueError(f"detector must be 'content' or 'none', got {detector!r}")
    try:
        from scenedetect import ContentDetector, detect
    except ImportError:
        raise DatasetError(SCENEDETECT_HINT) from None
    # the detector's default minimum scene length (15 frames) only merges flashes; a larger one would merge short
    # scenes into their neighbours and so let a kept segment straddle a cut (short scenes are dropped later)
    scenes = detect(os.fspath(path), ContentDetector(threshold=threshold), backend="pyav", start_in_scene=True)
    return [(start.frame_num, end.frame_num) for start, end in scenes]


def whole_segments(scenes: list[tuple[int, int]], rate: Fraction) -> list[tuple[int, int, int]]:
    """For each scene long enough, (first frame, frame count, segments): the centred run of whole 3-s segments."""
    kept = []
    for start, end in scenes:
        segments = math.floor((end - start) / rate / SEGMENT_SECONDS + 1e-9)
        if segments == 0:
            continue
        count = round(segments * SEGMENT_SECONDS * rate)
        kept.append((start + (end - start - count) // 2, count, segments))
    return kept


def cut_scenes(source: str | os.PathLike, out: str | os.PathLike, runs: list[tuple[int, int, int]],
               crf: int = 18) -> None:
    """Write the frames of `runs` ((first frame, count, segments)) back to back as an H.264 mp4 at the source
    rate and size (cropped by one pixel where a side is odd); written under a temporary name, then renamed."""
    rate, _ = probe(source)
    wanted = sorted(i for first, count, _ in runs for i in range(first, first + count))
    with atomic_path(out, suffix=".mp4.tmp") as tmp:
        with av.open(os.fspath(source)) as src, av.open(os.fspath(tmp), mode="w", format="mp4") as dst:
            stream_in = src.streams.video[0]
            stream_out = dst.add_stream("libx264", rate=rate)
            stream_out.width, stream_out.height = stream_in.width // 2 * 2, stream_in.height // 2 * 2
            stream_out.pix_fmt, stream_out.options = "yuv420p", {"crf": str(crf)}
            position = 0
            for index, frame in enumerate(src.decode(stream_in)):
                if position == len(wanted):
                    break
                if index != wanted[position]:
                    continue
                position += 1
                image = frame.to_ndarray(format="rgb24")[:stream_out.height, :stream_out.width]
                dst.mux(stream_out.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            dst.mux(stream_out.encode())
        if position != len(wanted):
            raise DatasetError(f"{source}: ended after {position} of the {len(wanted)} frames to keep")


def prepare_scenes(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, detector: str = "content",
                   threshold: float = 27.0) -> list[VideoRecord]:
    """The `scenes` command (module docstring). Returns the records written to out_dir/metadata.jsonl."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    sources = sorted(p for p in raw_dir.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not sources:
        raise DatasetError(f"{raw_dir}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    records, dropped = [], 0
    for source in sources:
        try:
            rate, _ = probe(source)
            scenes = detect_scenes(source, detector, threshold)
        except (av.FFmpegError, OSError) as e:
            logger.warning("skipping %s: %s", source, e)
            dropped += 1
            continue
        runs = whole_segments(scenes, rate)
        if not runs:
            logger.warning("skipping %s: no scene of %g s or more", source, SEGMENT_SECONDS)
            dropped += 1
            continue
        name = Path("videos") / source.relative_to(raw_dir).with_suffix(".mp4")
        cut_scenes(source, out_dir / name, runs)
        segments: list[SegmentInfo] = []
        for _, _, count in runs:
            for k in range(count):
                segments.append(SegmentInfo(start=SEGMENT_SECONDS * len(segments), text="", scene_start=k == 0))
        records.append(VideoRecord(video=name.as_posix(), fps=float(rate), segments=tuple(segments)))
        logger.info("%s: %d scenes kept of %d, %d segments", source, len(runs), len(scenes), len(segments))
    write_metadata(out_dir, records)
    logger.info("wrote %s: %d videos (%d skipped)", out_dir / "metadata.jsonl", len(records), dropped)
    return records


def prepare_captions(clips_dir: str | os.PathLike, csv_path: str | os.PathLike | None = None,
                     video_column: str = "video", text_column: str = "caption") -> list[VideoRecord]:
    """The `captions` command (module docstring). Returns the records written to clips_dir/metadata.jsonl."""
    clips_dir = Path(clips_dir)
    if not clips_dir.is_dir():
        raise DatasetError(f"{clips_dir}: not a folder of clips")
    if csv_path is not None and not Path(csv_path).is_file():
        raise DatasetError(f"{csv_path}: CSV file not found")
    if csv_path is None:
        pairs = [(p.relative_to(clips_dir), p.with_suffix(".txt").read_text().strip())
                 for p in sorted(clips_dir.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES
                 and p.with_suffix(".txt").is_file()]
    else:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in (video_column, text_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{csv_path}: no column {missing[0]!r}; columns: {reader.fieldnames}")
            pairs = [(Path(row[video_column]), row[text_column].strip()) for row in reader]
    records = []
    for video, text in pairs:
        path = clips_dir / video
        if not path.is_file():
            raise DatasetError(f"{path}: video file not found (listed in {csv_path or 'the clips folder'})")
        rate, frames = probe(path)
        count = math.floor(frames / rate / SEGMENT_SECONDS + 1e-9)
        if count == 0:
            logger.warning("skipping %s: shorter than %g s", path, SEGMENT_SECONDS)
            continue
        segments = tuple(SegmentInfo(start=SEGMENT_SECONDS * k, text=text, scene_start=k == 0) for k in range(count))
        records.append(VideoRecord(video=video.as_posix(), fps=float(rate), segments=segments))
    write_metadata(clips_dir, records)
    logger.info("wrote %s: %d clips", clips_dir / "metadata.jsonl", len(records))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scenes = commands.add_parser("scenes", help="raw footage → scenes → whole 3-s segments, empty texts")
    scenes.add_argument("raw_dir")
    scenes.add_argument("out_dir")
    scenes.add_argument("--detector", choices=("content", "none"), default="content")
    scenes.add_argument("--threshold", type=float, default=27.0, help="ContentDetector threshold (lower: more cuts)")
    captions = commands.add_parser("captions", help="captioned clips (.txt beside each, or a CSV) → metadata.jsonl")
    captions.add_argument("clips_dir")
    captions.add_argument("--csv", help="CSV file with a video path (relative to clips_dir) and a caption per row")
    captions.add_argument("--video-column", default="video")
    captions.add_argument("--text-column", default="caption")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "scenes":
        prepare_scenes(args.raw_dir, args.out_dir, args.detector, args.threshold)
    else:
        prepare_captions(args.clips_dir, args.csv, args.video_column, args.text_column)


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        sys.exit(f"prepare: error: {e}")
