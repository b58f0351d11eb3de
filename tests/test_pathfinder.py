"""Tests of the Pathfinder / Path-X generator, storage, release reader, configs and a run."""

import itertools
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import pathfinder as pathfinder_config
from configs import pathx as pathx_config
from lra import tasks
from lra.training import data, train
from lra.tasks import pathfinder, storage
from lra.tasks import pathfinder_generator as generator

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_train": 40, "num_val": 10, "num_test": 10, "seed": 5, "progress": False}


# --- independent references ---------------------------------------------------------

def point_segment(p, a, b):
    """Distance from point p to segment a-b (float64, plain formula)."""
    p, a, b = (np.asarray(v, np.float64) for v in (p, a, b))
    ab = b - a
    s = 0.0 if not ab.any() else np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0, 1)
    return float(np.linalg.norm(p - a - s * ab))


def segment_distance(s, t):
    """Distance between segments (y0, x0, y1, x1), 0 when they cross."""
    a, b, c, d = np.asarray(s[:2]), np.asarray(s[2:]), np.asarray(t[:2]), np.asarray(t[2:])

    def cross(o, p, q):
        return (p[0] - o[0]) * (q[1] - o[1]) - (p[1] - o[1]) * (q[0] - o[0])

    if cross(a, b, c) * cross(a, b, d) < 0 and cross(c, d, a) * cross(c, d, b) < 0:
        return 0.0
    return min(point_segment(a, c, d), point_segment(b, c, d), point_segment(c, a, b), point_segment(d, a, b))


def markers_connected(segments, markers, margin, params) -> bool:
    """Breadth-first search over the drawn geometry only (no contour ids): paddles closer
    than 2m + t/2 touch (neighbours on a contour are <= 2m apart, other contours >= 2m + t),
    a marker touches paddles within r + m/2 + t/2 and markers within 2r + m/2."""
    t, r = params.paddle_thickness, params.marker_radius
    nodes = [("paddle", s) for s in segments] + [("marker", m) for m in markers]

    def touching(u, v):
        (kind_u, u), (kind_v, v) = u, v
        if kind_u == kind_v == "paddle":
            return segment_distance(u, v) < 2 * margin + t / 2
        if kind_u == kind_v == "marker":
            return np.linalg.norm(np.subtract(u, v)) < 2 * r + margin / 2
        point, segment = (u, v) if kind_u == "marker" else (v, u)
        return point_segment(point, segment[:2], segment[2:]) < r + margin / 2 + t / 2

    start, goal = len(segments), len(segments) + 1
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        for other in range(len(nodes)):
            if other not in seen and touching(nodes[node], nodes[other]):
                seen.add(other)
                queue.append(other)
    return goal in seen


def turn(s, t) -> float:
    a = np.arctan2(s[2] - s[0], s[3] - s[1])
    b = np.arctan2(t[2] - t[0], t[3] - t[1])
    return abs((b - a + np.pi) % (2 * np.pi) - np.pi)


@pytest.fixture(scope="module", params=[32, 128])
def drawn(request):
    params = generator.PARAMS[request.param]
    count = 16 if request.param == 32 else 6
    images, labels, contours = generator.generate(count, params, np.random.default_rng(request.param))
    return params, images, labels, contours


# --- the generator --------------------------------------------------------------------

def test_published_parameters():
    # The LRA builders' docstrings (lra_benchmarks/data/pathfinder.py), Python 2 divisions.
    expected = {  # resolution: marker radius, paddle length, thickness, margins, continuity,
        32: (1.5, 2, 0.5, (1,), 1.0, 14, 4, 5, 7),  # distractors: 20 // 4
        64: (2.5, 5, 1.0, (1,), 1.8, 14, 4, 5, 12),  # 22 / 4
        128: (3.0, 5, 1.5, (2, 3), 1.8, 14, 4, 8, 20),  # 35 / 4
        256: (5.0, 5, 2.0, (3,), 1.8, 14, 4, 7, 27),  # 30 / 4
    }
    for resolution, values in expected.items():
        p = generator.PARAMS[resolution]
        assert (p.marker_radius, p.paddle_length, p.paddle_thickness, p.paddle_margins, p.continuity,
                p.contour_length, p.distractor_length, p.num_distractors, p.seed_distance) == values
    assert generator.PARAMS[32].contrast == 2 * 0.75 and generator.PARAMS[128].contrast == 0.9


