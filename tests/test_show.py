"""Pictures of scenes: the camera model against hand-computed projections, splatting with a depth
buffer, box outlines, PLY round trips, the `show` and `inspect --plot` commands, a tiny overfit
model's choice in the picture, and the demo's gallery."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sparsegps import cli
from sparsegps.data import Scene, SceneObject, SceneStore, SceneText, write_scenes
from sparsegps.viz.camera import Camera, look_at, oblique_camera, top_down_camera
from sparsegps.viz.palette import CLASS_COLORS, TARGET, WRONG_CHOICE
from sparsegps.viz.raster import splat
from sparsegps.viz.render import BoxMark, render_panel

from helpers import TINY_MODEL, VOCAB, losses, make_scene, tiny_model_config
from sparsegps.exports import load_model

RED, GREY, BLUE = (220, 20, 20), (128, 128, 128), (20, 20, 220)


def cube_surface(center, size, step) -> np.ndarray:
    """Points on the six faces of an axis-aligned box, `step` apart."""
    lo, hi = np.asarray(center) - np.asarray(size) / 2, np.asarray(center) + np.asarray(size) / 2
    axes = [np.arange(lo[k], hi[k] + 1e-9, step) for k in range(3)]
    faces = []
    for k in range(3):
        a, b = [axes[j] for j in range(3) if j != k]
        ga, gb = (g.ravel() for g in np.meshgrid(a, b))
        for value in (lo[k], hi[k]):
            face = np.empty((len(ga), 3))
            face[:, k] = value
            face[:, [j for j in range(3) if j != k]] = np.stack([ga, gb], axis=1)
            faces.append(face)
    return np.concatenate(faces).astype(np.float32)


def cube_scene() -> Scene:
    """A grey floor [-2, 2]^2 at z = 0 and a red 0.5 m cube standing on it at (0.5, 0.5)."""
    g = np.arange(-2, 2.001, 0.05)
    fx, fy = (a.ravel() for a in np.meshgrid(g, g))
    floor = np.stack([fx, fy, np.zeros_like(fx)], axis=1).astype(np.float32)
    cube = cube_surface((0.5, 0.5, 0.25), (0.5, 0.5, 0.5), 0.025)
    xyz = np.concatenate([floor, cube])
    rgb = np.concatenate([np.tile(GREY, (len(floor), 1)), np.tile(RED, (len(cube), 1))]).astype(np.uint8)
    instance = np.concatenate([np.zeros(len(floor)), np.ones(len(cube))]).astype(np.int32)
    semantic = np.concatenate([np.ones(len(floor)), np.full(len(cube), 2)]).astype(np.int16)  # floor, chair
    objects = [SceneObject(0, "floor", (0, 0, 0), (4, 4, 0)), SceneObject(1, "chair", (0.5, 0.5, 0.25), (0.5, 0.5, 0.5))]
    return Scene("cube", xyz, rgb, instance, semantic, objects, [SceneText("referral", "the red cube", 1)])


def is_color(image, color) -> np.ndarray:
    return (image == np.asarray(color, np.uint8)).all(axis=-1)


def test_projection_matches_a_hand_computed_pinhole():
    """Eye at (0, -10, 0) looking along +y with z up: u = cx + f x / (y + 10), v = cy - f z / (y + 10)."""
    cam = Camera(np.array([0.0, -10.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]), 320, 240,
                 100.0, 160.0, 120.0)
    pts = np.array([[0, 0, 0], [1, 0, 0], [1, 5, -2], [-3, 2, 4], [0, -12, 0]], np.float64)
    u, v, depth = cam.project(pts)
    d = pts[:, 1] + 10
    np.testing.assert_allclose(u[:4], 160 + 100 * pts[:4, 0] / d[:4])
    np.testing.assert_allclose(v[:4], 120 - 100 * pts[:4, 2] / d[:4])
    np.testing.assert_allclose(depth, d)
    assert np.isnan(u[4]) and np.isnan(v[4])  # behind the eye
    forward, up = look_at((0, -10, 0), (0, 0, 0))
    np.testing.assert_allclose(forward, [0, 1, 0])
    np.testing.assert_allclose(up, [0, 0, 1])


@pytest.mark.parametrize("make", [oblique_camera, top_down_camera])
def test_fitted_views_frame_every_point(make):
    xyz = make_scene(np.random.default_rng(1), "s", 800, 4).xyz
    cam = make(xyz, 400, 300)
    u, v, _ = cam.project(xyz)
    assert np.isfinite(u).all()
    assert u.min() >= 0 and u.max() <= 400 and v.min() >= 0 and v.max() <= 300
    assert u.max() - u.min() > 300 or v.max() - v.min() > 225  # fills the frame along one axis


def test_red_cube_lands_where_the_camera_model_says_with_its_box_around_it():
    """Top-down orthographic camera by hand: u = 100 + 40 x, v = 100 - 40 y. The cube's top,
    x, y in [0.25, 0.75], must fill pixels u in [110, 130], v in [70, 90], and nothing red may
    fall outside (but for the 1-pixel radius of the splats); the box outline runs along that square."""
    scene = cube_scene()
    cam = Camera(np.array([0.0, 0.0, 10.0]), np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0]), 200, 200,
                 40.0, 100.0, 100.0, "orthographic")
    box = BoxMark(scene.objects[1].center, scene.objects[1].size, TARGET, "chair", thickness=0)
    panel = render_panel(scene.xyz, scene.rgb, cam, [box], spacing=0.025, shade=False)  # discs of 1 pixel radius
    red = is_color(panel.image, RED)
    inside = red[72:89, 112:129]  # the square less the outline's pixels
    assert inside.mean() > 0.95
    rows, cols = np.nonzero(red)
    assert rows.min() >= 69 and rows.max() <= 91 and cols.min() >= 109 and cols.max() <= 131
    assert is_color(panel.image[100:140, 20:60], GREY).mean() > 0.95  # the floor elsewhere
    outline = is_color(panel.image, TARGET)
    for v in range(72, 89):
        assert outline[v, 110] and outline[v, 130]  # left and right edges
    for u in range(112, 129):
        assert outline[70, u] and outline[90, u]  # top and bottom edges
    assert not outline[75:86, 115:126].any()  # an outline, not a filled box
    assert [(round(a.u), round(a.v), a.text) for a in panel.labels] == [(120, 70, "chair")]


def test_near_points_hide_far_ones_whatever_their_order():
    """Two overlapping squares seen by a perspective camera: the near (blue) one wins where they
    overlap, the far (red) one shows where it is not covered; shuffling the points changes nothing."""
    cam = Camera(np.array([0.0, -10.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]), 200, 200,
                 200.0, 100.0, 100.0)
    g = np.arange(-1, 1.001, 0.02)
    gx, gz = (a.ravel() for a in np.meshgrid(g, g))
    near = np.stack([gx - 0.5, np.zeros_like(gx), gz], axis=1)  # depth 10, x in [-1.5, 0.5]
    far = np.stack([gx * 1.2 + 0.6, np.full_like(gx, 2.0), gz * 1.2], axis=1)  # depth 12, same size on screen
    xyz = np.concatenate([far, near])
    colors = np.concatenate([np.tile(RED, (len(far), 1)), np.tile(BLUE, (len(near), 1))]).astype(np.uint8)
    u, v, depth = cam.project(xyz)
    first = splat(u, v, depth, colors, 200, 200, radius=1)
    # near square: u in 100 + 20 * [-1.5, 0.5] = [70, 110]; far: 100 + 200 * [-0.6, 1.8] / 12 = [90, 130]
    assert is_color(first.image[90:111, 95:108], BLUE).all()  # overlap
    assert is_color(first.image[90:111, 114:128], RED).all()  # far square beside the near one
    assert is_color(first.image[90:111, 72:88], BLUE).all()
    np.testing.assert_allclose(first.depth[100, 100], 10.0)
    order = np.random.default_rng(0).permutation(len(xyz))
    second = splat(u[order], v[order], depth[order], colors[order], 200, 200, radius=1)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.depth, second.depth)


def test_ply_round_trips_points_colours_and_boxes(tmp_path):
    from plyfile import PlyData

    from sparsegps.viz.ply import write_boxes_ply, write_points_ply

    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(500, 3)).astype(np.float32)
    colors = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    write_points_ply(tmp_path / "p.ply", xyz, colors)
    vertex = PlyData.read(str(tmp_path / "p.ply"))["vertex"]
    np.testing.assert_array_equal(np.stack([vertex[a] for a in "xyz"], axis=1), xyz)
    np.testing.assert_array_equal(np.stack([vertex[c] for c in ("red", "green", "blue")], axis=1), colors)
    boxes = [BoxMark(np.array([0, 0, 0]), np.array([2, 4, 6]), TARGET), BoxMark(np.array([5, 5, 5]), np.ones(3), RED)]
    write_boxes_ply(tmp_path / "b.ply", boxes)
    ply = PlyData.read(str(tmp_path / "b.ply"))
    corners = np.stack([ply["vertex"][a] for a in "xyz"], axis=1)
    edges = np.stack([ply["edge"]["vertex1"], ply["edge"]["vertex2"]], axis=1)
    assert corners.shape == (16, 3) and edges.shape == (24, 2)
    np.testing.assert_array_equal(corners[:8].min(0), [-1, -2, -3])
    np.testing.assert_array_equal(corners[:8].max(0), [1, 2, 3])
    lengths = np.linalg.norm(corners[edges[:12, 0]] - corners[edges[:12, 1]], axis=1)
    assert sorted(lengths.tolist()) == [2.0] * 4 + [4.0] * 4 + [6.0] * 4  # the 12 edges of the box
    assert (edges[12:] >= 8).all()
    assert ply["edge"]["red"].tolist() == [TARGET[0]] * 12 + [RED[0]] * 12
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("show-data")
    write_scenes([make_scene(rng, f"s{i}", 600, 4) for i in range(3)], root / "data", vocabulary=VOCAB,
                 progress=False)
    return root / "data"


def png_pixels(path) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(np.uint8)


def test_show_draws_a_referral_and_writes_the_same_colours_as_ply(store_dir, tmp_path, capsys):
    from plyfile import PlyData

    scene = SceneStore(store_dir)[1]
    k = next(i for i, t in enumerate(scene.texts) if t.kind == "referral")
    out, ply = tmp_path / "pic.png", tmp_path / "scene.ply"
    assert cli.main(["show", str(store_dir), "--scene", "s1", "--text", str(k), "--color", "semantic",
                     "--out", str(out), "--ply", str(ply)]) == 0
    image = png_pixels(out)
    assert image.shape[1] >= 1200
    assert is_color(image, TARGET).sum() > 50  # the target's box
    assert not is_color(image, WRONG_CHOICE).any()  # no model, no choice
    vertex = PlyData.read(str(ply))["vertex"]
    expected = np.array([CLASS_COLORS[VOCAB[c]] if c >= 0 else (200, 200, 200) for c in scene.semantic], np.uint8)
    np.testing.assert_array_equal(np.stack([vertex[c] for c in ("red", "green", "blue")], axis=1), expected)
    np.testing.assert_array_equal(np.stack([vertex[a] for a in "xyz"], axis=1), scene.xyz)
    edges = PlyData.read(str(tmp_path / "scene.boxes.ply"))["edge"]
    assert len(edges) == 12 * (1 + len(scene.texts[k].distractor_ids))
    assert "wrote" in capsys.readouterr().out


def test_show_names_what_is_wrong(store_dir, tmp_path, capsys):
    assert cli.main(["show", str(store_dir), "--scene", "nope", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "s0" in err
    assert cli.main(["show", str(store_dir), "--scene", "s0", "--text", "999", "--out", str(tmp_path / "x.png")]) == 2
    assert "text" in capsys.readouterr().err
    assert cli.main(["show", str(store_dir), "--scene", "s0", "--color", "prediction"]) == 2
    assert "segmentation export" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_inspect_plot(store_dir, tmp_path):
    from sparsegps.viz.summary import per_scene_counts

    out = tmp_path / "inspect.png"
    assert cli.main(["inspect", str(store_dir), "--plot", "--plot-out", str(out)]) == 0
    assert png_pixels(out).shape[1] >= 1200
    store = SceneStore(store_dir)
    counts = per_scene_counts(store_dir)
    scenes = [store[i] for i in range(len(store))]
    assert counts["points"].tolist() == [s.num_points for s in scenes]
    assert counts["objects"].tolist() == [len(s.objects) for s in scenes]
    assert counts["referral"].tolist() == [sum(t.kind == "referral" for t in s.texts) for s in scenes]
    assert counts["scene_caption"].tolist() == [1, 1, 1]


def test_big_scan_renders(tmp_path):
    """150k points through the whole picture path (timing is measured in the report, not here)."""
    from sparsegps.viz.pictures import draw_scene

    rng = np.random.default_rng(0)
    scene = make_scene(rng, "big", 150_000, 12)
    draw_scene(scene, VOCAB, tmp_path / "big.png", "instance", text_index=2)
    assert png_pixels(tmp_path / "big.png").shape[1] == 1800


GROUNDING_ONLY = {"object_text": 0.0, "scene_text": 0.0, "referral_object": 0.0, "grounding": 1.0, "mlm": 0.0}
VOXEL = 0.15


@pytest.fixture(scope="module")
def exports(store_dir, tmp_path_factory):
    """A tiny GPS model overfit on the grounding loss of the stored scenes, and an untrained tiny
    segmentation model, saved as exports."""
    import torch

    from sparsegps.config import from_dict, to_dict
    from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes
    from sparsegps.models.gps import GPSModel, ModelConfig
    from sparsegps.models.seg_heads import SegmentationModel, SegModelConfig
    from sparsegps.exports import EXPORT_FORMAT, ExportInfo, save_export

    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    cfg = tiny_model_config(loss=GROUNDING_ONLY)
    model = GPSModel(cfg)
    data = ScenesDataset(store_dir, TransformConfig(voxel_size=VOXEL, augment=False))
    batch = collate_scenes([data[i] for i in range(len(data))])
    params = [p for n, p in model.named_parameters() if not n.startswith("text.")]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(40):
        loss = losses(model, batch)["loss_grounding"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    grounding = save_export(root / "ground.safetensors", model.state_dict(),
                            ExportInfo("pretraining", to_dict(cfg), voxel_size=VOXEL))
    seg_cfg = from_dict(SegModelConfig, {"backbone": TINY_MODEL["backbone"]})
    seg = SegmentationModel(seg_cfg, VOCAB)
    # a segmentation export of an earlier version: pickled, its keys inside a loss wrapper's "model."
    segmentation = root / "seg.pt"
    torch.save({"format": EXPORT_FORMAT, "state_dict": {f"model.{k}": v for k, v in seg.state_dict().items()},
                "model_config": to_dict(seg_cfg), "voxel_size": VOXEL, "task": "segmentation",
                "vocabulary": VOCAB}, segmentation)
    return grounding, segmentation


@pytest.mark.slow
def test_checkpoint_choice_is_drawn(store_dir, exports, tmp_path, capsys):
    """The overfit model's picks (by the evaluation code, an independent path) decide the picture:
    for a referral it gets right, the target's box and no wrong-choice box; for a forced wrong
    choice, the wrong-choice box."""
    from sparsegps.eval.grounding_model import predict_referrals
    from sparsegps.viz.pictures import draw_scene

    model, _ = load_model(exports[0])
    predictions = predict_referrals(model, store_dir, VOXEL, "cpu", progress=False)
    store = SceneStore(store_dir)
    right = [p for p in predictions if p.predicted_id == store[p.scene_index].texts[p.text_index].target_id]
    assert len(right) >= 0.75 * len(predictions)  # it did overfit (chance: 1 in 4)
    p = right[0]
    out = tmp_path / "right.png"
    assert cli.main(["show", str(store_dir), "--scene", p.scene_id, "--text", str(p.text_index), "--checkpoint",
                     str(exports[0]), "--out", str(out), "--device", "cpu"]) == 0
    assert "(right)" in capsys.readouterr().out
    image = png_pixels(out)
    assert is_color(image, TARGET).sum() > 50 and not is_color(image, WRONG_CHOICE).any()

    scene = store[p.scene_index]
    other = next(o.instance_id for o in scene.objects if o.instance_id != p.predicted_id)
    draw_scene(scene, VOCAB, tmp_path / "wrong.png", "rgb", p.text_index, choice=other)
    image = png_pixels(tmp_path / "wrong.png")
    assert is_color(image, WRONG_CHOICE).sum() > 50 and is_color(image, TARGET).sum() > 50


@pytest.mark.slow
def test_segmentation_export_draws_truth_against_prediction(store_dir, exports, tmp_path, capsys):
    import torch

    from sparsegps.viz.predict import segment_points

    out = tmp_path / "seg.png"
    assert cli.main(["show", str(store_dir), "--scene", "s2", "--checkpoint", str(exports[1]), "--out", str(out),
                     "--device", "cpu"]) == 0
    assert png_pixels(out).shape[1] >= 1200
    # per-point predictions are the voxel predictions of each point's voxel
    model, _ = load_model(exports[1])
    scene = SceneStore(store_dir)[2]
    points = segment_points(model, scene, VOXEL)
    from sparsegps.data import GridSample, collate_scenes
    from sparsegps.data.transforms import scene_to_sample

    sample = GridSample(VOXEL)(scene_to_sample(scene))
    sample["object_label_id"] = np.zeros(len(sample["objects"]), np.int64)
    with torch.no_grad():
        voxel_pred = model.eval()(collate_scenes([sample])).argmax(-1).numpy()
    np.testing.assert_array_equal(points, voxel_pred[sample["inverse"]])


@pytest.mark.slow
def test_gallery_follows_its_rule(store_dir, exports, tmp_path):
    """The demo's gallery step: pictures exist, and each picked referral's right/wrong matches the
    model's choice computed through `show`'s own path (GPSModel.forward)."""
    from sparsegps.viz.gallery import write_gallery
    from sparsegps.viz.predict import ground_text

    paths = write_gallery(tmp_path / "gallery", store_dir, exports[0], exports[1], right=2, wrong=2,
                          progress=False)
    index = json.loads((tmp_path / "gallery" / "index.json").read_text())
    assert [e["file"] for e in index["pictures"]] == [p.name for p in paths]
    assert all(p.exists() for p in paths) and paths[-1].name == "segmentation_s0.png"
    model, _ = load_model(exports[0])
    store = SceneStore(store_dir)
    referrals = [e for e in index["pictures"] if e["kind"] == "referral"]
    assert referrals and len({e["scene"] for e in referrals}) == len(referrals)  # one per scene
    for e in referrals:
        scene = store[store.scene_ids().index(e["scene"])]
        assert scene.texts[e["text_index"]].distractor_ids
        choice = ground_text(model, scene, e["text_index"], VOXEL)
        assert choice == e["predicted_id"]
        assert e["correct"] == (choice == scene.texts[e["text_index"]].target_id)


def test_oblique_view_cuts_the_near_walls_only():
    """Eye towards +x, -y (azimuth -60): the east and south walls are cut above 0.8 m, the west and
    north walls are not, and a tall object on the near side is never cut."""
    from sparsegps.viz.pictures import ViewConfig, oblique_visible

    h = np.array([0.2, 1.5, 2.5])
    walls = {"west": [(-2, 0, z) for z in h], "east": [(2, 0, z) for z in h], "south": [(0, -2, z) for z in h],
             "north": [(0, 2, z) for z in h]}
    xyz = np.array([p for pts in walls.values() for p in pts] + [(1.5, -1.5, 0.0), (1.5, -1.5, 2.0)], np.float32)
    instance = np.array([k for k in range(4) for _ in h] + [4, 4], np.int32)
    objects = [SceneObject(k, "wall", xyz[instance == k].mean(0), np.ptp(xyz[instance == k], 0)) for k in range(4)]
    objects.append(SceneObject(4, "cabinet", (1.5, -1.5, 1.0), (0.1, 0.1, 2.0)))
    scene = Scene("walls", xyz, np.zeros((len(xyz), 3), np.uint8), instance, np.zeros(len(xyz), np.int16), objects)
    visible = oblique_visible(scene, ViewConfig(azimuth=-60.0))
    assert visible.tolist() == [True] * 3 + [True, False, False] + [True, False, False] + [True] * 3 + [True, True]
    assert oblique_visible(scene, ViewConfig(cut_height=None)).all()
