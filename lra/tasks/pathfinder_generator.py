"""Pathfinder images (Linsley et al., 2018), drawn offline and vectorised over a batch.

An image holds two long *target* contours and a few short *distractor* contours, each a
chain of short line segments ("paddles") with a bounded turn between neighbours, and two
disc markers. Both target contours start ``seed_distance`` apart near the centre; one
marker sits on the start ("origin tip") of one of them, the other on the far end
("terminal tip") of the same contour (positive: the markers are connected) or of the other
one (negative). Every image thus has two target contours drawn the same way whatever its
label; only the marker placement differs, as in the original generator (``snakes2.py`` of
github.com/drewlinsley/pathfinder). Target A is drawn first from the central box, then B
around A's start (both with restarts when stuck), then the distractors.

Geometry (coordinates in pixels, pixel centres at integers, (y, x) order): a contour is a
chain of pivots ``p_{k+1} = p_k + (L + 2m) d_k``; paddle k covers ``p_k + [m, m + L] d_k``
(L paddle length, m paddle margin, ``d_k`` its unit direction), so consecutive paddles
leave a gap of at most 2m. The turn ``d_{k-1} -> d_k`` has density proportional to
``cos(continuity * turn)**2`` for ``|turn| < pi / (2 * continuity)`` and 0 beyond, as in
the original's ``get_coords_cmf``. A paddle is accepted only if it stays ``2m + t`` (t:
thickness) away from every earlier paddle except its predecessor on the same contour
(the original's margin-dilated masks may not overlap), ``r + m + t/2`` away from the marker
discs (radius r) of other contours, and ``padding`` away from the border. Target pairs
whose tips come closer than that to the other contour, or whose markers would touch, are
redrawn; distractors that find no room are dropped after a few tries (as in the original).
Because paddles of different contours stay ``2m + t`` apart while neighbours on one
contour are at most ``2m`` apart, "the markers lie on the same contour" is a geometric
fact that can be checked from the recorded segments alone.

Rendering is antialiased: a pixel's value is the exact box-filtered coverage across the
line (width t) or of the disc; paddles have brightness ``contrast`` and markers 1, and the
image is scaled so that its brightest pixel is 255 (the original's ``imsave`` byte-scaling).
"""

from __future__ import annotations

import dataclasses

import numpy as np

_F = np.float32


@dataclasses.dataclass(frozen=True)
class Params:
    """Settings of the generator for one resolution (names follow the original's ``args``)."""

    resolution: int  # images are resolution x resolution
    padding: int  # no paddle comes closer to the border (pixels)
    seed_distance: float  # distance between the origin tips of the two target contours
    marker_radius: float
    paddle_length: float
    paddle_thickness: float
    paddle_margins: tuple[int, ...]  # one is drawn per image
    continuity: float  # larger = straighter; the largest turn is pi / (2 * continuity)
    contour_length: int  # paddles per target contour (14 = the "hard" level)
    distractor_length: int  # paddles per distractor contour
    num_distractors: int
    contrast: float  # paddle brightness relative to the markers (before byte-scaling)
    turn_candidates: int = 12  # directions weighed per paddle (the original: ~10 at 32 px)
    seed_candidates: int = 8  # start points tried per contour
    target_tries: int = 10  # attempts per target contour before the image is redrawn
    distractor_tries: int = 5  # attempts per distractor (the original: 1 + 4 retrials)

    def __post_init__(self):
        if self.resolution < 8 or min(self.paddle_margins) < 1 or self.marker_radius < 0.5:
            raise ValueError(f"Pathfinder parameters out of range: {self}")
        if self.continuity < 1 or self.contour_length < 2 or self.distractor_length < 1:
            raise ValueError(f"Pathfinder needs continuity >= 1 and contours of >= 2 paddles: {self}")
        # Checking only endpoint-to-segment distances is exact for crossing paddles too when
        # a paddle is shorter than twice the required clearance.
        if self.paddle_length >= 2 * (2 * min(self.paddle_margins) + self.paddle_thickness):
            raise ValueError(f"paddle_length must be < 2 * (2 * margin + thickness): {self}")