def test_labels_are_true_by_construction(drawn):
    params, _, labels, contours = drawn
    assert set(labels.tolist()) == {0, 1}
    for i, label in enumerate(labels):
        real = ~np.isnan(contours.segments[i, :, 0])
        segments, owner = contours.segments[i][real].astype(np.float64), contours.contour[i][real]
        markers, margin = contours.markers[i].astype(np.float64), int(contours.margins[i])
        # The recorded markers: the start of one target and the end of it (positive) or of
        # the other target (negative).
        first, second = contours.marker_contours[i]
        assert {first, second} <= {0, 1} and (first == second) == bool(label)
        np.testing.assert_allclose(markers[0], segments[owner == first][0, :2], atol=1e-4)
        np.testing.assert_allclose(markers[1], segments[owner == second][-1, 2:], atol=1e-4)
        # The drawn geometry alone says the same.
        assert markers_connected(segments, markers, margin, params) == bool(label), i


def test_contours_keep_their_published_shape_and_distances(drawn):
    params, _, _, contours = drawn
    t, r, L = params.paddle_thickness, params.marker_radius, params.paddle_length
    low, high = params.padding, params.resolution - 1 - params.padding
    for i in range(len(contours.markers)):
        real = ~np.isnan(contours.segments[i, :, 0])
        segments, owner = contours.segments[i][real].astype(np.float64), contours.contour[i][real]
        m = int(contours.margins[i])
        assert m in params.paddle_margins
        assert (segments >= low - 1e-4).all() and (segments <= high + 1e-4).all()
        lengths = np.hypot(segments[:, 2] - segments[:, 0], segments[:, 3] - segments[:, 1])
        np.testing.assert_allclose(lengths, L, rtol=1e-4)
        ids, sizes = np.unique(owner, return_counts=True)
        assert ids[:2].tolist() == [0, 1] and sizes[:2].tolist() == [params.contour_length] * 2
        assert (sizes[2:] == params.distractor_length).all() and len(ids) - 2 <= params.num_distractors
        for contour in ids:
            chain = segments[owner == contour]
            for before, after in itertools.pairwise(chain):
                assert np.linalg.norm(after[:2] - before[2:]) <= 2 * m + 1e-4
                assert turn(before, after) <= np.pi / (2 * params.continuity) + 1e-4
        for j in range(len(segments)):
            for k in range(j + 1, len(segments)):
                if owner[j] != owner[k]:
                    assert segment_distance(segments[j], segments[k]) >= 2 * m + t - 1e-3
        for marker, contour in zip(contours.markers[i], contours.marker_contours[i]):
            for segment in segments[owner != contour]:
                assert point_segment(marker, segment[:2], segment[2:]) >= r + m + t / 2 - 1e-3
        if contours.marker_contours[i, 0] != contours.marker_contours[i, 1]:
            assert np.linalg.norm(np.subtract(*contours.markers[i])) >= 2 * r + m - 1e-3


def test_images_show_the_contours_and_markers(drawn):
    params, images, _, contours = drawn
    size, t, r = params.resolution, params.paddle_thickness, params.marker_radius
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    assert images.dtype == np.uint8 and images.shape == (len(contours.markers), size * size)
    for i, image in enumerate(images.reshape(-1, size, size)):
        real = ~np.isnan(contours.segments[i, :, 0])
        near = np.zeros((size, size), bool)
        for y0, x0, y1, x1 in contours.segments[i][real].astype(np.float64):
            dy, dx = y1 - y0, x1 - x0
            s = np.clip(((ys - y0) * dy + (xs - x0) * dx) / (dy * dy + dx * dx), 0, 1)
            distance = np.hypot(ys - y0 - s * dy, xs - x0 - s * dx)
            near |= distance < t / 2 + 0.5
            centre = np.unravel_index(np.argmin(np.hypot(ys - (y0 + y1) / 2, xs - (x0 + x1) / 2)), ys.shape)
            assert image[centre] > 0
        for my, mx in contours.markers[i].astype(np.float64):
            near |= np.hypot(ys - my, xs - mx) < r + 0.5
            assert image[round(my), round(mx)] == 255
        assert not image[~near].any()  # nothing is drawn away from the recorded geometry


