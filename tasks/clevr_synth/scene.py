"""Scene sampling as CLEVR's ``render_images.py`` does it, without Blender.

A scene is 3 to 10 objects on the ground plane z = 0, inside x, y in [-3, 3]. Each object draws a size
(large 0.7 / small 0.35, CLEVR's scale ``r``), a position, a shape, a colour, a material and a rotation
(degrees about z). Cubes are scaled by r / sqrt(2), as CLEVR does, so their half side is r / sqrt(2).
A position is re-drawn (up to 50 times, then the whole scene restarts) when it comes closer than
``min_dist`` = 0.25 to an earlier object (edge to edge) or when, along any of the four ground
directions (left/right/front/behind, from the camera), it is less than ``margin`` = 0.4 away from an
earlier object (so "left of" is never ambiguous). Once placed, every object must cover at least
``min_pixels`` (200 at 480x320, scaled with the image area) in an id buffer ray-cast at a fixed small
resolution (160 px wide, the output's aspect ratio), else the whole scene is drawn again. The scene
therefore depends on the seed and the aspect ratio only, not on the output size nor on whether it is
rendered (the no-render path gives the same scenes).

The camera is Blender's default camera (CLEVR's base scene), its position jittered by up to 0.5 per
axis; lights are jittered too. Relationships are CLEVR's: ``j`` is left of ``i`` when
``(p_j - p_i) . left > 0.2`` with ``left`` the camera's left projected onto the ground.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from . import programs as P

SIZE_SCALE = {"large": 0.7, "small": 0.35}
COLOR_RGB = {  # CLEVR 1.0's colours (sRGB 0-255)
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
BASE_CAMERA = (7.358891, -6.925791, 4.958309)
BASE_ROTATION_DEG = (63.559, 0.620, 46.692)  # Blender XYZ Euler of the default camera
LENS_MM, SENSOR_MM = 42.0, 32.0  # horizontal sensor fit


@dataclass(frozen=True)
class Camera:
    location: tuple[float, float, float]
    right: tuple[float, float, float]
    up: tuple[float, float, float]
    forward: tuple[float, float, float]

    @staticmethod
    def jittered(rng: random.Random, jitter: float = 0.5) -> Camera:
        loc = tuple(c + 2.0 * jitter * (rng.random() - 0.5) for c in BASE_CAMERA)
        rx, ry, rz = (math.radians(a) for a in BASE_ROTATION_DEG)
        cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
        # R = Rz @ Ry @ Rx (Blender XYZ Euler); columns are the camera's local x, y, z axes in the world
        R = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) \
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        return Camera(loc, tuple(R[:, 0]), tuple(R[:, 1]), tuple(-R[:, 2]))

    def tan_half(self, width: int, height: int) -> tuple[float, float]:
        tw = SENSOR_MM / 2 / LENS_MM
        return tw, tw * height / width

    def rays(self, width: int, height: int) -> np.ndarray:
        """Unit ray directions through pixel centres, float32 (H, W, 3)."""
        tw, th = self.tan_half(width, height)
        xs = ((np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1) * tw
        ys = (1 - (np.arange(height, dtype=np.float32) + 0.5) / height * 2) * th
        f, r, u = (np.asarray(v, np.float32) for v in (self.forward, self.right, self.up))
        d = f[None, None] + xs[None, :, None] * r[None, None] + ys[:, None, None] * u[None, None]
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        return d

    def rays_at(self, px: np.ndarray, py: np.ndarray, width: int, height: int) -> np.ndarray:
        """Unit ray directions through arbitrary pixel positions (float arrays), float32 (..., 3)."""
        tw, th = self.tan_half(width, height)
        xs = (px / width * 2 - 1) * tw
        ys = (1 - py / height * 2) * th
        f, r, u = (np.asarray(v, np.float32) for v in (self.forward, self.right, self.up))
        d = f + xs[..., None] * r + ys[..., None] * u
        return (d / np.linalg.norm(d, axis=-1, keepdims=True)).astype(np.float32)

    def project(self, point, width: int, height: int) -> tuple[float, float, float]:
        """(x, y, depth) in pixels, like Blender's world_to_camera_view scaled to the image."""
        d = np.asarray(point, float) - np.asarray(self.location)
        depth = float(d @ np.asarray(self.forward))
        tw, th = self.tan_half(width, height)
        cx = float(d @ np.asarray(self.right)) / (depth * tw)
        cy = float(d @ np.asarray(self.up)) / (depth * th)
        return (cx + 1) / 2 * width, (1 - cy) / 2 * height, depth

    def directions(self) -> dict[str, tuple[float, float, float]]:
        """CLEVR's ground-plane directions: behind/front/left/right, plus above/below."""
        def flat(v):
            v = np.array([v[0], v[1], 0.0])
            return v / np.linalg.norm(v)
        behind, left = flat(self.forward), flat(-np.asarray(self.right))
        out = {"behind": behind, "front": -behind, "left": left, "right": -left,
               "above": np.array([0.0, 0.0, 1.0]), "below": np.array([0.0, 0.0, -1.0])}
        return {k: tuple(round(float(x), 6) + 0.0 for x in v) for k, v in out.items()}