# Published settings per resolution: the LRA Pathfinder TFDS builders' docstrings
# (google-research/long-range-arena, lra_benchmarks/data/pathfinder.py) list what was
# changed from the defaults of drewlinsley/pathfinder ``snakes2_wrapper.py`` (paddle length
# 5, padding 22, seed distance 27, paddle contrast 1.0); "hard" = contour length 14. The
# original ran under Python 2, so ``distractor_length = 14 / 3`` is 4 and the distractor
# counts are 20 // 4, 22 / 4, 35 / 4 and 30 / 4 (integer division). Contrast is
# snake_contrast * paddle_contrast (32: 2 * 0.75). Our own choices: the number of tries.
PARAMS: dict[int, Params] = {
    32: Params(32, padding=1, seed_distance=7, marker_radius=1.5, paddle_length=2,
               paddle_thickness=0.5, paddle_margins=(1,), continuity=1.0, contour_length=14,
               distractor_length=4, num_distractors=5, contrast=1.5),
    64: Params(64, padding=1, seed_distance=12, marker_radius=2.5, paddle_length=5,
               paddle_thickness=1.0, paddle_margins=(1,), continuity=1.8, contour_length=14,
               distractor_length=4, num_distractors=5, contrast=0.8),
    128: Params(128, padding=1, seed_distance=20, marker_radius=3.0, paddle_length=5,
                paddle_thickness=1.5, paddle_margins=(2, 3), continuity=1.8, contour_length=14,
                distractor_length=4, num_distractors=8, contrast=0.9),
    256: Params(256, padding=22, seed_distance=27, marker_radius=5.0, paddle_length=5,
                paddle_thickness=2.0, paddle_margins=(3,), continuity=1.8, contour_length=14,
                distractor_length=4, num_distractors=7, contrast=1.0),
}


@dataclasses.dataclass
class Contours:
    """What the generator drew, per image (the ground truth behind each label).

    Attributes:
        segments: [N, P, 4] float32 paddles as (y0, x0, y1, x1); unused rows are NaN.
        contour: [N, P] int16 contour of each paddle: 0 and 1 the targets, 2.. the
            distractors, -1 unused.
        markers: [N, 2, 2] float32 marker centres (y, x).
        marker_contours: [N, 2] int16 contour whose tip each marker sits on.
        margins: [N] int16 paddle margin of each image.
    """

    segments: np.ndarray
    contour: np.ndarray
    markers: np.ndarray
    marker_contours: np.ndarray
    margins: np.ndarray


# --- geometry -----------------------------------------------------------------------

def point_segment_distance2(py, px, ay, ax, dy, dx, inverse_length2):
    """Squared distance from points p to segments a + s d, s in [0, 1] (broadcasting).

    ``inverse_length2`` is 1 / |d|^2, or 0 for a point segment (d = 0).
    """
    ry, rx = py - ay, px - ax
    s = np.clip((ry * dy + rx * dx) * inverse_length2, 0, 1)
    ey, ex = ry - s * dy, rx - s * dx
    return ey * ey + ex * ex


