"""The one class-names policy: a checkpoint's own names; ImageNet-1k's for a 1000-class head
without names; else '0', '1', ... The names of a data set come from the data set."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from timm.data import ImageNetInfo

from .images import DataError

__all__ = ['class_names_for', 'dataset_class_names']


def class_names_for(num_classes: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """The checkpoint's class names; ImageNet-1k names for 1000 classes without; else '0', '1', ..."""
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    if num_classes == 1000:
        return [d.split(',')[0] for d in ImageNetInfo().label_descriptions()]  # ships with timm, offline
    return [str(i) for i in range(num_classes)]


def dataset_class_names(ds: Any) -> List[str]:
    """Class names of a data set in label order (`classes`, or its reader's / own `class_to_idx`)."""
    if hasattr(ds, 'classes'):
        return [str(c) for c in ds.classes]
    for owner in (getattr(ds, 'reader', None), ds):
        mapping = getattr(owner, 'class_to_idx', None)
        if mapping is not None:
            return [c for c, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    raise DataError('could not find the class names of this data set')