def test_generation_is_deterministic_and_balanced():
    first = pathfinder.generate_shard(32, 3, "val", 1, 30)
    again = pathfinder.generate_shard(32, 3, "val", 1, 30)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[1].sum() == 15  # exactly half positive
    for other in (pathfinder.generate_shard(32, 4, "val", 1, 30), pathfinder.generate_shard(32, 3, "test", 1, 30),
                  pathfinder.generate_shard(32, 3, "val", 2, 30)):
        assert not np.array_equal(first[0], other[0])


def test_low_level_statistics_do_not_give_the_label_away():
    images, labels, _ = generator.generate(400, generator.PARAMS[32], np.random.default_rng(9))
    lit = (images > 0).sum(axis=1)
    difference = abs(lit[labels == 1].mean() - lit[labels == 0].mean())
    assert difference < 4 * lit.std() / np.sqrt(200)  # the same ink in both classes


# --- prepared data ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pathfinder")
    pathfinder.PATHFINDER.prepare(data_dir, **TINY)
    return data_dir


def test_prepared_arrays_manifest_and_mask(prepared):
    task = tasks.get("pathfinder")
    assert task is pathfinder.PATHFINDER and tasks.get("pathx") is pathfinder.PATHX
    assert (task.num_classes, task.vocab_size, task.generated, task.paired) == (2, 256, True, False)
    assert pathfinder.PATHX.resolution == 128
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 40, "val": 10, "test": 10}
    assert manifest["settings"] == {"num_train": 40, "num_val": 10, "num_test": 10, "seed": 5, "resolution": 32}
    assert len(manifest["split_sha256"]) == 64
    for name, record in manifest["files"].items():
        array = np.load(prepared / name)
        assert list(array.shape) == record["shape"] and str(array.dtype) == record["dtype"]
        assert storage.sha256(prepared / name, prepared / "cache") == record["sha256"]
    for split, count in manifest["counts"].items():
        arrays = task.load(split, prepared)
        assert isinstance(arrays["inputs"], np.memmap) and arrays["inputs"].shape == (count, 1024)
        assert arrays["lengths"].tolist() == [1024] * count and arrays["targets"].sum() == count // 2
        expected, labels = pathfinder.generate_shard(32, 5, split, 0, count)
        np.testing.assert_array_equal(arrays["inputs"], expected)
        np.testing.assert_array_equal(arrays["targets"], labels)
    arrays = task.load("train", prepared)
    assert (np.asarray(arrays["inputs"]) == 0).mean() > 0.5  # mostly black pixels...
    batch = data.gather(arrays, np.arange(4), 1024)
    assert batch["mask"].all()  # ...all of them real tokens


def test_splits_do_not_depend_on_workers_processes_or_other_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(pathfinder, "SHARD_SIZE", 16)  # several shards in a small test
    settings = {"num_train": 40, "num_val": 20, "num_test": 4, "seed": 2, "progress": False}
    pathfinder.PATHFINDER.prepare(tmp_path / "one", num_workers=1, **settings)
    code = ("from lra.tasks import pathfinder; pathfinder.SHARD_SIZE = 16; "
            f"pathfinder.PATHFINDER.prepare({str(tmp_path / 'two')!r}, num_workers=2, **{settings!r})")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)
    for name in ("manifest.json", *(f"{s}.{a}.npy" for s in pathfinder.SPLITS for a in pathfinder.ARRAYS)):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # The validation split is the same whatever the size of the training split.
    pathfinder.PATHFINDER.prepare(tmp_path / "three", num_workers=1, **{**settings, "num_train": 8})
    assert (tmp_path / "one/val.inputs.npy").read_bytes() == (tmp_path / "three/val.inputs.npy").read_bytes()
    assert np.load(tmp_path / "one/train.targets.npy").sum() == 20  # 16 + 16 + 8: half each