class _Scene:
    """Paddles and marker discs placed so far in a batch of images (one row per image).

    Every placed item is an obstacle: a segment (a marker: a point) with the squared
    clearance a new paddle must keep from it, and the contour that owns it.
    """

    def __init__(self, params: Params, margins: np.ndarray, capacity: int):
        n = len(margins)
        self.params = params
        self.ay, self.ax, self.dy, self.dx, self.inverse = (np.zeros((n, capacity), _F) for _ in range(5))
        self.clearance2 = np.full((n, capacity), -1, _F)  # -1: empty slot
        self.owner = np.full((n, capacity), -1, np.int16)
        self.is_marker = np.zeros((n, capacity), bool)
        self.count = np.zeros(n, np.int64)
        m, t, r = margins.astype(_F), _F(params.paddle_thickness), _F(params.marker_radius)
        self.margin = m
        self.paddle_clearance2 = (2 * m + t) ** 2  # between paddles of different contours
        self.marker_clearance2 = (r + m + t / 2) ** 2  # between a paddle and another's marker
        self.disc_clearance2 = (2 * r + m) ** 2  # between markers of different contours

    def add(self, rows, ay, ax, by, bx, owner, is_marker: bool) -> np.ndarray:
        """Places one item per row; returns the slots used."""
        slots = self.count[rows]
        dy, dx = by - ay, bx - ax
        length2 = dy * dy + dx * dx
        self.ay[rows, slots], self.ax[rows, slots] = ay, ax
        self.dy[rows, slots], self.dx[rows, slots] = dy, dx
        self.inverse[rows, slots] = np.where(length2 > 0, 1 / np.maximum(length2, 1e-12), 0)
        clearance = self.marker_clearance2 if is_marker else self.paddle_clearance2
        self.clearance2[rows, slots] = clearance[rows]
        self.owner[rows, slots] = owner
        self.is_marker[rows, slots] = is_marker
        self.count[rows] += 1
        return slots

    def add_markers(self, rows, points, owner) -> None:
        """Places marker discs at points [R, 2]."""
        self.add(rows, points[:, 0], points[:, 1], points[:, 0], points[:, 1], owner, is_marker=True)

    def remove_from(self, rows, counts) -> None:
        """Forgets the items of `rows` placed after their first `counts` (a failed contour)."""
        slots = np.arange(self.owner.shape[1])[None, :]
        stale = (slots >= counts[:, None]) & (slots < self.count[rows][:, None])
        take = (rows[:, None], slots)
        self.clearance2[take] = np.where(stale, -1, self.clearance2[take])
        self.owner[take] = np.where(stale, -1, self.owner[take])
        self.is_marker[take] &= ~stale
        self.count[rows] = counts

    def is_free(self, rows, ay, ax, by, bx, owner, previous_slot, tip_end=None) -> np.ndarray:
        """Whether candidate paddles a-b ([R, K] each) of contour `owner` fit: inside the
        padding, clear of every obstacle of their row except `previous_slot` [R] (-1: none)
        and the owner's own markers.

        With `tip_end` 0 or 1, that end of the paddle will carry a marker, so it must also
        keep the marker clearance from other contours' paddles and markers.
        """
        p = self.params
        low, high = p.padding, p.resolution - 1 - p.padding
        inside = ((np.minimum(ay, by) >= low) & (np.maximum(ay, by) <= high)
                  & (np.minimum(ax, bx) >= low) & (np.maximum(ax, bx) <= high))
        width = int(self.count[rows].max(initial=0))
        if width == 0:
            return inside
        take = (rows[:, None], np.arange(width)[None, :])
        obstacles = [a[take] for a in (self.ay, self.ax, self.dy, self.dx, self.inverse)]
        clearance2, is_marker = self.clearance2[take], self.is_marker[take]
        own = self.owner[take] == owner
        ignored = is_marker & own
        ignored[np.arange(len(rows)), np.maximum(previous_slot, 0)] |= previous_slot >= 0
        half_length = _F(p.paddle_length / 2)
        hit = self._hits(obstacles, np.where(ignored, -1, clearance2), (ay, ax, by, bx), half_length)
        if tip_end is not None:
            tip_needed2 = np.where(is_marker, self.disc_clearance2[rows][:, None],
                                   self.marker_clearance2[rows][:, None])
            tip_needed2 = np.where(own | (clearance2 < 0), -1, tip_needed2)
            ty, tx = (ay, ax) if tip_end == 0 else (by, bx)
            hit |= self._hits(obstacles, tip_needed2, (ty, tx, ty, tx), _F(0))
        return inside & ~hit

    def _hits(self, obstacles, needed2, candidates, half_length) -> np.ndarray:
        """[R, K]: whether candidate segments (or points: half_length 0) come closer to some
        obstacle of their row than its `needed2` [R, P] (squared; negative = never).

        A cheap test on the segments' midpoints finds the few pairs that can be close; only
        those get the exact distance (the smallest of the four endpoint-to-segment ones,
        exact since paddles are shorter than twice the clearance).
        """
        oay, oax, ody, odx, inverse = obstacles
        ay, ax, by, bx = candidates
        half_obstacle = np.sqrt(ody * ody + odx * odx) / 2
        reach = half_length + half_obstacle + np.sqrt(np.maximum(needed2, 0))
        my, mx = (ay + by) / 2, (ax + bx) / 2
        gap_y = my[:, :, None] - (oay + ody / 2)[:, None, :]
        gap_x = mx[:, :, None] - (oax + odx / 2)[:, None, :]
        near = (gap_y * gap_y + gap_x * gap_x < (reach * reach)[:, None, :]) & (needed2 >= 0)[:, None, :]
        r, k, j = np.nonzero(near)
        hit = np.zeros(ay.shape, bool)
        if not len(r):
            return hit
        cay, cax, cby, cbx = ay[r, k], ax[r, k], by[r, k], bx[r, k]
        cdy, cdx = cby - cay, cbx - cax
        inverse_candidate = _F(1 / self.params.paddle_length**2) if half_length else _F(0)
        pay, pax, pdy, pdx, pinverse, need = (a[r, j] for a in (oay, oax, ody, odx, inverse, needed2))
        close = point_segment_distance2(cay, cax, pay, pax, pdy, pdx, pinverse) < need
        close |= point_segment_distance2(cby, cbx, pay, pax, pdy, pdx, pinverse) < need
        close |= point_segment_distance2(pay, pax, cay, cax, cdy, cdx, inverse_candidate) < need
        close |= point_segment_distance2(pay + pdy, pax + pdx, cay, cax, cdy, cdx, inverse_candidate) < need
        hit[r[close], k[close]] = True
        return hit


