"""Training data: the dataset format (format.py), raw footage to a dataset (prepare.py), the precomputed cache
(precompute.py) and the dataset of n-segment sequences that train.py reads (dataset.py); docs/dataset.md."""

from .dataset import EpochSampler, SequenceDataset, batch_stream, sample_seed
from .format import (
    ITEMS_DIR,
    MANIFEST_FILE,
    METADATA_FILE,
    NULL_FILE,
    SEGMENT_SECONDS,
    SHAPE_FIELDS,
    DatasetError,
    SegmentInfo,
    VideoRecord,
    check_manifest,
    item_path,
    num_pixel_frames,
    parse_record,
    read_manifest,
    read_metadata,
    shape_fields,
    write_metadata,
)

__all__ = [
    "ITEMS_DIR", "MANIFEST_FILE", "METADATA_FILE", "NULL_FILE", "SEGMENT_SECONDS", "SHAPE_FIELDS", "DatasetError",
    "EpochSampler", "SegmentInfo", "SequenceDataset", "VideoRecord", "batch_stream", "check_manifest", "item_path",
    "num_pixel_frames", "parse_record", "read_manifest", "read_metadata", "sample_seed", "shape_fields",
    "write_metadata",
]