def sample_lights(rng: random.Random, jitter: float = 1.0) -> dict:
    """Key light direction (unit, towards the light) and jittered intensities."""
    # key light: from the camera's left and somewhat in front, ~50 degrees up (shadows fall right/back)
    az = math.radians(-160.0 + 12.0 * jitter * (rng.random() - 0.5) * 2)
    el = math.radians(60.0 + 6.0 * jitter * (rng.random() - 0.5) * 2)
    key = (math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el))
    return {"key": key, "key_intensity": 1.0 + 0.08 * (rng.random() - 0.5)}


def relationships(objects: list[dict], directions: dict, eps: float = 0.2) -> dict[str, list[list[int]]]:
    out = {}
    for name in P.RELATIONS:
        d = directions[name]
        rel = []
        for i, a in enumerate(objects):
            xa = a["3d_coords"]
            rel.append([j for j, b in enumerate(objects) if j != i and
                        sum((b["3d_coords"][k] - xa[k]) * d[k] for k in range(3)) > eps])
        out[name] = rel
    return out


def sample_scene(rng: random.Random, aspect: float = 1.5, min_objects: int = 3, max_objects: int = 10,
                 min_dist: float = 0.25, margin: float = 0.4, max_retries: int = 50,
                 min_pixels: int = 200, check_visibility: bool = True) -> dict:
    """One CLEVR-style scene: objects, directions, relationships (+ private ``_camera``, ``_lights``)."""
    camera = Camera.jittered(rng)
    lights = sample_lights(rng)
    directions = camera.directions()
    num = rng.randint(min_objects, max_objects)
    while True:
        objects = _place_objects(rng, num, directions, min_dist, margin, max_retries)
        if not check_visibility or _all_visible(objects, camera, aspect, min_pixels):
            break
    scene = {"objects": objects, "directions": directions,
             "relationships": relationships(objects, directions),
             "_camera": camera, "_lights": lights}
    return scene


def _place_objects(rng: random.Random, num: int, directions: dict, min_dist: float, margin: float,
                   max_retries: int) -> list[dict]:
    while True:
        positions, objects = [], []
        for _ in range(num):
            size = rng.choice(P.SIZES[::-1])
            r = SIZE_SCALE[size]
            for _tries in range(max_retries):
                x, y = rng.uniform(-3, 3), rng.uniform(-3, 3)
                ok = True
                for xx, yy, rr in positions:
                    dx, dy = x - xx, y - yy
                    if math.hypot(dx, dy) - r - rr < min_dist:
                        ok = False
                        break
                    for name in P.RELATIONS:
                        d = directions[name]
                        if 0 < dx * d[0] + dy * d[1] < margin:
                            ok = False
                            break
                    if not ok:
                        break
                if ok:
                    break
            else:
                break  # restart the whole scene
            shape = rng.choice(P.SHAPES)
            color = rng.choice(P.COLORS)
            material = rng.choice(P.MATERIALS)
            if shape == "cube":
                r /= math.sqrt(2)
            theta = 360.0 * rng.random()
            positions.append((x, y, r))
            objects.append({"shape": shape, "color": color, "size": size, "material": material,
                            "3d_coords": [round(x, 6), round(y, 6), round(r, 6)],
                            "rotation": round(theta, 6)})
        if len(objects) == num:
            return objects


#: the crop (fraction of width and height, half on each side) inside which every object must be visible: that of
#: configs/clevr_vqa_base.yaml's image serializer
VISIBLE_CROP = 0.1


def _all_visible(objects: list[dict], camera: Camera, aspect: float, min_pixels: int) -> bool:
    from .raytrace import id_buffer

    w = 160
    h = max(1, round(w / aspect))
    ids = id_buffer(objects, camera, w, h)
    # counted inside the central crop the VQA configs feed the model (serializer.image.crop): an object seen only
    # in the cropped-off margin made its questions unanswerable from the input (27 of 6,000 at 600 images)
    dx, dy = round(w * VISIBLE_CROP / 2), round(h * VISIBLE_CROP / 2)
    ids = ids[dy:h - dy, dx:w - dx]
    counts = np.bincount(ids[ids >= 0].ravel(), minlength=len(objects))
    need = min_pixels * (w * h) / (480 * 320)
    return bool((counts >= need).all())