@dataclasses.dataclass
class _Tip:
    """The growing end of one contour per row: next pivot, direction, its last paddle's slot."""

    y: np.ndarray
    x: np.ndarray
    angle: np.ndarray
    slot: np.ndarray

    def take(self, index) -> _Tip:
        return _Tip(self.y[index], self.x[index], self.angle[index], self.slot[index])

    def put(self, index, other: _Tip) -> None:
        for name in ("y", "x", "angle", "slot"):
            getattr(self, name)[index] = getattr(other, name)


class _Painter:
    """Draws contours into a `_Scene` with a random stream."""

    def __init__(self, scene: _Scene, rng: np.random.Generator):
        self.scene, self.rng, self.p = scene, rng, scene.params

    def place(self, rows, candidates, weights, owner, previous_slot, tip_end=None):
        """Places per row one of K candidate paddles, chosen among the free ones with
        probability proportional to `weights` (the original's pmf over free directions).

        Args:
            rows: [R] scene rows.
            candidates: (ay, ax, by, bx, angle), each [R, K].
            weights: [R, K] prior weights.
            owner: contour id.
            previous_slot: [R] slot of the contour's last paddle (exempt), or -1.
            tip_end: see `_Scene.is_free`.

        Returns:
            (placed [R] bool, (ay, ax, by, bx, angle) of the chosen candidates [R], slots [R]).
        """
        r, k = weights.shape
        free = self.scene.is_free(rows, *candidates[:4], owner, previous_slot, tip_end)
        cumulative = np.cumsum(np.where(free, weights, 0), axis=1)
        total = cumulative[:, -1]
        placed = total > 0
        draw = self.rng.random(r) * total
        choice = np.minimum((cumulative <= draw[:, None]).sum(axis=1), k - 1)
        chosen = [c[np.arange(r), choice] for c in candidates]
        slots = np.full(r, -1)
        ay, ax, by, bx, _ = (c[placed] for c in chosen)
        slots[placed] = self.scene.add(rows[placed], ay, ax, by, bx, owner, is_marker=False)
        return placed, chosen, slots

    def extend(self, rows, tips: _Tip, owner, tip_end=None) -> np.ndarray:
        """Adds one paddle to the contour of each row; returns the rows (mask) that failed.

        The candidate turns are a jittered fan over the allowed range, weighted by
        cos(continuity * turn)**2.
        """
        k, widest = self.p.turn_candidates, np.pi / (2 * self.p.continuity)
        fan = (np.arange(k)[None, :] + self.rng.random((len(rows), 1))) / k
        turn = ((2 * fan - 1) * widest).astype(_F)
        angle = tips.angle[:, None] + turn
        m, length = self.scene.margin[rows][:, None], _F(self.p.paddle_length)
        sin, cos = np.sin(angle), np.cos(angle)
        y, x = tips.y[:, None], tips.x[:, None]
        candidates = (y + m * sin, x + m * cos, y + (m + length) * sin, x + (m + length) * cos, angle)
        weights = np.cos(self.p.continuity * turn) ** 2
        placed, (_, _, by, bx, angle), slots = self.place(rows, candidates, weights, owner, tips.slot, tip_end)
        m = m[:, 0]
        tips.y = np.where(placed, by + m * np.sin(angle), tips.y)
        tips.x = np.where(placed, bx + m * np.cos(angle), tips.x)
        tips.angle = np.where(placed, angle, tips.angle)
        tips.slot = np.where(placed, slots, tips.slot)
        return ~placed

    def start(self, rows, ay, ax, owner, tip_end=None):
        """Places a first paddle per row from one of the K start points (ay, ax) [R, K], in
        a random direction; returns (placed, start point [R, 2], the growing end)."""
        angle = self.rng.uniform(-np.pi, np.pi, ay.shape).astype(_F)
        length = _F(self.p.paddle_length)
        candidates = (ay, ax, ay + length * np.sin(angle), ax + length * np.cos(angle), angle)
        placed, (ay, ax, by, bx, angle), slots = self.place(
            rows, candidates, np.ones(ay.shape, _F), owner, np.full(len(rows), -1), tip_end)
        m = self.scene.margin[rows]
        tip = _Tip(by + m * np.sin(angle), bx + m * np.cos(angle), angle, slots)
        return placed, np.stack([ay, ax], -1), tip

    def contour(self, rows, owner, length, starts, tries, marked):
        """Draws a contour of `length` paddles in each row, from scratch again when it gets
        stuck, at most `tries` times.

        Args:
            rows: [R] scene rows.
            owner: contour id.
            length: paddles.
            starts: ``starts(rows) -> (y, x)``, each [R', K], candidate start points.
            tries: attempts per row.
            marked: the two ends will carry markers (checked against other contours).

        Returns:
            (done [R] bool, start points [R, 2], end points [R, 2]).
        """
        done = np.zeros(len(rows), bool)
        origins, terminals = np.zeros((len(rows), 2), _F), np.zeros((len(rows), 2), _F)
        todo = np.arange(len(rows))
        for _ in range(tries):
            if not len(todo):
                break
            subset = rows[todo]
            before = self.scene.count[subset].copy()
            placed, origin, tip = self.start(subset, *starts(subset), owner, 0 if marked else None)
            failed = ~placed
            for index in range(1, length):
                live = np.flatnonzero(~failed)
                live_tip = tip.take(live)
                last = marked and index == length - 1
                failed[live[self.extend(subset[live], live_tip, owner, 1 if last else None)]] = True
                tip.put(live, live_tip)
            m = self.scene.margin[subset]
            end = np.stack([tip.y - m * np.sin(tip.angle), tip.x - m * np.cos(tip.angle)], -1)
            good = todo[~failed]
            done[good], origins[good], terminals[good] = True, origin[~failed], end[~failed]
            self.scene.remove_from(subset[failed], before[failed])
            todo = todo[failed]
        return done, origins, terminals


