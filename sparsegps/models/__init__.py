"""The model: sparse U-Net backbone, instance pooling, spatial transformer, text and grounding
encoders (`gps.GPSModel`), and segmentation heads (`seg_heads`)."""
