"""Dense prediction on DynaMixer: a feature pyramid for torchvision's detectors, a light semantic
segmentation model, and the digits detection data set that benchmarks them (docs/dense.md)."""
from .backbone import DenseError, PyramidBackbone, detector_kwargs, pyramid_backbone
from .digits_detection import DigitsDetection, collate_detection, digits_detection_splits, validate_targets
from .segmentation import SegmentationModel, SemanticHead, segmentation_model

__all__ = ['DenseError', 'PyramidBackbone', 'detector_kwargs', 'pyramid_backbone', 'DigitsDetection',
           'collate_detection', 'digits_detection_splits', 'validate_targets', 'SegmentationModel',
           'SemanticHead', 'segmentation_model']
