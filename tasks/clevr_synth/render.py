"""A numpy ray caster that draws CLEVR-looking scenes (no Blender); the intersections are in :mod:`.raytrace`.

One primary ray per pixel. Each object is intersected analytically only inside its projected
bounding box (sphere: quadratic; cylinder: side quadratic + top disc; cube: slabs in the object's
frame), with a depth buffer across objects; every other pixel sees the ground plane z = 0. Edges of
cubes and cylinders are shaded as slightly rounded (CLEVR's models are bevelled) by taking the normal
from the nearest point of an inner, shrunken solid.

Shading: a grey ground whose brightness falls off away from a lit spot in front of the camera (CLEVR's
lamps and backdrop give this gradient); one key light casting soft shadows onto the ground (analytic
per shape: distance to the shadow ellipse / stadium / hull, with a penumbra growing with the distance
from the occluder) plus contact darkening; fill and back lights; rubber is Lambertian with a faint
sheen, metal reflects a grey environment (the ground below the horizon, a brighter backdrop above)
tinted by its colour, with sharp highlights of the lamps. Object edges are anti-aliased by blending the
pixels on id-buffer edges with their 3x3 neighbourhood.
"""

from __future__ import annotations

import math

import numpy as np

from .raytrace import _INF, _bbox, _geometry, _intersect, _trace, _trace_rays, _unit_rows
from .scene import COLOR_RGB, Camera


