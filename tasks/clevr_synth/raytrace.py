"""Ray casting for the CLEVR-format renderer: analytic intersections of rays with the scene's spheres,
cylinders and bevelled cubes (each tested only inside its projected bounding box), a depth buffer across
objects, and the object-id buffer the scene sampler uses for visibility. Shading is :mod:`.render`.
"""

from __future__ import annotations

import math

import numpy as np

from .scene import Camera

_INF = np.float32(np.inf)
_BEVEL = 0.12  # fraction of the half size rounded off at edges


def _geometry(obj: dict) -> tuple[np.ndarray, float, float]:
    """(base centre (3,), footprint radius, height) of an object."""
    x, y, r = obj["3d_coords"]
    if obj["shape"] == "cube":
        return np.array([x, y, 0.0]), r * math.sqrt(2), 2 * r
    return np.array([x, y, 0.0]), r, 2 * r


def _bbox(points: np.ndarray, camera: Camera, w: int, h: int, pad: int = 2):
    """Pixel window (y0, y1, x0, x1) covering world points (N, 3), or None when outside the image."""
    loc = np.asarray(camera.location)
    d = points - loc
    depth = d @ np.asarray(camera.forward)
    if (depth <= 1e-3).any():
        return 0, h, 0, w
    tw, th = camera.tan_half(w, h)
    px = ((d @ np.asarray(camera.right)) / (depth * tw) + 1) / 2 * w
    py = (1 - (d @ np.asarray(camera.up)) / (depth * th)) / 2 * h
    x0, x1 = int(math.floor(px.min())) - pad, int(math.ceil(px.max())) + pad
    y0, y1 = int(math.floor(py.min())) - pad, int(math.ceil(py.max())) + pad
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1


def _box_corners(c: np.ndarray, R: float, H: float) -> np.ndarray:
    xs, ys, zs = (c[0] - R, c[0] + R), (c[1] - R, c[1] + R), (0.0, H)
    return np.array([[a, b, z] for a in xs for b in ys for z in zs])


def _intersect(obj: dict, o: np.ndarray, D: np.ndarray):
    """Ray parameter t (inf = miss) for rays o + t D (D: (h, w, 3)), and a function giving the unit
    normals at the pixels of a boolean mask (computed only where needed)."""
    x, y, r = obj["3d_coords"]
    dx, dy, dz = D[..., 0], D[..., 1], D[..., 2]
    shape = obj["shape"]
    if shape == "sphere":
        ox, oy, oz = o[..., 0] - x, o[..., 1] - y, o[..., 2] - r
        b = dx * ox + dy * oy + dz * oz
        disc = b * b - (ox * ox + oy * oy + oz * oz - r * r)
        t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), _INF)

        def normals(m):
            tm, dm = t[m][:, None], D[m]
            return (_origin(ox, oy, oz, m) + tm * dm) / r
        return t, normals
    if shape == "cylinder":
        hgt = 2 * r
        ox, oy, oz = o[..., 0] - x, o[..., 1] - y, o[..., 2]
        a = dx * dx + dy * dy + 1e-12
        b = ox * dx + oy * dy
        disc = b * b - a * (ox * ox + oy * oy - r * r)
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
        zs = oz + ts * dz
        ts = np.where((disc > 0) & (zs >= 0) & (zs <= hgt) & (ts > 0), ts, _INF)
        tt = (hgt - oz) / np.where(np.abs(dz) > 1e-9, dz, -1e-9)
        qx, qy = ox + tt * dx, oy + tt * dy
        tt = np.where((qx * qx + qy * qy <= r * r) & (tt > 0), tt, _INF)
        t = np.minimum(ts, tt)

        def normals(m):
            q = _origin(ox, oy, oz, m) + t[m][:, None] * D[m]
            rho = np.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2) + 1e-9
            bev = _BEVEL * r
            k = 1 - np.minimum(rho, r - bev) / rho
            n = np.stack([q[:, 0] * k, q[:, 1] * k, q[:, 2] - np.clip(q[:, 2], bev, hgt - bev)], -1)
            return _unit_rows(n)
        return t, normals
    # cube: slabs in the object frame
    s = r
    th = math.radians(obj["rotation"])
    ct, st = math.cos(th), math.sin(th)
    wx, wy, wz = o[..., 0] - x, o[..., 1] - y, o[..., 2] - s
    lo = (ct * wx + st * wy, -st * wx + ct * wy, wz)
    ldx, ldy = ct * dx + st * dy, -st * dx + ct * dy
    tn, tf = None, None
    for oc, dc in ((lo[0], ldx), (lo[1], ldy), (lo[2], dz)):
        inv = 1.0 / np.where(np.abs(dc) > 1e-9, dc, 1e-9)
        t1, t2 = (-s - oc) * inv, (s - oc) * inv
        a1, a2 = np.minimum(t1, t2), np.maximum(t1, t2)
        tn = a1 if tn is None else np.maximum(tn, a1)
        tf = a2 if tf is None else np.minimum(tf, a2)
    t = np.where((tn < tf) & (tn > 0), tn, _INF)

    def normals(m):
        tm = t[m]
        lm = _origin(*lo, m)
        q = lm + tm[:, None] * np.stack([ldx[m], ldy[m], dz[m]], -1)
        inner = s * (1 - _BEVEL)
        nl = _unit_rows(q - np.clip(q, -inner, inner))
        return np.stack([ct * nl[:, 0] - st * nl[:, 1], st * nl[:, 0] + ct * nl[:, 1], nl[:, 2]], -1)
    return t, normals


