"""A least-recently-used store of encoded slices, bounded by memory rather than count."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from .model.encoder import ImageFeatures


def _nbytes(features: ImageFeatures) -> int:
    return sum(t.numel() * t.element_size() for t in (features.embedding, *features.skips))


class FeatureCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, ImageFeatures] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: int) -> Optional[ImageFeatures]:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: int, features: ImageFeatures) -> None:
        if key in self._items:
            self.nbytes -= _nbytes(self._items.pop(key))
        # Clone so a cached slice does not keep its whole encoding batch alive.
        features = ImageFeatures(features.embedding.clone(), tuple(s.clone() for s in features.skips))  # type: ignore[arg-type]
        self._items[key] = features
        self.nbytes += _nbytes(features)
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= _nbytes(evicted)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
