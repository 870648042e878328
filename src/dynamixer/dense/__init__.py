"""Dense prediction on DynaMixer: a feature pyramid for torchvision's detectors, a light semantic
segmentation model, the user's own data (COCO JSON + images, image + class-index mask folders),
COCO AP / mIoU scoring, and the digits detection data set that benchmarks them (docs/dense.md)."""
from .backbone import DenseError, PyramidBackbone, detector_kwargs, pyramid_backbone
from .coco import CocoDetection
from .detectors import DETECTORS, build_detector
from .digits_coco import write_digits_coco
from .digits_detection import DigitsDetection, collate_detection, digits_detection_splits, validate_targets
from .evaluation import CocoEvaluator, SegmentationMetrics
from .mask_folder import MaskFolder, read_class_names
from .segmentation import SegmentationModel, SemanticHead, segmentation_model

__all__ = ['DenseError', 'PyramidBackbone', 'detector_kwargs', 'pyramid_backbone', 'DigitsDetection',
           'collate_detection', 'digits_detection_splits', 'validate_targets', 'SegmentationModel',
           'SemanticHead', 'segmentation_model', 'DETECTORS', 'build_detector', 'CocoDetection', 'MaskFolder',
           'read_class_names', 'write_digits_coco', 'CocoEvaluator', 'SegmentationMetrics']