def _draw_targets(painter: _Painter, n: int):
    """Draws a target pair in each of rows 0..n-1, marker discs at all four tips.

    All four tips repel later paddles, whichever two get drawn: the label leaves no trace.

    Returns:
        (ok [n] bool, origin tips [n, 2 contours, 2], terminal tips [n, 2, 2]).
    """
    p, scene, rng = painter.p, painter.scene, painter.rng
    rows, k = np.arange(n), p.seed_candidates
    # Target A starts in the central box 2 * seed_distance from the border (the original's
    # `initialize_two_seeds`), target B at seed_distance from A's start.
    low, high = 2 * p.seed_distance, p.resolution - 1 - 2 * p.seed_distance
    if high < low:
        low = high = (p.resolution - 1) / 2

    def central(subset):
        return tuple(rng.uniform(low, high, (len(subset), k)).astype(_F) for _ in range(2))

    origins, terminals = np.zeros((n, 2, 2), _F), np.zeros((n, 2, 2), _F)
    ok, origins[:, 0], terminals[:, 0] = painter.contour(rows, 0, p.contour_length, central,
                                                         p.target_tries, marked=True)
    live = rows[ok]
    for tips in (origins, terminals):
        scene.add_markers(live, tips[live, 0], 0)

    def around_a(subset):
        bearing = rng.uniform(-np.pi, np.pi, (len(subset), k)).astype(_F)
        centre = origins[subset, 0]
        distance = _F(p.seed_distance)
        return centre[:, :1] + distance * np.sin(bearing), centre[:, 1:] + distance * np.cos(bearing)

    done, origins[live, 1], terminals[live, 1] = painter.contour(live, 1, p.contour_length, around_a,
                                                                 p.target_tries, marked=True)
    ok[live[~done]] = False
    live = live[done]
    for tips in (origins, terminals):
        scene.add_markers(live, tips[live, 1], 1)
    return ok, origins, terminals