def test_prepare_again_other_settings_other_task_and_tampering(prepared, tmp_path):
    mtimes = {path: path.stat().st_mtime_ns for path in prepared.glob("*") if path.is_file()}
    assert pathfinder.PATHFINDER.prepare(prepared, **TINY)["counts"]["train"] == 40
    assert mtimes == {path: path.stat().st_mtime_ns for path in mtimes}
    assert pathfinder.PATHFINDER.is_prepared(prepared) and not pathfinder.PATHFINDER.is_prepared(tmp_path)
    with pytest.raises(ValueError, match=r"seed=5 there, 6 requested.*another data_dir"):
        pathfinder.PATHFINDER.prepare(prepared, **{**TINY, "seed": 6})
    with pytest.raises(ValueError, match="task 'pathfinder', not 'pathx'"):
        pathfinder.PATHX.prepare(prepared, **TINY)
    with pytest.raises(ValueError, match="resolution 48"):
        pathfinder.PATHFINDER.prepare(tmp_path, resolution=48)
    with pytest.raises(FileNotFoundError, match=f"python -m lra.data prepare pathx --data_dir {tmp_path}"):
        pathfinder.PATHX.load("train", tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in prepared.glob("*.*"):
        (copy / path.name).write_bytes(path.read_bytes())
    targets = np.load(copy / "test.targets.npy")
    np.save(copy / "test.targets.npy", 1 - targets)
    with pytest.raises(ValueError, match="test.targets.npy differs"):
        pathfinder.PATHFINDER.load("test", copy)


def test_prepare_command_takes_resolution(tmp_path, capsys):
    argv = ["prepare", "pathx", "--data_dir", str(tmp_path), "--num_train", "4", "--num_val", "2",
            "--num_test", "2", "--resolution", "64", "--num_workers", "1"]
    assert data.command_main(argv) == 0, capsys.readouterr().err
    assert pathfinder.PATHX.load("val", tmp_path)["inputs"].shape == (2, 64 * 64)


# --- the LRA release layout ------------------------------------------------------------

def write_release(root: Path, resolution: int = 32) -> tuple[Path, list]:
    """A small release: metadata 0.npy, 2.npy, 10.npy (text lines), PNGs, two empty images."""
    from PIL import Image

    folder = root / f"pathfinder{resolution}" / "curv_contour_length_14"
    rng = np.random.default_rng(0)
    entries = []  # (relative path, label, pixels or None when empty), in listing order
    for batch, size in ((0, 8), (2, 6), (10, 6)):
        (folder / "imgs" / str(batch)).mkdir(parents=True)
        lines = []
        for k in range(size):
            relative = f"imgs/{batch}/sample_{k}.png"
            label = int(rng.integers(0, 2))
            empty = len(entries) in (3, 19)
            pixels = None if empty else rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)
            if empty:
                (folder / relative).write_bytes(b"")
            else:
                Image.fromarray(pixels, mode="L").save(folder / relative)
            entries.append((relative, label, pixels))
            lines.append(f"imgs/{batch} sample_{k}.png {k} {label} 1.0 14 4 2 0.5 1 1\n")
        (folder / "metadata").mkdir(exist_ok=True)
        (folder / "metadata" / f"{batch}.npy").write_text("".join(lines))
    return folder, entries


