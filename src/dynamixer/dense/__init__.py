"""Dense prediction on DynaMixer: a feature pyramid for torchvision's detectors, a light semantic
segmentation model, and the digits detection data set that benchmarks them (docs/dense.md)."""
from .backbone import DenseError, PyramidBackbone, detector_kwargs, pyramid_backbone

__all__ = ['DenseError', 'PyramidBackbone', 'detector_kwargs', 'pyramid_backbone']
