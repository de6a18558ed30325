"""xmr data: manifest, shard writer, storage (local + s3) and the training reader.

Import the submodules directly (``xmr.data.writer``, ``xmr.data.reader``); this package
re-exports the few names most callers need.
"""

from xmr.data.manifest import (SCHEMA_VERSION, LabelSpec, Manifest, ManifestError, ModalitySpec, ShardInfo,
                               SplitInfo, load_manifest)
from xmr.data.writer import DatasetWriter, SampleError, SplitWriter

__all__ = ["SCHEMA_VERSION", "DatasetWriter", "LabelSpec", "Manifest", "ManifestError", "ModalitySpec",
           "SampleError", "ShardInfo", "SplitInfo", "SplitWriter", "load_manifest"]
