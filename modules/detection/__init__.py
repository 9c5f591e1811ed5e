"""Object detection: ``ObjectDetector`` over torchvision, transformers and mmdet detectors, COCO data, COCO mAP."""