def test_reads_the_release_layout_in_canonical_order(tmp_path):
    folder, entries = write_release(tmp_path / "lra_release")
    assert pathfinder.find_release(tmp_path, 32) == folder
    assert pathfinder.find_release(tmp_path, 128) is None
    manifest = pathfinder.PATHFINDER.prepare(tmp_path, progress=False)
    assert manifest["source"] == "lra_release" and manifest["counts"] == {"train": 15, "val": 2, "test": 1}
    assert manifest["skipped_empty_images"] == {"train": 1, "val": 0, "test": 1}
    splits = {"train": entries[:16], "val": entries[16:18], "test": entries[18:]}  # 80/10/10 of 20
    for split, expected in splits.items():
        kept = [(pixels, label) for _, label, pixels in expected if pixels is not None]
        arrays = pathfinder.PATHFINDER.load(split, tmp_path)
        np.testing.assert_array_equal(arrays["inputs"], np.stack([p.reshape(-1) for p, _ in kept]))
        assert arrays["targets"].tolist() == [label for _, label in kept]
        assert arrays["lengths"].tolist() == [1024] * len(kept)
    listing = "".join(f"{split}\t{relative}\t{label}\n" for split, expected in splits.items()
                      for relative, label, pixels in expected if pixels is not None)
    import hashlib
    assert manifest["split_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    # Prepared: the generator settings of a config no longer matter, nothing is rewritten.
    assert pathfinder.PATHFINDER.prepare(tmp_path, num_train=99, progress=False) == manifest


def test_release_problems_are_named(tmp_path):
    folder, entries = write_release(tmp_path)
    metadata = folder / "metadata" / "2.npy"
    lines = metadata.read_text().splitlines(keepends=True)
    metadata.write_text("".join(lines[:2] + ["imgs/2 sample_2.png 2\n"] + lines[3:]))
    with pytest.raises(ValueError, match=r"metadata/2.npy, line 3"):
        pathfinder.PATHFINDER.prepare(tmp_path, progress=False)
    metadata.write_text("".join(lines))
    (folder / entries[5][0]).unlink()
    with pytest.raises(FileNotFoundError, match="sample_5.png"):
        pathfinder.PATHFINDER.prepare(tmp_path, progress=False)


# --- configs and a run ------------------------------------------------------------------

def test_configs_lra_presets_and_runlocal():
    config = pathfinder_config.get_config("preset=lra")
    model = config.model
    assert (model.num_layers, model.emb_dim, model.qkv_dim, model.num_heads, model.mlp_dim) == (4, 32, 16, 4, 32)
    assert (model.dropout, model.pooling, config.batch_size, config.num_train_steps) == (0.2, "mean", 512, 62_400)
    assert (config.schedule, config.learning_rate, config.max_length, config.attention) == (
        "cosine", 1e-3, 1024, "softmax")
    assert config.prepare.to_dict() == {"num_train": 160_000, "num_val": 20_000, "num_test": 20_000,
                                        "seed": 0, "resolution": 32}
    config = pathx_config.get_config("preset=lra")
    model = config.model
    assert (model.num_layers, model.emb_dim, model.qkv_dim, model.num_heads, model.mlp_dim) == (1, 32, 16, 2, 32)
    assert (config.batch_size, config.grad_clip, config.schedule, config.learning_rate) == (64, 1.0, "cosine", 1e-3)
    assert config.max_length == 16_384 and config.prepare.resolution == 128
    for module in (pathfinder_config, pathx_config):
        for arg in ("runlocal", "runlocal,attention=linear,seed=2", "preset=lra"):
            train.validate_config(module.get_config(arg), num_devices=jax.device_count())
    assert pathx_config.get_config("runlocal").attention == "local"
    assert pathx_config.get_config("runlocal,attention=linear").attention == "linear"
    assert pathx_config.get_config("runlocal").max_length == 16_384  # still Path-X


def test_runlocal_end_to_end(tmp_path):
    config = pathfinder_config.get_config("runlocal")
    config.prepare.update({"num_train": 32, "num_val": 16, "num_test": 16})
    config.update({"data_dir": str(tmp_path / "data"), "batch_size": 16, "eval_batch_size": 16,
                   "num_train_steps": 4, "warmup_steps": 1, "eval_every": 4, "checkpoint_every": 4,
                   "log_every": 2})
    config.model.update({"num_layers": 1, "emb_dim": 16, "qkv_dim": 16, "num_heads": 2, "mlp_dim": 16})
    results = train.train_and_evaluate(config, tmp_path / "run")
    assert results["task"] == "pathfinder" and results["step"] == 4
    assert 0 <= results["test_accuracy"] <= 1
    assert round(results["test_accuracy"] * 16, 6).is_integer()  # of all 16 test examples
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["counts"] == {
        "train": 32, "val": 16, "test": 16}