def _draw_distractors(painter: _Painter, rows: np.ndarray) -> None:
    """Adds up to num_distractors short contours per row; ones that find no room are dropped."""
    p, rng = painter.p, painter.rng
    low, high = p.padding, p.resolution - 1 - p.padding

    def anywhere(subset):
        return tuple(rng.uniform(low, high, (len(subset), p.seed_candidates)).astype(_F) for _ in range(2))

    for index in range(p.num_distractors):
        painter.contour(rows, 2 + index, p.distractor_length, anywhere, p.distractor_tries, marked=False)


def _coverage(d, half_width):
    """Box-filtered coverage of a pixel at distance d from the centre line of a band."""
    return np.clip(np.minimum(d + 0.5, half_width) - np.maximum(d - 0.5, -half_width), 0, 1)


def _splat(canvas, image_index, centre_y, centre_x, extent, size, value_of):
    """Writes max(canvas, value) over the pixels within `extent` of each centre.

    ``value_of(py, px)`` gives the values on a [K, W, W] grid of pixel coordinates.
    """
    width = int(np.ceil(2 * extent)) + 1
    offsets = np.arange(width)
    y0 = np.floor(centre_y - extent).astype(np.int64)[:, None, None]
    x0 = np.floor(centre_x - extent).astype(np.int64)[:, None, None]
    py, px = y0 + offsets[None, :, None], x0 + offsets[None, None, :]
    values = value_of(py.astype(_F), px.astype(_F))
    inside = (py >= 0) & (py < size) & (px >= 0) & (px < size) & (values > 0)
    flat = (image_index[:, None, None] * size + py) * size + px
    np.maximum.at(canvas, np.broadcast_to(flat, values.shape)[inside], values[inside])


def render(contours: Contours, params: Params) -> np.ndarray:
    """Draws contours and markers: [N, resolution * resolution] uint8, row-major."""
    n, size = len(contours.markers), params.resolution
    canvas = np.zeros(n * size * size, _F)
    real = ~np.isnan(contours.segments[..., 0])
    image_index = np.broadcast_to(np.arange(n)[:, None], real.shape)[real]
    ay, ax, by, bx = (contours.segments[..., i][real][:, None, None] for i in range(4))
    dy, dx = by - ay, bx - ax
    inverse = _F(1 / params.paddle_length**2)
    half_width = _F(params.paddle_thickness / 2)
    contrast = _F(params.contrast)

    def paddle_values(py, px):
        d = np.sqrt(point_segment_distance2(py, px, ay, ax, dy, dx, inverse))
        return contrast * _coverage(d, half_width)

    extent = params.paddle_length / 2 + params.paddle_thickness / 2 + 1
    _splat(canvas, image_index, (ay + by)[:, 0, 0] / 2, (ax + bx)[:, 0, 0] / 2, extent, size, paddle_values)
    my, mx = contours.markers[..., 0].reshape(-1), contours.markers[..., 1].reshape(-1)
    radius = _F(params.marker_radius)

    def marker_values(py, px):
        d = np.sqrt((py - my[:, None, None]) ** 2 + (px - mx[:, None, None]) ** 2)
        return np.clip(radius + 0.5 - d, 0, 1)

    _splat(canvas, np.repeat(np.arange(n), 2), my, mx, radius + 1, size, marker_values)
    images = canvas.reshape(n, size * size)
    scale = 255 / np.maximum(images.max(axis=1, keepdims=True), 1)
    return np.rint(images * scale).astype(np.uint8)


