"""Evaluation: grounding metrics (Nr3D, Sr3D, ScanRefer), segmentation mIoU, pre-training retrieval."""
