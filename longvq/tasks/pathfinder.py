"""Pathfinder and Path-X (Linsley et al. 2018; Long Range Arena settings): is there a path between the two markers?

An image (R x R greyscale on black) holds two "snakes" A and B, chains of `contour_length` short strokes ("paddles")
separated by a gap, each paddle turning by a bounded random angle from the previous one. Both snakes start
`seed_distance` px apart, so the neighbourhood of the first marker looks alike whatever the label. One disc marker
sits at the start of A; the other sits at the end of A (label 1, connected) or at the end of B (label 0). Shorter
distractor snakes (a third of the contour length) fill the rest of the image. No stroke comes closer than
`clearance` px to a stroke of another paddle (except its predecessor in the same snake), so snakes never touch or
cross and the only way to decide is to follow the path. Strokes are drawn at `supersample` x the resolution and
box-filtered down (antialiasing), so thin strokes are grey and markers are white (255).

Settings (`SETTINGS`, from LRA's generator where it states them; the rest chosen to match its images):
32 px - paddle 2 px, margin 1, thickness 0.5, marker radius 1.5, 14 paddles, seed distance 7, 20 / distractor
length distractor snakes; 128 px (Path-X) - paddle 5 px, margin 2-3, thickness 1.5, marker radius 3, 14 paddles,
seed distance 20, 35 / distractor length distractor snakes. `continuity` sets the largest turn per paddle,
continuity x 45 degrees (LRA: 1.0 and 1.8).

Sequences are the pixels in row-major order: length 1,024 (32 px) or 16,384 (128 px). Labels are exactly balanced in
every split (up to one example).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from .common import (
    balanced_labels,
    cached,
    check_positive,
    check_split_sizes,
    classification_split,
    split_sizes,
)

DEFAULTS = {"num_train": 2000, "num_validation": 200, "num_test": 200}


@dataclass(frozen=True)
class PathfinderSettings:
    """Generator settings in output pixels (`margin` is drawn uniformly from [margin_low, margin_high])."""

    resolution: int
    paddle_length: float
    margin_low: float
    margin_high: float
    thickness: float
    marker_radius: float
    contour_length: int
    seed_distance: float
    continuity: float
    distractor_budget: int
    supersample: int

    @property
    def clearance(self) -> float:
        """Smallest allowed distance between strokes of non-adjacent paddles (stroke centre lines)."""
        return self.margin_high + self.thickness

    @property
    def max_turn(self) -> float:
        return self.continuity * math.pi / 4

    @property
    def distractor_length(self) -> int:
        return max(1, self.contour_length // 3)

    @property
    def num_distractors(self) -> int:
        return self.distractor_budget // self.distractor_length


SETTINGS = {
    32: PathfinderSettings(
        32,
        paddle_length=2.0,
        margin_low=1.0,
        margin_high=1.0,
        thickness=0.5,
        marker_radius=1.5,
        contour_length=14,
        seed_distance=7.0,
        continuity=1.0,
        distractor_budget=20,
        supersample=4,
    ),
    128: PathfinderSettings(
        128,
        paddle_length=5.0,
        margin_low=2.0,
        margin_high=3.0,
        thickness=1.5,
        marker_radius=3.0,
        contour_length=14,
        seed_distance=20.0,
        continuity=1.8,
        distractor_budget=35,
        supersample=2,
    ),
}


class _Canvas:
    """Collision bookkeeping on a supersampled boolean grid: `blocked` marks every grid cell within `clearance` of
    a finished snake. The snake being grown is checked against its own paddles separately (see `_grow`), so it can
    back off from a dead end without un-stamping anything."""

    def __init__(self, settings: PathfinderSettings):
        self.s = settings
        self.scale = settings.supersample
        size = settings.resolution * self.scale
        self.blocked = np.zeros((size, size), dtype=bool)
        radius = math.ceil(settings.clearance * self.scale)
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        self.disc = (yy**2 + xx**2) <= (settings.clearance * self.scale) ** 2
        self.radius = radius
        # Keep strokes and markers inside the frame.
        self.low = max(settings.marker_radius, settings.thickness) + 0.5
        self.high = settings.resolution - self.low
        # Every paddle has the same length: sample it every quarter grid cell (so no cell is skipped).
        steps = max(2, math.ceil(settings.paddle_length * self.scale * 4) + 1)
        self.fractions = np.linspace(0.0, 1.0, steps)[:, None]
        # Sparser points (every ~0.5 px) for the distance check within a snake: error <= 0.25 px, far cheaper.
        self.coarse = np.linspace(0.0, 1.0, max(2, math.ceil(settings.paddle_length * 2) + 1))[:, None]

    def samples(self, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
        """Points along the paddle p0-p1, in pixels, (n, 2)."""
        return p0 + self.fractions * (p1 - p0)

    def free_each(self, points: np.ndarray) -> np.ndarray:
        """For candidate paddles `points` (k, n, 2) in pixels: (k,) bool, True where all n points are inside the
        frame and away from finished snakes."""
        inside = ((points >= self.low) & (points <= self.high)).all(axis=(1, 2))
        cells = np.clip(np.floor(points * self.scale).astype(np.int64), 0, self.blocked.shape[0] - 1)
        return inside & ~self.blocked[cells[..., 1], cells[..., 0]].any(axis=1)

    def commit(self, points: np.ndarray) -> None:
        """Block everything within `clearance` of `points` (pixels)."""
        size = self.blocked.shape[0]
        r = self.radius
        for x, y in np.unique(np.floor(points * self.scale).astype(np.int64), axis=0):
            y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, size), max(x - r, 0), min(x + r + 1, size)
            self.blocked[y0:y1, x0:x1] |= self.disc[y0 - (y - r) : y1 - (y - r), x0 - (x - r) : x1 - (x - r)]


def _grow(
    canvas: _Canvas,
    rng,
    start,
    angle: float,
    paddles: int,
    tries: int = 8,
    budget: int = 60,
    allow_partial: bool = False,
):
    """Grow a snake of `paddles` paddles from `start` (first heading `angle`): a list of (p0, p1) in pixels, or None.

    Depth-first search with backtracking. Expanding a snake draws `tries` candidate next paddles at once (random
    turns within +-max_turn and random margins; the first paddle tries `angle`, then random headings) and keeps those
    that stay in the frame, keep `clearance` from finished snakes (the canvas grid) and from the snake's own paddles
    except its direct predecessor, which it starts only a margin away from. The snake takes the first survivor; when
    a paddle has none left, the previous paddle is withdrawn and its next survivor is tried, within `budget`
    expansions. With `allow_partial` (distractors) a snake that runs out of budget is kept as far as it got.
    The finished snake is committed to the canvas."""
    s = canvas.s
    path: list[tuple] = []  # (p0, p1, heading, grid sample points, coarse sample points)
    frontier: list[list] = []  # frontier[k]: untried surviving candidates for paddle k

    def expand() -> list:
        level = len(path)
        if level == 0:
            headings = np.concatenate([[angle], rng.uniform(0, 2 * np.pi, tries - 1)])
            position, gaps = np.asarray(start, dtype=np.float64), np.zeros(tries)
        else:
            headings = path[-1][2] + rng.uniform(-s.max_turn, s.max_turn, tries)
            position, gaps = path[-1][1], rng.uniform(s.margin_low, s.margin_high, tries)
        directions = np.stack([np.cos(headings), np.sin(headings)], axis=1)  # (tries, 2)
        p0 = position + gaps[:, None] * directions
        p1 = p0 + s.paddle_length * directions
        points = p0[:, None, :] + canvas.fractions[None] * (p1 - p0)[:, None, :]  # (tries, n, 2)
        coarse = p0[:, None, :] + canvas.coarse[None] * (p1 - p0)[:, None, :]  # (tries, c, 2)
        ok = canvas.free_each(points)
        if level >= 2 and ok.any():
            own = np.concatenate([entry[4] for entry in path[:-1]])  # (m, 2)
            distances = ((coarse[:, :, None, :] - own[None, None]) ** 2).sum(-1)  # (tries, c, m)
            ok &= distances.min(axis=(1, 2)) >= s.clearance**2
        survivors = [(p0[i], p1[i], float(headings[i]), points[i], coarse[i]) for i in np.flatnonzero(ok)]
        return survivors[::-1]  # pop() takes them in the order drawn

    frontier.append(expand())
    expansions = 1
    while len(path) < paddles:
        if not frontier[-1]:
            frontier.pop()
            if not path:
                return None
            path.pop()
            continue
        path.append(frontier[-1].pop())
        if len(path) == paddles:
            break
        if expansions >= budget:
            break
        frontier.append(expand())
        expansions += 1
    if len(path) < paddles and not (allow_partial and path):
        return None
    canvas.commit(np.concatenate([entry[3] for entry in path]))
    return [(entry[0], entry[1]) for entry in path]


def _free_point(canvas: _Canvas, rng) -> np.ndarray | None:
    """A uniformly random point of the frame that is away from every finished snake, or None if there is none."""
    scale = canvas.scale
    low, high = math.ceil(canvas.low * scale), math.floor(canvas.high * scale)
    free = np.flatnonzero(~canvas.blocked[low:high, low:high])
    if len(free) == 0:
        return None
    y, x = np.divmod(free[rng.integers(len(free))], high - low)
    return (np.array([x, y], dtype=np.float64) + low + rng.random(2)) / scale


def render_pathfinder(rng: np.random.Generator, settings: PathfinderSettings, label: int, max_restarts: int = 100):
    """One image: (uint8 array (R, R), info) where info holds `snakes` (A, B, then distractors, each a list of
    (p0, p1) paddles in pixel coordinates x, y) and `markers` (two (x, y) centres)."""
    from PIL import Image, ImageDraw

    s = settings
    for _ in range(max_restarts):
        canvas = _Canvas(s)
        a_start = rng.uniform(canvas.low, canvas.high, size=2)
        snake_a = _grow(canvas, rng, a_start, rng.uniform(0, 2 * math.pi), s.contour_length)
        if snake_a is None:
            continue
        snake_b = None
        for _ in range(20):
            phi = rng.uniform(0, 2 * math.pi)
            b_start = a_start + s.seed_distance * np.array([math.cos(phi), math.sin(phi)])
            snake_b = _grow(canvas, rng, b_start, rng.uniform(0, 2 * math.pi), s.contour_length)
            if snake_b is not None:
                break
        if snake_b is None:
            continue
        snakes = [snake_a, snake_b]
        for _ in range(s.num_distractors):
            for _ in range(3):
                start = _free_point(canvas, rng)
                if start is None:
                    break
                distractor = _grow(
                    canvas,
                    rng,
                    start,
                    rng.uniform(0, 2 * math.pi),
                    s.distractor_length,
                    budget=12,
                    allow_partial=True,
                )
                if distractor is not None:
                    snakes.append(distractor)
                    break
        break
    else:
        raise RuntimeError(f"Pathfinder: could not place the two snakes in {max_restarts} tries; check the settings.")

    markers = [snake_a[0][0], (snake_a if label == 1 else snake_b)[-1][1]]
    scale = s.supersample
    image = Image.new("L", (s.resolution * scale,) * 2, 0)
    draw = ImageDraw.Draw(image)
    width = max(1, round(s.thickness * scale))
    for snake in snakes:
        for p0, p1 in snake:
            draw.line([tuple(p0 * scale), tuple(p1 * scale)], fill=255, width=width)
    radius = s.marker_radius * scale
    for x, y in markers:
        draw.ellipse([x * scale - radius, y * scale - radius, x * scale + radius, y * scale + radius], fill=255)
    pixels = np.asarray(image.resize((s.resolution, s.resolution), Image.Resampling.BOX), dtype=np.uint8)
    return pixels, {"snakes": snakes, "markers": markers}


def generate_pathfinder(
    seed: int, num_train: int, num_validation: int, num_test: int, settings: PathfinderSettings, pixels: str
):
    """The three splits without caching. Columns: `input_ids` (uint8 pixels, R*R) or `values` (float32 pixel/255),
    `label` (ClassLabel: 0 = disconnected, 1 = connected), `length`."""
    from datasets import DatasetDict

    rng = np.random.default_rng(seed)
    column = "input_ids" if pixels == "tokens" else "values"
    length = settings.resolution**2
    splits = {}
    total = num_train + num_validation + num_test
    with tqdm(total=total, desc=f"pathfinder{settings.resolution}", unit="img", leave=False, mininterval=1.0) as bar:
        for name, size in split_sizes(num_train, num_validation, num_test).items():
            labels = balanced_labels(rng, size, 2)
            images = np.zeros((size, length), dtype=np.uint8)
            for i, label in enumerate(labels):
                images[i] = render_pathfinder(rng, settings, int(label))[0].reshape(-1)
                bar.update(1)
            data = images if pixels == "tokens" else images.astype(np.float32) / 255.0
            splits[name] = classification_split(column, data, labels, ["disconnected", "connected"], data.dtype)
    return DatasetDict(splits)


def pathfinder(
    seed: int = 0,
    cache_dir=None,
    *,
    resolution: int = 32,
    num_train: int = DEFAULTS["num_train"],
    num_validation: int = DEFAULTS["num_validation"],
    num_test: int = DEFAULTS["num_test"],
    pixels: str = "tokens",
    contour_length: int | None = None,
    num_distractors: int | None = None,
):
    """Pathfinder (resolution=32, sequence 1,024) or Path-X (resolution=128, sequence 16,384) as a cached
    `DatasetDict`. `pixels="tokens"` gives `input_ids` (0-255, vocabulary 256); `pixels="values"` gives `values`
    (float pixel / 255, input_dim 1). `contour_length` (paddles per snake; LRA's "hard" set: 14) and
    `num_distractors` (distractor snakes) override `SETTINGS[resolution]`. LRA has about 200k images per resolution;
    here about 70 (32 px) and 40 (128 px) images per second on one core."""
    if resolution not in SETTINGS:
        raise ValueError(f"`resolution` must be one of {sorted(SETTINGS)}, got {resolution!r}.")
    if pixels not in ("tokens", "values"):
        raise ValueError(f"`pixels` must be 'tokens' or 'values', got {pixels!r}.")
    check_split_sizes(num_train, num_validation, num_test)
    settings = SETTINGS[resolution]
    if contour_length is not None:
        check_positive(contour_length=contour_length)
        settings = replace(settings, contour_length=contour_length)
    if num_distractors is not None:
        if not isinstance(num_distractors, int) or num_distractors < 0:
            raise ValueError(f"`num_distractors` must be a non-negative integer, got {num_distractors!r}.")
        settings = replace(settings, distractor_budget=num_distractors * settings.distractor_length)
    arguments = {
        "seed": seed,
        "resolution": resolution,
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
        "pixels": pixels,
        "contour_length": contour_length,
        "num_distractors": num_distractors,
    }
    name = "pathfinder" if resolution == 32 else "pathx"

    def build():
        return generate_pathfinder(seed, num_train, num_validation, num_test, settings, pixels)

    return cached(name, arguments, cache_dir, build)
