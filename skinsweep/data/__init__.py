"""Data layer: dataset readers, split manifests, image cache, transforms and synthetic lesions."""

from skinsweep.data.cache import ImageCache, build_cache, decode_resize
from skinsweep.data.index import DatasetIndex, load_index, read_rgb
from skinsweep.data.split import SplitManifest, get_or_create_split, make_split

__all__ = [
    "DatasetIndex", "ImageCache", "SplitManifest", "build_cache", "decode_resize", "get_or_create_split",
    "load_index", "make_split", "read_rgb",
]