def _smooth(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Ground:
    """Brightness of the bare ground at (x, y): a lit spot in front of the camera fading into grey."""

    def __init__(self, camera: Camera):
        f = np.asarray(camera.forward)
        loc = np.asarray(camera.location)
        fx, fy = f[0], f[1]
        nrm = math.hypot(fx, fy)
        fx, fy = fx / nrm, fy / nrm
        rx, ry = np.asarray(camera.right)[:2]
        # spot: where the lamps point, a little in front of the scene centre, slightly to the right
        self.sx = loc[0] + fx * 5.8 + rx * 1.8
        self.sy = loc[1] + fy * 5.8 + ry * 1.8
        self.lx, self.ly = loc[0], loc[1]

    def __call__(self, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
        d2 = (gx - self.sx) ** 2 + (gy - self.sy) ** 2
        far = np.sqrt((gx - self.lx) ** 2 + (gy - self.ly) ** 2)
        base = 0.14 + 0.07 * np.exp(-d2 / (2 * 6.0 ** 2)) + 0.09 * np.exp(-d2 / (2 * 3.2 ** 2))
        return base - 0.008 * _smooth(12.0, 30.0, far)


def _shadow(objects: list[dict], camera: Camera, key: np.ndarray, gx: np.ndarray, gy: np.ndarray,
            w: int, h: int) -> np.ndarray:
    """Occlusion of the key light (0..1) at ground points (soft shadows + contact darkening)."""
    occ = np.zeros((h, w), np.float32)
    kxy = key[:2] / key[2]  # ground offset per unit height, towards the light
    for obj in objects:
        c, R, H = _geometry(obj)
        x, y, r = obj["3d_coords"]
        tip = c[:2] - kxy * H
        pts = []
        m = R + 0.45
        for px, py in ((c[0], c[1]), (tip[0], tip[1])):
            pts += [[px - m, py - m, 0], [px + m, py - m, 0], [px - m, py + m, 0], [px + m, py + m, 0]]
        win = _bbox(np.array(pts), camera, w, h)
        if win is None:
            continue
        y0, y1, x0, x1 = win
        px, py = gx[y0:y1, x0:x1], gy[y0:y1, x0:x1]
        if obj["shape"] == "sphere":
            vx, vy, vz = x - px, y - py, r
            t = vx * key[0] + vy * key[1] + vz * key[2]
            d = np.sqrt(np.maximum(vx * vx + vy * vy + vz * vz - t * t, 0))
            wpen = 0.04 + 0.12 * np.maximum(t, 0)  # t <= 0 is masked below; keeps the edge width > 0
            o = _smooth(r + wpen, r - wpen, d) * (t > 0)
            foot = np.sqrt((px - x) ** 2 + (py - y) ** 2) - 0.55 * r
        elif obj["shape"] == "cylinder":
            ax, ay = c[0], c[1]
            bx, by = tip
            ex, ey = bx - ax, by - ay
            u = np.clip(((px - ax) * ex + (py - ay) * ey) / (ex * ex + ey * ey + 1e-9), 0, 1)
            d = np.sqrt((px - ax - u * ex) ** 2 + (py - ay - u * ey) ** 2)
            wpen = 0.04 + 0.12 * u * H / key[2]
            o = _smooth(r + wpen, r - wpen, d)
            foot = np.sqrt((px - x) ** 2 + (py - y) ** 2) - r
        else:
            th = math.radians(obj["rotation"])
            ct, st = math.cos(th), math.sin(th)
            corners = []
            for a in (-r, r):
                for b in (-r, r):
                    wx, wy = x + ct * a - st * b, y + st * a + ct * b
                    corners += [(wx, wy), (wx - kxy[0] * H, wy - kxy[1] * H)]
            hull = _convex_hull(corners)
            sd = None
            for k in range(len(hull)):
                (ax, ay), (bx, by) = hull[k], hull[(k + 1) % len(hull)]
                nx, ny = by - ay, -(bx - ax)
                ln = math.hypot(nx, ny) + 1e-12
                e = ((px - ax) * nx + (py - ay) * ny) / ln
                sd = e if sd is None else np.maximum(sd, e)
            # penumbra grows with the distance from the cube's footprint
            lx, ly = px - x, py - y
            along = np.clip((lx * -kxy[0] + ly * -kxy[1]) / (kxy @ kxy + 1e-9) / H, 0, 1)
            wpen = 0.04 + 0.12 * along * H / key[2]
            o = _smooth(wpen, -wpen, sd)
            ll = np.abs(ct * lx + st * ly), np.abs(-st * lx + ct * ly)
            foot = np.sqrt(np.maximum(ll[0] - r, 0) ** 2 + np.maximum(ll[1] - r, 0) ** 2)
        contact = 0.45 * np.exp(-np.maximum(foot, 0) / (0.18 * r + 0.05))
        sub = occ[y0:y1, x0:x1]
        np.maximum(sub, np.maximum(o, contact).astype(np.float32), out=sub)
    return occ


def _convex_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Counter-clockwise hull (Andrew's monotone chain)."""
    pts = sorted(set(points))
    if len(pts) <= 2:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


_SRGB_LUT = None


def _to_srgb8(img: np.ndarray) -> np.ndarray:
    """Linear [0, 1] -> sRGB uint8 through a 4096-entry table (what Blender's default view does)."""
    global _SRGB_LUT
    if _SRGB_LUT is None:
        x = np.linspace(0, 1, 4096)
        y = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
        _SRGB_LUT = (y * 255 + 0.5).astype(np.uint8)
    return _SRGB_LUT[(np.clip(img, 0, 1) * 4095 + 0.5).astype(np.int32)]


def render(scene: dict, width: int = 480, height: int = 320) -> np.ndarray:
    """RGB image, uint8 (height, width, 3), of a scene from :func:`scene.sample_scene`.

    Shading is done in linear light with CLEVR's colours used as linear albedos (as Blender does with
    them), then encoded to sRGB. Pixels on object edges (id buffer changes) get 4 more samples.
    """
    camera: Camera = scene["_camera"]
    objects = scene["objects"]
    sh = _Shader(scene)
    D, T, ID, N = _trace(objects, camera, width, height)
    o = sh.o
    tg = -o[2] / np.minimum(D[..., 2], -1e-4)
    gx, gy = o[0] + tg * D[..., 0], o[1] + tg * D[..., 1]
    occ = _shadow(objects, camera, sh.key, gx, gy, width, height)
    img = sh.shade(D.reshape(-1, 3), T.ravel(), ID.ravel(), N.reshape(-1, 3), occ.ravel())
    img = img.reshape(height, width, 3)

    # anti-aliasing: supersample the pixels where the id buffer changes
    edge = np.zeros((height, width), bool)
    edge[:, 1:] |= ID[:, 1:] != ID[:, :-1]
    edge[:, :-1] |= ID[:, 1:] != ID[:, :-1]
    edge[1:, :] |= ID[1:, :] != ID[:-1, :]
    edge[:-1, :] |= ID[1:, :] != ID[:-1, :]
    ey, ex = np.nonzero(edge)
    if len(ey):
        acc = img[ey, ex].copy()
        for ox, oy in ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)):
            px, py = ex + np.float32(ox), ey + np.float32(oy)
            d = camera.rays_at(px, py, width, height)
            t, ids, n = _trace_rays(objects, camera, d, px, py, width, height)
            acc += sh.shade(d, t, ids, n, occ[ey, ex])
        img[ey, ex] = acc / 5.0
    return _to_srgb8(img)


class _Shader:
    """Colour of rays given their hits (flat arrays), in linear light."""

    def __init__(self, scene: dict):
        camera: Camera = scene["_camera"]
        lights = scene["_lights"]
        self.camera = camera
        self.objects = scene["objects"]
        self.o = np.asarray(camera.location, np.float32)
        self.key = _unit(lights["key"])
        self.ik = lights.get("key_intensity", 1.0)
        right = np.asarray(camera.right, np.float32)
        back = np.asarray(camera.forward, np.float32) * np.float32([1, 1, 0])
        self.fill = _unit(right * 1.0 - back * 0.4 + np.float32([0, 0, 0.8]))
        self.rim = _unit(back * 1.0 + np.float32([0, 0, 0.9]))
        self.ground = _Ground(camera)
        self.albedo = np.array([COLOR_RGB[ob["color"]] for ob in self.objects] or [(0, 0, 0)],
                               np.float32) / 255.0
        self.metal = np.array([ob["material"] == "metal" for ob in self.objects] or [False])

    def shade(self, D, T, ID, N, occ) -> np.ndarray:
        o, key, ik, fill, rim, ground = self.o, self.key, self.ik, self.fill, self.rim, self.ground
        img = np.empty((len(D), 3), np.float32)
        gsel = ID < 0
        if gsel.any():
            dg = D[gsel]
            tg = -o[2] / np.minimum(dg[:, 2], -1e-4)
            g = ground(o[0] + tg * dg[:, 0], o[1] + tg * dg[:, 1]) * (1.0 - 0.4 * ik * occ[gsel])
            img[gsel] = g[:, None] * np.float32([1.02, 1.0, 0.97])
        sel = ~gsel
        if not sel.any():
            return img
        ids = ID[sel]
        n = N[sel]
        d = D[sel]
        p = o + T[sel][:, None] * d
        albedo = self.albedo[ids]
        metal = self.metal[ids]
        ndk = n @ key
        ndf = np.maximum(n @ fill, 0)
        ndr = np.maximum(n @ rim, 0)
        ao = 0.7 + 0.3 * _smooth(0.0, 0.45, p[:, 2])  # the ground occludes the lowest parts a little
        shadow = self._object_shadows(p, ids)
        irr = (ik * 0.42 * _smooth(-0.3, 1.0, ndk) ** 1.5 * (1 - 0.8 * shadow) + 0.07 * ndf + 0.05 * ndr
               + (0.055 + 0.03 * n[:, 2])) * ao
        hv = _unit_rows(key[None] - d)
        sheen = 0.018 * np.maximum(np.sum(n * hv, -1), 0) ** 8 * ik
        col = albedo * irr[:, None] + (sheen + 0.006)[:, None]
        if metal.any():
            mn, md, mp, ma = n[metal], d[metal], p[metal], albedo[metal]
            refl = md - 2 * np.sum(md * mn, -1, keepdims=True) * mn
            rz = refl[:, 2]
            tgr = -mp[:, 2] / np.minimum(rz, -1e-4)
            env_g = ground(mp[:, 0] + tgr * refl[:, 0], mp[:, 1] + tgr * refl[:, 1])
            # above the horizon: a backdrop brighter towards the lamps, dark behind the camera
            fwd = np.asarray(self.camera.forward, np.float32)
            toward_lamp = np.maximum(refl[:, 0] * key[0] + refl[:, 1] * key[1], 0)
            behind_cam = _smooth(0.0, -0.8, refl @ fwd)
            env_s = (0.12 + 0.42 * _smooth(0.05, 0.9, rz) + 0.25 * toward_lamp ** 2) * (1 - 0.6 * behind_cam)
            env = np.where(rz < 0, env_g, env_s)
            env = env * (0.35 + 0.65 * _smooth(0.0, 0.15, np.abs(rz)))  # dark band at the horizon
            hk = np.maximum(refl @ key, 0)
            hf = np.maximum(refl @ fill, 0)
            lamps = ik * (3.0 * hk ** 150 + 0.5 * hk ** 12) + 0.9 * hf ** 60
            env3 = np.repeat((env + lamps)[:, None], 3, 1)
            self._reflect_objects(mp, refl, ids[metal], env3)
            cosv = np.clip(-np.sum(md * mn, -1), 0, 1)
            fres = 0.04 + 0.3 * (1 - cosv) ** 5
            mcol = ma * env3 * (0.85 + 0.15 * ao[metal])[:, None]
            mcol = mcol * (1 - fres[:, None]) + env3 * fres[:, None]
            mcol += ma * (0.05 * irr[metal])[:, None]
            col[metal] = mcol
        img[sel] = col
        return img

    def _object_shadows(self, p: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Soft occlusion of the key light at object points by the other objects (as spheres)."""
        occ = np.zeros(len(p), np.float32)
        key = self.key
        for j, obj in enumerate(self.objects):
            x, y, r = obj["3d_coords"]
            rad = {"sphere": r, "cylinder": 1.05 * r, "cube": 1.2 * r}[obj["shape"]]
            vx, vy, vz = x - p[:, 0], y - p[:, 1], r - p[:, 2]
            t = vx * key[0] + vy * key[1] + vz * key[2]
            cand = (t > 0) & (own != j)
            if not cand.any():
                continue
            d2 = vx * vx + vy * vy + vz * vz - t * t
            w = 0.04 + 0.12 * np.maximum(t, 0)
            o = _smooth(rad + w, rad - w, np.sqrt(np.maximum(d2, 0))) * cand
            np.maximum(occ, o, out=occ)
        return occ

    def _reflect_objects(self, p: np.ndarray, refl: np.ndarray, own: np.ndarray, env3: np.ndarray) -> None:
        """Replace ``env3`` by the (simply shaded) colour of other objects seen in the reflection."""
        k = len(p)
        best = np.full(k, _INF, np.float32)
        hit_id = np.full(k, -1, np.int16)
        hit_n = np.zeros((k, 3), np.float32)
        for j, obj in enumerate(self.objects):
            cand = np.nonzero(own != j)[0]
            if not len(cand):
                continue
            t, normals = _intersect(obj, p[cand], refl[cand])
            closer = (t > 1e-3) & (t < best[cand])
            if not closer.any():
                continue
            idx = cand[closer]
            best[idx] = t[closer]
            hit_id[idx] = j
            hit_n[idx] = normals(closer)
        hit = hit_id >= 0
        if hit.any():
            hn, hj = hit_n[hit], hit_id[hit]
            lit = 0.06 + 0.03 * hn[:, 2] + 0.4 * self.ik * np.maximum(hn @ self.key, 0)
            lit = np.where(self.metal[hj], 0.22, lit)
            env3[hit] = 0.7 * self.albedo[hj] * lit[:, None] + 0.3 * env3[hit]  # slightly glossy, not a mirror