def _origin(ox, oy, oz, m) -> np.ndarray:
    """Ray origins relative to an object, (3,) for a shared origin or (k, 3) picked by mask ``m``."""
    if np.ndim(ox) == 0:
        return np.array([ox, oy, oz], np.float32)
    return np.stack([ox[m], oy[m], oz[m]], -1)


def _on_screen(objects: list[dict], camera: Camera, w: int, h: int):
    """``(index, object, (y0, y1, x0, x1))`` for each object whose bounding box projects into the image."""
    for i, obj in enumerate(objects):
        c, R, H = _geometry(obj)
        win = _bbox(_box_corners(c, R, H), camera, w, h)
        if win is not None:
            yield i, obj, win


def _trace(objects: list[dict], camera: Camera, w: int, h: int, want_normals: bool = True):
    D = camera.rays(w, h)
    o = np.asarray(camera.location, np.float32)
    T = np.full((h, w), _INF, np.float32)
    ID = np.full((h, w), -1, np.int16)
    N = np.zeros((h, w, 3), np.float32) if want_normals else None
    for i, obj, (y0, y1, x0, x1) in _on_screen(objects, camera, w, h):
        t, normals = _intersect(obj, o, D[y0:y1, x0:x1])
        closer = t < T[y0:y1, x0:x1]
        T[y0:y1, x0:x1][closer] = t[closer]
        ID[y0:y1, x0:x1][closer] = i
        if want_normals:
            N[y0:y1, x0:x1][closer] = normals(closer)
    return D, T, ID, N


def id_buffer(objects: list[dict], camera: Camera, w: int, h: int) -> np.ndarray:
    """Object index per pixel (-1 = ground)."""
    return _trace(objects, camera, w, h, want_normals=False)[2]


def _trace_rays(objects: list[dict], camera: Camera, D: np.ndarray, px: np.ndarray, py: np.ndarray,
                w: int, h: int):
    """Like :func:`_trace` for a flat list of rays through pixel positions (px, py)."""
    o = np.asarray(camera.location, np.float32)
    k = len(D)
    T = np.full(k, _INF, np.float32)
    ID = np.full(k, -1, np.int16)
    N = np.zeros((k, 3), np.float32)
    for i, obj, (y0, y1, x0, x1) in _on_screen(objects, camera, w, h):
        sel = np.nonzero((px >= x0) & (px < x1) & (py >= y0) & (py < y1))[0]
        if not len(sel):
            continue
        t, normals = _intersect(obj, o, D[sel])
        closer = t < T[sel]
        idx = sel[closer]
        T[idx] = t[closer]
        ID[idx] = i
        N[idx] = normals(closer)
    return T, ID, N


def _unit_rows(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)
