"""Pictures of scenes and of what models make of them.

    camera.py    look-at camera (perspective, orthographic) and the oblique / top-down views
    raster.py    point splatting with a depth buffer, edge shading, line segments
    palette.py   point colourings (rgb, semantic, instance) and box roles
    render.py    one view: points, boxes and label anchors as an image array
    figure.py    panels, title, labels and legend composed with matplotlib (Agg), saved atomically
    pictures.py  a scene, a referral and a model's choice; segmentation against ground truth
    predict.py   a model's choice for a sentence and its per-point classes for one scene (torch)
    ply.py       coloured PLY point clouds and box line sets
    summary.py   the `inspect --plot` figure
    gallery.py   the demo's gallery
"""
from .camera import Camera, oblique_camera, top_down_camera
from .pictures import COLOR_MODES, ViewConfig, draw_scene, draw_segmentation
from .raster import splat

__all__ = ["COLOR_MODES", "Camera", "ViewConfig", "draw_scene", "draw_segmentation", "oblique_camera", "splat",
           "top_down_camera"]