def _collect(scene: _Scene, rows, origins, terminals, labels, rng) -> Contours:
    """The paddles of `rows` and their markers: the origin tip of a random target and the
    terminal tip of the same target (label 1) or of the other one (label 0)."""
    n, width = len(rows), int(scene.count[rows].max(initial=0))
    take = (rows[:, None], np.arange(width)[None, :])
    paddle = (scene.clearance2[take] >= 0) & ~scene.is_marker[take]
    order = np.argsort(~paddle, axis=1, kind="stable")  # paddles first, in drawing order
    pick = (np.arange(n)[:, None], order)
    ay, ax, dy, dx = (a[take][pick] for a in (scene.ay, scene.ax, scene.dy, scene.dx))
    keep = paddle[pick]
    segments = np.stack([ay, ax, ay + dy, ax + dx], -1)
    segments[~keep] = np.nan
    contour = np.where(keep, scene.owner[take][pick], -1).astype(np.int16)
    first = rng.integers(0, 2, n)  # which target carries the origin marker
    second = np.where(labels == 1, first, 1 - first)
    markers = np.stack([origins[rows, first], terminals[rows, second]], axis=1)
    marker_contours = np.stack([first, second], -1).astype(np.int16)
    return Contours(segments, contour, markers, marker_contours, scene.margin[rows].astype(np.int16))


def generate(num_images: int, params: Params, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, Contours]:
    """Draws `num_images` Pathfinder images, half of them positive (in random order).

    Args:
        num_images: how many.
        params: the settings, e.g. ``PARAMS[32]``.
        rng: the random stream; the result depends only on it and the arguments.

    Returns:
        (images [N, resolution**2] uint8, labels [N] int32 (1: connected), the contours).

    Raises:
        ValueError: `num_images` < 1.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    labels = rng.permutation(np.arange(num_images) % 2).astype(np.int32)
    capacity = 4 + 2 * params.contour_length + params.num_distractors * params.distractor_length + 2
    parts, found, attempts = [], 0, 0
    while found < num_images:
        # Draw more pairs than still needed: some fail; the overshoot follows the success
        # rate so far, so the stream consumed (and the result) is fixed by the seed.
        rate = found / attempts if attempts else 0.8
        batch = int(np.ceil((num_images - found) / max(rate, 0.05) * 1.05)) + 2
        margins = rng.choice(np.asarray(params.paddle_margins), batch)
        scene = _Scene(params, margins, capacity)
        painter = _Painter(scene, rng)
        ok, origins, terminals = _draw_targets(painter, batch)
        rows = np.flatnonzero(ok)[: num_images - found]
        attempts += batch
        found += len(rows)
        if not len(rows):
            continue
        _draw_distractors(painter, rows)
        parts.append(_collect(scene, rows, origins, terminals, labels[found - len(rows): found], rng))
    width = max(part.segments.shape[1] for part in parts)

    def stacked(name, fill):
        arrays = [getattr(part, name) for part in parts]
        if name in ("segments", "contour"):
            arrays = [np.concatenate([a, np.full((len(a), width - a.shape[1], *a.shape[2:]), fill, a.dtype)], 1)
                      for a in arrays]
        return np.concatenate(arrays)

    contours = Contours(stacked("segments", np.nan), stacked("contour", -1), stacked("markers", 0),
                        stacked("marker_contours", 0), stacked("margins", 0))
    return render(contours, params), labels, contours
