"""The echo phantom: paired synthetic apical echo cine + 12-lead ECG with known ground truth.

Geometry lives in a *reference* (end-diastolic) frame in normalised sector units: lateral ``u`` and
depth ``d``, both in units of the sector radius, apex at (0, 0). Each chamber is an ellipse in that
frame. Every output frame is rendered by mapping each pixel back to the reference frame (a smooth,
roughly area-preserving contraction field around each chamber) and evaluating there (1) the
analytic tissue reflectivity and (2) one fixed complex-Gaussian speckle field. Speckle therefore
moves with the tissue instead of being redrawn per frame.

The LV cavity area follows a volume curve driven by the ECG: maximum (end-diastole) exactly at each
R-peak, minimum (end-systole) at each T-wave end. Volume is derived from area as ``V = A ** 1.5``
(area-length scaling for a shape that shrinks similarly in all directions), and the end-systolic
scale is calibrated on the rendered cavity mask so that ``(EDV - ESV) / EDV`` equals the requested EF.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from echopulse.config import ECG_LEADS
from echopulse.synth.ecg_sim import SimulatedECG, simulate_ecg
from echopulse.synth.screen_trace import GE_GREEN, PHILIPS_YELLOW, ScreenTrace, TraceStyle, draw_screen_trace

log = logging.getLogger(__name__)

VIEWS = ("A4C", "A2C")
HEADER_ROWS = 14  # burned-in text band above the imaging region
HEADER_TEXT = "PHANTOM^ALEX 1970-01-01"  # fake patient text: ingestion must never let it through
SECTOR_HALF_ANGLE_DEG = 40.0  # 80 degree sector
DEPTH_CM = 16.0  # physical depth of the sector radius
PHANTOM_ECG_FS = 500  # Hz: the rate the phantom writes its ECG files at (ingest resamples to config.ECG_FS)

# reflectivities (linear amplitude, before log compression)
_BLOOD, _BACKGROUND, _MYOCARDIUM, _PERICARDIUM, _VALVE = 0.012, 0.085, 0.55, 1.0, 0.85


@dataclass(frozen=True)
class Appearance:
    """How a study looks (not how its heart moves): the variety real echo has between machines,
    probes, presets and patients. The defaults are the plain phantom.

    Attributes:
        sector_half_angle_deg: half the fan's opening angle.
        fan_overflow: how far the fan may run past the image's sides (1: it fits; 1.15: its
            corners are cut off by the image edge, as on scanners that fill the width).
        depth_zoom: size of the heart in the fan (below 1: a deeper depth setting, a smaller heart
            with more tissue below it).
        attenuation: depth gain loss, ``exp(-attenuation * depth / radius)``.
        gain_db: display gain added before log compression (brighter or darker picture).
        dynamic_range_db: the log-compression window (wider: more grey, less contrast).
        gamma: the grey map's exponent (higher: dark mid-tones, only specular tissue bright).
        edge_fade: (amount, power) of the lateral fall-off, ``1 - amount * |angle / half| ** power``.
        blur_px: Gaussian blur of the echo envelope (soft, low-resolution tissue).
        speckle_psf: (axial, lateral) px width of the speckle grain.
        chamber_scale: (lateral, long) scale of every chamber ellipse (rounder or longer hearts).
        wall_scale: scale of every wall's thickness.
        tissue: reflectivity of the tissue round the heart (lung and chest: dark on most scans).
        myocardium: reflectivity of the heart's walls.
        near_field: reverberation haze under the probe, amplitude at the skin (falls off over a
            fifth of the depth).
        texture: strength of the slow tissue inhomogeneity on top of speckle (patchy, specular
            tissue at the high end).
        noise_floor: grey levels of display noise, redrawn every frame (the flicker that keeps a
            dark fan's far corners visibly alive on a real scanner).
        specular: how much a wall's brightness depends on the angle the beam meets it at (0: the
            same all round; 1: bright where the beam hits it head-on, as the septum and the AV
            plane are in an apical view, faint where the beam runs along it, as the lateral walls
            drop out on real scans).
        septum: reflectivity of the interventricular septum (where the LV and RV walls meet),
            drawn over the walls and spared by ``specular``: the thin bright line down the middle
            of a real apical four-chamber view (0: a wall like the others).
        annulus: reflectivity of the fibrous AV rings at each valve's hinges (the bright knots
            of the AV plane; 0: none).
        av_floor: reflectivity of a band across the heart just behind the AV plane (atrial floor,
            AV groove and the pericardium behind them: the brightest structure at the bottom of
            many apical views; 0: none).
        valve_width: half-width of a valve leaflet in reference units (thicker leaflets survive
            a small clip as the bright lines real valves are).
    """

    sector_half_angle_deg: float = SECTOR_HALF_ANGLE_DEG
    fan_overflow: float = 1.0
    depth_zoom: float = 1.0
    attenuation: float = 1.1
    gain_db: float = 0.0
    dynamic_range_db: float = 45.0
    gamma: float = 1.6
    edge_fade: tuple[float, float] = (0.35, 4.0)
    blur_px: float = 0.0
    speckle_psf: tuple[float, float] = (0.9, 1.2)
    chamber_scale: tuple[float, float] = (1.0, 1.0)
    wall_scale: float = 1.0
    tissue: float = _BACKGROUND
    myocardium: float = _MYOCARDIUM
    near_field: float = 0.0
    texture: float = 0.35
    noise_floor: float = 0.0
    specular: float = 0.0
    septum: float = 0.0
    annulus: float = 0.0
    av_floor: float = 0.0
    valve_width: float = 0.012

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Appearance":
        """A random appearance, from the plain phantom's crisp bright look to soft, dark scans like
        a SonoSite's: see the ranges below (each drawn uniformly and independently). The ranges
        cover the real SonoSite cine's in-sector statistics (``bench/tokenizer_real.py``): dark
        tissue round a heart that may fill the fan's depth (ventricles only, the atria cut off), a
        wide fan, crisp speckle, thin bright septum, AV rings and valves, and a bright band
        behind the AV plane."""
        def u(lo: float, hi: float) -> float:
            return float(rng.uniform(lo, hi))

        grain, elong = u(0.7, 1.8), u(1.0, 2.2)
        return cls(sector_half_angle_deg=u(32, 52), fan_overflow=u(1.0, 1.3), depth_zoom=u(0.75, 1.4),
                   attenuation=u(0.3, 1.6), gain_db=u(-14, 2), dynamic_range_db=u(40, 60),
                   gamma=u(1.6, 3.2), edge_fade=(u(0.3, 0.95), u(1.5, 4.0)), blur_px=u(0, 1.5),
                   speckle_psf=(0.9 * grain, 0.9 * grain * elong),
                   chamber_scale=(u(0.75, 1.15), u(0.9, 1.3)), wall_scale=u(0.8, 1.8),
                   tissue=float(np.exp(rng.uniform(np.log(0.004), np.log(0.04)))),
                   myocardium=u(0.2, 0.6), near_field=u(0.0, 0.35), texture=u(0.3, 0.9),
                   noise_floor=u(1.0, 4.0), specular=u(0.3, 0.9),
                   septum=u(0.2, 1.2), annulus=u(0.2, 1.2), valve_width=u(0.012, 0.03),
                   av_floor=u(0.0, 0.6))


@dataclass(frozen=True)
class _Chamber:
    """A cavity ellipse in reference sector units."""

    name: str
    center: tuple[float, float]  # (u, d)
    axes: tuple[float, float]  # (lateral half-width, long half-length)
    tilt_deg: float  # long axis rotation from the depth direction (positive: base to the right)
    wall: float  # myocardial wall thickness
    kind: str  # "ventricle" or "atrium": sets the phase of its volume change


_LAYOUTS = {
    "A4C": (
        _Chamber("LV", (0.135, 0.43), (0.105, 0.25), 16.0, 0.055, "ventricle"),
        _Chamber("RV", (-0.13, 0.45), (0.085, 0.215), -20.0, 0.03, "ventricle"),
        _Chamber("LA", (0.20, 0.80), (0.095, 0.095), 10.0, 0.025, "atrium"),
        _Chamber("RA", (-0.185, 0.79), (0.09, 0.09), -10.0, 0.025, "atrium"),
    ),
    "A2C": (
        _Chamber("LV", (0.0, 0.43), (0.13, 0.265), 4.0, 0.06, "ventricle"),
        _Chamber("LA", (0.035, 0.815), (0.12, 0.10), 4.0, 0.025, "atrium"),
    ),
}
# valves: (chamber whose base they close, leaflet length as a fraction of the lateral half-width)
_VALVES = {"A4C": ("LV", "RV"), "A2C": ("LV",)}


@dataclass
class Study:
    """One synthetic study.

    Attributes:
        frames: uint8 (T, rows, cols) B-mode frames, header band included.
        fps: frame rate.
        ecg: the paired ECG; its sample 0 is the time of frame 0.
        view: "A4C" or "A2C".
        ef: requested (and rendered) ejection fraction.
        heart_rate_bpm: mean heart rate of the ECG.
        ed_frames: frame index nearest each R-peak inside the clip.
        es_frames: frame index nearest each T-wave end inside the clip.
        region: (x0, y0, x1, y1) inclusive pixel box of the imaging area (DICOM region convention).
        volume: float (T,) LV volume per frame, ``cavity_area_px ** 1.5``.
        lv_area: float (T,) LV cavity area in pixels per frame.
        lv_center: (x, y) pixel at the centre of the end-diastolic LV cavity.
    """

    frames: np.ndarray
    fps: float
    ecg: SimulatedECG
    view: str
    ef: float
    heart_rate_bpm: float
    ed_frames: list[int]
    es_frames: list[int]
    region: tuple[int, int, int, int]
    volume: np.ndarray
    lv_area: np.ndarray
    lv_center: tuple[int, int]


def volume_waveform(t: np.ndarray, beat_r_s: np.ndarray, beat_t_end_s: np.ndarray) -> np.ndarray:
    """Normalised LV volume in [0, 1]: 1 at each R-peak (ED), 0 at each T-wave end (ES).

    Systole is a half-cosine from R to T-end; diastole has rapid filling, diastasis and an atrial
    kick that brings the volume back to 1 exactly at the next R (zero slope there, so ED is the max).

    Args:
        t: times in seconds.
        beat_r_s: R-peak times of every beat (must bracket ``t``).
        beat_t_end_s: T-wave end time of each beat.
    """
    out = np.ones_like(t, dtype=float)
    for i in range(len(beat_r_s) - 1):
        r, te, r_next = beat_r_s[i], beat_t_end_s[i], beat_r_s[i + 1]
        sys = (t >= r) & (t < te)
        tau = (t[sys] - r) / (te - r)
        out[sys] = 1 - (1 - np.cos(np.pi * tau)) / 2
        dia = (t >= te) & (t < r_next)
        u = (t[dia] - te) / (r_next - te)
        early = (1 - np.cos(np.pi * np.clip(u / 0.4, 0, 1))) / 2
        diastasis = np.clip((u - 0.4) / 0.35, 0, 1)
        kick = (1 - np.cos(np.pi * np.clip((u - 0.75) / 0.25, 0, 1))) / 2
        out[dia] = 0.78 * early + 0.06 * diastasis + 0.16 * kick
    return out


class _Renderer:
    """Maps pixels to the reference frame and renders B-mode for one view and image geometry."""

    def __init__(self, view: str, rows: int, cols: int, seed: int, appearance: Appearance | None = None):
        self.view = view
        self.look = look = appearance or Appearance()
        sx, sy = look.chamber_scale
        # the lateral scale moves the chambers' centres too, so the LV and RV walls still meet in one septum
        self.chambers = tuple(replace(c, center=(c.center[0] * sx, c.center[1]),
                                      axes=(c.axes[0] * sx, c.axes[1] * sy), wall=c.wall * look.wall_scale)
                              for c in _LAYOUTS[view])
        rng = np.random.default_rng(seed)
        self.rows, self.cols = rows, cols
        self.region = (0, HEADER_ROWS, cols - 1, rows - 1)
        img_h = rows - HEADER_ROWS
        half = np.deg2rad(look.sector_half_angle_deg)
        self.radius = min(img_h - 1.5, look.fan_overflow * (cols / 2 - 1.5) / np.sin(half))  # px
        self.apex = (cols / 2 - 0.5, HEADER_ROWS + 0.5)  # (x, y) px
        self.px = self.radius * look.depth_zoom  # pixels per reference unit (the heart's scale)
        yy, xx = np.mgrid[0:rows, 0:cols].astype(float)
        self.u = (xx - self.apex[0]) / self.px  # (rows, cols), reference units
        self.d = (yy - self.apex[1]) / self.px
        rad = np.hypot(xx - self.apex[0], yy - self.apex[1]) / self.radius  # depth in sector radii
        ang = np.arctan2(self.u, self.d)
        # soft 1.5 px sector edge, exactly 0 outside
        edge = np.minimum((half - np.abs(ang)) * rad * self.radius, (1 - rad) * self.radius)
        self.sector = np.clip(edge / 1.5, 0, 1) * (self.d > 0) * (yy >= HEADER_ROWS)
        self.depth = rad
        # per-chamber jitter of the layout so studies differ slightly
        self.jitter = {c.name: rng.normal(0, 0.01, size=2) for c in self.chambers}
        # fixed speckle field in reference pixels (+ margin): complex Gaussian, low-pass filtered;
        # wider laterally than axially like a real point-spread function. Grains ~2-4 px.
        self.margin = 24
        shape = (rows + 2 * self.margin, cols + 2 * self.margin)
        field = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        psf = look.speckle_psf  # (axial, lateral) px
        field = ndimage.gaussian_filter(field.real, psf) + 1j * ndimage.gaussian_filter(field.imag, psf)
        self.speckle = field / np.sqrt(np.mean(np.abs(field) ** 2))
        # slow tissue-texture variation (fibre direction, inhomogeneity) on top of speckle
        self.texture = np.exp(look.texture * ndimage.gaussian_filter(rng.standard_normal(shape), 4.0) * 4.0)
        self.noise_rng = np.random.default_rng(seed + 1)

    def _geometry(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ch = next(c for c in self.chambers if c.name == name)
        center = np.asarray(ch.center) + self.jitter[name]
        t = np.deg2rad(ch.tilt_deg)
        long_axis = np.array([np.sin(t), np.cos(t)])  # (u, d): points from apex side toward base
        lat_axis = np.array([np.cos(t), -np.sin(t)])
        return center, long_axis, lat_axis

    def _local(self, name: str, u: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised ellipse coordinates (lateral, long) of points in chamber ``name``."""
        ch = next(c for c in self.chambers if c.name == name)
        center, long_axis, lat_axis = self._geometry(name)
        du, dd = u - center[0], d - center[1]
        p = (du * lat_axis[0] + dd * lat_axis[1]) / ch.axes[0]
        q = (du * long_axis[0] + dd * long_axis[1]) / ch.axes[1]
        return p, q

    def backward_map(self, scales: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Reference-frame (u, d) of every pixel when chamber ``c`` has linear scale ``scales[c]``.

        Inside a cavity points scale by 1/s; outside, the radius in ellipse units follows
        rho_ref^2 = rho^2 + 1 - s^2 (myocardium keeps its area, so walls thicken in systole) and the
        displacement fades with distance. Ventricles contract toward their apex (apex nearly fixed).
        """
        du = np.zeros_like(self.u)
        dd = np.zeros_like(self.d)
        for ch in self.chambers:
            s = scales[ch.name]
            if s == 1.0:
                continue
            center, long_axis, lat_axis = self._geometry(ch.name)
            # the cavity shrinks toward a point 70 % of the way to its apex
            anchor_shift = -0.7 * (1 - s) * ch.axes[1] if ch.kind == "ventricle" else 0.0
            c_now = center + anchor_shift * long_axis
            pu, pd = self.u - c_now[0], self.d - c_now[1]
            p = (pu * lat_axis[0] + pd * lat_axis[1]) / ch.axes[0]
            q = (pu * long_axis[0] + pd * long_axis[1]) / ch.axes[1]
            rho = np.hypot(p, q) + 1e-9
            rho_ref = np.where(rho < s, rho / s, np.sqrt(np.maximum(rho**2 + 1 - s**2, 0)))
            ratio = rho_ref / rho
            fade = np.exp(-np.maximum(rho - 1.0, 0) ** 2 / 0.8)  # keeps far tissue in place
            p_ref, q_ref = p * ratio, q * ratio
            ref_u = center[0] + p_ref * ch.axes[0] * lat_axis[0] + q_ref * ch.axes[1] * long_axis[0]
            ref_d = center[1] + p_ref * ch.axes[0] * lat_axis[1] + q_ref * ch.axes[1] * long_axis[1]
            du += (ref_u - self.u) * fade
            dd += (ref_d - self.d) * fade
        return self.u + du, self.d + dd

    def cavity_mask(self, name: str, ref_u: np.ndarray, ref_d: np.ndarray) -> np.ndarray:
        p, q = self._local(name, ref_u, ref_d)
        return (p**2 + q**2) < 1.0

    def reflectivity(self, ref_u: np.ndarray, ref_d: np.ndarray, valves_open: float) -> np.ndarray:
        """Tissue amplitude reflectivity at reference points; ``valves_open`` in [0, 1]."""
        refl = np.full_like(ref_u, self.look.tissue)
        heart = np.zeros_like(ref_u, dtype=bool)
        cavity = np.zeros_like(ref_u, dtype=bool)
        outer_rho = np.full_like(ref_u, np.inf)
        walls = {}
        for ch in self.chambers:
            p, q = self._local(ch.name, ref_u, ref_d)
            rho = np.hypot(p, q)
            cavity |= rho < 1
            # wall: the ellipse grown by the wall thickness
            wp = p * ch.axes[0] / (ch.axes[0] + ch.wall)
            wq = q * ch.axes[1] / (ch.axes[1] + ch.wall)
            w_rho = np.hypot(wp, wq)
            heart |= w_rho < 1
            walls[ch.name] = w_rho < 1
            outer_rho = np.minimum(outer_rho, w_rho)
        # pericardium: a bright thin rim just outside the walls
        rim = np.exp(-((outer_rho - 1.015) / 0.03) ** 2)
        wall = np.full_like(ref_u, self.look.myocardium)
        if self.look.specular > 0:
            incidence = self._incidence(outer_rho)
            rim = rim * incidence
            wall = wall * incidence
        refl = np.maximum(refl, _PERICARDIUM * 0.7 * rim)
        refl = np.where(heart, wall, refl)
        if self.look.septum > 0 and "RV" in walls:  # both ventricles' walls: the septum
            refl = np.where(walls["LV"] & walls["RV"], np.maximum(refl, self.look.septum), refl)
        # fill the crux between chambers (septa / AV junction) with myocardium
        crux = self._crux(ref_u, ref_d)
        refl = np.where(crux & ~cavity, np.maximum(refl, self.look.myocardium), refl)
        cavity |= self._inflow(ref_u, ref_d)
        refl = np.where(cavity, _BLOOD, refl)
        refl = np.maximum(refl, _VALVE * self._valves(ref_u, ref_d, valves_open))
        if self.look.annulus > 0:
            refl = np.maximum(refl, self.look.annulus * self._hinges(ref_u, ref_d))
        if self.look.av_floor > 0:
            refl = np.maximum(refl, self.look.av_floor * self._av_floor(ref_u, ref_d))
        # near-field clutter just below the transducer (chest wall)
        refl = refl + 0.5 * np.exp(-np.hypot(ref_u, ref_d) / 0.05)
        return refl

    def _incidence(self, field: np.ndarray) -> np.ndarray:
        """Specular gain of the surfaces that are level sets of ``field`` (on the pixel grid): 2 cos^2
        of the angle between the beam (a ray from the apex) and the surface normal, blended with 1
        by ``specular``; a wall's mean gain stays about 1."""
        gy, gx = np.gradient(np.where(np.isfinite(field), field, 0.0))
        norm = np.hypot(gx, gy) + 1e-9
        ray = np.hypot(self.u, self.d) + 1e-9  # beam direction in pixel axes: (u, d) / |(u, d)|
        cos = (gx * self.u + gy * self.d) / (norm * ray)
        return (1 - self.look.specular) + self.look.specular * 2 * cos**2

    def _crux(self, ref_u: np.ndarray, ref_d: np.ndarray) -> np.ndarray:
        names = [c.name for c in self.chambers]
        if "RV" not in names:
            return np.zeros_like(ref_u, dtype=bool)
        # the AV junction and interatrial septum below the ventricular septum
        return (np.abs(ref_u - 0.01 + 0.1 * (ref_d - 0.6)) < 0.025) & (ref_d > 0.66) & (ref_d < 0.9)

    def _inflow(self, ref_u: np.ndarray, ref_d: np.ndarray) -> np.ndarray:
        """Blood channel through each AV annulus joining ventricle and atrium (the valve sits in it)."""
        out = np.zeros_like(ref_u, dtype=bool)
        for name in _VALVES[self.view]:
            ch = next(c for c in self.chambers if c.name == name)
            center, long_axis, lat_axis = self._geometry(name)
            base = center + ch.axes[1] * long_axis
            du, dd = ref_u - base[0], ref_d - base[1]
            p = (du * lat_axis[0] + dd * lat_axis[1]) / (0.8 * ch.axes[0])
            q = (du * long_axis[0] + dd * long_axis[1]) / 0.075
            out |= (p**2 + q**2) < 1
        return out

    def _valves(self, ref_u: np.ndarray, ref_d: np.ndarray, valves_open: float) -> np.ndarray:
        out = np.zeros_like(ref_u)
        for name in _VALVES[self.view]:
            ch = next(c for c in self.chambers if c.name == name)
            center, long_axis, lat_axis = self._geometry(name)
            base = center + ch.axes[1] * long_axis * 1.0  # annulus centre at the base of the cavity
            for side in (-1.0, 1.0):
                hinge = base + side * ch.axes[0] * 0.8 * lat_axis
                # closed: leaflet lies across toward the centre; open: swings into the ventricle
                angle = valves_open * np.deg2rad(75.0)
                direction = -side * lat_axis * np.cos(angle) - long_axis * np.sin(angle)
                length = ch.axes[0] * 0.8
                du, dd = ref_u - hinge[0], ref_d - hinge[1]
                along = np.clip(du * direction[0] + dd * direction[1], 0, length)
                dist = np.hypot(du - along * direction[0], dd - along * direction[1])
                out = np.maximum(out, np.exp(-((dist / self.look.valve_width) ** 2)))
        return out

    def _annulus(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """An AV valve's two hinge points (reference units) and its chamber's long axis."""
        ch = next(c for c in self.chambers if c.name == name)
        center, long_axis, lat_axis = self._geometry(name)
        return [center + ch.axes[1] * long_axis + side * ch.axes[0] * 0.8 * lat_axis for side in (-1.0, 1.0)], long_axis

    def _hinges(self, ref_u: np.ndarray, ref_d: np.ndarray) -> np.ndarray:
        """Bright knots (0-1) at every AV valve's two hinges: the fibrous rings of the AV plane."""
        out = np.zeros_like(ref_u)
        for name in _VALVES[self.view]:
            for hinge in self._annulus(name)[0]:
                out = np.maximum(out, np.exp(-(np.hypot(ref_u - hinge[0], ref_d - hinge[1]) / 0.035) ** 2))
        return out

    def _av_floor(self, ref_u: np.ndarray, ref_d: np.ndarray) -> np.ndarray:
        """A band (0-1) from the outermost AV hinge on one side to the other, a quarter longer at
        each end and 0.09 deeper than the annulus (behind the valves, not across their opening)."""
        hinges, axes = [], []
        for name in _VALVES[self.view]:
            points, long_axis = self._annulus(name)
            hinges += points
            axes.append(long_axis)
        left, right = min(hinges, key=lambda h: h[0]), max(hinges, key=lambda h: h[0])
        shift = 0.09 * np.mean(axes, axis=0)
        a, b = left + shift - 0.25 * (right - left), right + shift + 0.25 * (right - left)
        seg = b - a
        t = np.clip(((ref_u - a[0]) * seg[0] + (ref_d - a[1]) * seg[1]) / float(seg @ seg), 0, 1)
        dist = np.hypot(ref_u - a[0] - t * seg[0], ref_d - a[1] - t * seg[1])
        return np.exp(-(dist / 0.035) ** 2)

    def speckle_at(self, ref_u: np.ndarray, ref_d: np.ndarray) -> np.ndarray:
        """Speckle amplitude (Rayleigh-like) sampled at reference points (bilinear on a fixed field)."""
        x = ref_u * self.px + self.apex[0] + self.margin
        y = ref_d * self.px + self.apex[1] + self.margin
        coords = np.stack([y, x])
        re = ndimage.map_coordinates(self.speckle.real, coords, order=1, mode="reflect")
        im = ndimage.map_coordinates(self.speckle.imag, coords, order=1, mode="reflect")
        tex = ndimage.map_coordinates(self.texture, coords, order=1, mode="reflect")
        return np.hypot(re, im) * tex

    def render(self, scales: dict[str, float], valves_open: float) -> tuple[np.ndarray, float]:
        """One uint8 frame (rows, cols) without header, and the LV cavity area in pixels."""
        ref_u, ref_d = self.backward_map(scales)
        envelope = self.reflectivity(ref_u, ref_d, valves_open) * self.speckle_at(ref_u, ref_d)
        # depth-dependent gain (attenuation not fully compensated) and weak electronic noise
        look = self.look
        beam_angle = np.arctan2(self.u, self.d) / np.deg2rad(look.sector_half_angle_deg)  # -1..1 across the sector
        fade, power = look.edge_fade
        envelope *= np.exp(-look.attenuation * self.depth) * (1 - fade * np.abs(beam_angle) ** power)
        if look.near_field > 0:  # reverberation haze under the probe (static: it does not move with tissue)
            envelope += look.near_field * np.exp(-self.depth / 0.2) * self.speckle_at(self.u, self.d)
        if look.blur_px > 0:  # soft tissue: a wider point-spread function
            envelope = ndimage.gaussian_filter(envelope, look.blur_px)
        envelope += 0.004 * np.abs(self.noise_rng.standard_normal(envelope.shape))
        # log compression over the display range, then the grey map
        db = 20 * np.log10(np.maximum(envelope, 1e-6)) + look.gain_db
        img = np.clip((db + look.dynamic_range_db) / look.dynamic_range_db, 0, 1) ** look.gamma * 255
        if look.noise_floor > 0:
            img = np.minimum(img + look.noise_floor * np.abs(self.noise_rng.standard_normal(img.shape)), 255)
        img = img * self.sector
        area = float(self.cavity_mask("LV", ref_u, ref_d)[self.sector > 0].sum())
        return np.round(img).astype(np.uint8), area

    def pixel_of(self, ud: np.ndarray) -> tuple[int, int]:
        """(x, y) pixel of a reference point (u, d)."""
        x, y = ud[0] * self.px + self.apex[0], ud[1] * self.px + self.apex[1]
        return (int(round(x)), int(round(y)))

    def lv_area(self, scales: dict[str, float]) -> float:
        ref_u, ref_d = self.backward_map(scales)
        return float(self.cavity_mask("LV", ref_u, ref_d)[self.sector > 0].sum())


def _chamber_scales(renderer: _Renderer, v_norm: float, s_es: float) -> dict[str, float]:
    """Linear scales of every chamber for a normalised LV volume (1 = ED, 0 = ES)."""
    scales = {}
    for ch in renderer.chambers:
        if ch.name == "LV":
            scales[ch.name] = 1 - (1 - s_es) * (1 - v_norm)
        elif ch.kind == "ventricle":
            scales[ch.name] = 1 - 0.18 * (1 - v_norm)
        else:  # atria fill while the ventricles empty
            scales[ch.name] = 1 + 0.12 * (1 - v_norm) - 0.06
    return scales


def _calibrate_es_scale(renderer: _Renderer, ef: float) -> float:
    """LV linear scale at ES such that (EDV - ESV) / EDV == ef with V = area ** 1.5 (secant steps)."""
    area_ed = renderer.lv_area(_chamber_scales(renderer, 1.0, 1.0))
    target = area_ed * (1 - ef) ** (2 / 3)

    def err(s: float) -> float:
        return renderer.lv_area(_chamber_scales(renderer, 0.0, s)) - target

    s0, s1 = (1 - ef) ** (1 / 3), (1 - ef) ** (1 / 3) * 0.95
    e0, e1 = err(s0), err(s1)
    for _ in range(6):
        if e1 == e0 or abs(e1) < 0.5:
            break
        s0, s1, e0 = s1, float(np.clip(s1 - e1 * (s1 - s0) / (e1 - e0), 0.2, 1.0)), e1
        e1 = err(s1)
    return s1


def _burn_header(frames: np.ndarray, text: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("L", (frames.shape[2], HEADER_ROWS), 0)
    ImageDraw.Draw(band).text((2, 1), text, fill=215, font=ImageFont.load_default())
    frames[:, :HEADER_ROWS, :] = np.asarray(band)[None]


def make_study(
    seed: int,
    view: str = "A4C",
    heart_rate_bpm: float = 70,
    ef: float = 0.6,
    duration_s: float = 4.0,
    fps: float = 30.0,
    rows: int = 128,
    cols: int = 160,
    appearance: Appearance | None = None,
) -> Study:
    """Render one phantom study: an apical cine paired with its 12-lead ECG.

    Args:
        seed: RNG seed (speckle, layout jitter, ECG); same arguments give identical output.
        view: "A4C" (four chambers) or "A2C" (LV and LA).
        heart_rate_bpm: mean heart rate of the ECG driving the motion.
        ef: ejection fraction of the area-derived LV volume (V = area ** 1.5), in (0.1, 0.85).
        duration_s: length in seconds of both the cine and the ECG.
        fps: frame rate.
        rows: image height in pixels, header band included.
        cols: image width in pixels.
        appearance: how the study looks (:class:`Appearance`; default the plain phantom).
    """
    if view not in _LAYOUTS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if not 0.1 < ef < 0.85:
        raise ValueError(f"ef must be in (0.1, 0.85), got {ef}")
    if rows < HEADER_ROWS + 40 or cols < 48:
        raise ValueError(f"image too small ({rows}x{cols}); need at least {HEADER_ROWS + 40}x48")
    ecg = simulate_ecg(duration_s, heart_rate_bpm, fs=PHANTOM_ECG_FS, seed=seed)
    renderer = _Renderer(view, rows, cols, seed, appearance)
    s_es = _calibrate_es_scale(renderer, ef)
    n_frames = int(round(duration_s * fps))
    t = np.arange(n_frames) / fps
    v_norm = volume_waveform(t, ecg.beat_r_s, ecg.beat_t_end_s)
    # AV valves open during filling (after T-end, before R), closed during systole
    frames = np.zeros((n_frames, rows, cols), dtype=np.uint8)
    areas = np.zeros(n_frames)
    for i, ti in enumerate(t):
        k = np.searchsorted(ecg.beat_r_s, ti, side="right") - 1
        te, r_next = ecg.beat_t_end_s[k], ecg.beat_r_s[k + 1]
        valves_open = float(np.clip(min((ti - te) / 0.06, (r_next - 0.03 - ti) / 0.05), 0, 1))
        frames[i], areas[i] = renderer.render(_chamber_scales(renderer, v_norm[i], s_es), valves_open)
    _burn_header(frames, HEADER_TEXT)

    def nearest(times: np.ndarray) -> list[int]:
        idx = [int(round(x * fps)) for x in times]
        return [i for i in idx if 0 <= i < n_frames]

    return Study(
        frames=frames,
        fps=float(fps),
        ecg=ecg,
        view=view,
        ef=float(ef),
        heart_rate_bpm=float(heart_rate_bpm),
        ed_frames=nearest(ecg.r_peaks_s),
        es_frames=nearest(ecg.t_end_s),
        region=renderer.region,
        volume=areas**1.5,
        lv_area=areas,
        lv_center=renderer.pixel_of(renderer._geometry("LV")[0]),
    )


def write_study_dicom(study: Study, path: str | Path, seed: int, screen: ScreenTrace | None = None) -> Path:
    """Write a study as an Ultrasound Multi-frame Image Storage file (explicit VR little endian).

    Patient fields hold fake values; UIDs are derived deterministically from ``seed``.

    Args:
        study: the study to write.
        path: output ``.dcm`` path (parent folders are created).
        seed: the study seed, the entropy source of its UIDs.
        screen: the study's frames with the ECG strip drawn under them (written as RGB; the
            ultrasound region stays the image above the strip), or None for a grey cine.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    from echopulse.io.dicom_cine import PHANTOM_METHOD, write_cine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    uid = {
        k: generate_uid(entropy_srcs=["echopulse-phantom", str(seed), k]) for k in ("study", "series", "sop")
    }
    x0, y0, x1, y1 = study.region
    delta_cm = DEPTH_CM / (y1 - y0)
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = x0, y0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x1, y1
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = delta_cm
    region.PhysicalDeltaY = delta_cm
    region.ReferencePixelX0 = (x1 - x0) // 2
    region.ReferencePixelY0 = 0
    pixels = study.frames if screen is None else screen.frames  # RGB with the ECG strip
    write_cine(path, pixels, study.fps, uids=uid, date="20000101", time="120000", attributes={
        "Manufacturer": "EchoPulse phantom",
        "PatientName": HEADER_TEXT.split(" ")[0],
        "PatientID": f"PHANTOM{seed:06d}",
        "PatientBirthDate": "19700101",
        "PatientSex": "O",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "StudyID": "1",
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "SeriesDescription": f"phantom {study.view}",
        "BurnedInAnnotation": "YES",
        "HeartRate": int(round(study.heart_rate_bpm)),
        "SequenceOfUltrasoundRegions": Sequence([region]),
    }, deidentification=(PHANTOM_METHOD, ()))  # nobody's identity; its fictional one is a test
    return path


def write_study_wfdb(study: Study, record_dir: str | Path, record_name: str) -> Path:
    """Write the study's ECG as a 12-lead WFDB record (16-bit, mV); returns the ``.hea`` path.

    Args:
        study: the study whose ``ecg`` to write.
        record_dir: folder for ``<record_name>.hea`` / ``.dat`` (created).
        record_name: record name (letters, digits, ``_``).
    """
    import wfdb

    record_dir = Path(record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        record_name,
        fs=study.ecg.fs,
        units=["mV"] * len(ECG_LEADS),
        sig_name=list(ECG_LEADS),
        p_signal=study.ecg.signal.T.astype(np.float64),  # (N, 12)
        fmt=["16"] * len(ECG_LEADS),
        adc_gain=[1000.0] * len(ECG_LEADS),  # 1 uV per count: fixed gain keeps files reproducible
        baseline=[0] * len(ECG_LEADS),
        write_dir=str(record_dir),
    )
    return record_dir / f"{record_name}.hea"


HR_RANGE_BPM = (40.0, 150.0)  # what the corpus covers: bradycardia to exercise tachycardia


def corpus_heart_rate(i: int, seed: int) -> float:
    """Heart rate of corpus study ``i``: a golden-ratio (low-discrepancy) sequence over
    :data:`HR_RANGE_BPM` from a seed-dependent offset, so any first ``n`` studies cover the range
    evenly (a uniform draw leaves gaps a few-study corpus never fills) and study ``i`` does not
    depend on how many studies there are."""
    lo, hi = HR_RANGE_BPM
    offset = np.random.default_rng([seed, 2**21]).uniform()
    u = (offset + i * 0.6180339887498949) % 1.0
    return float(np.round(lo + (hi - lo) * u, 1))


def write_corpus(out_dir: str | Path, studies: int, seed: int, duration_s: float = 4.0,
                 variety: bool = False, screen_trace: bool = True, screen_only_every: int = 0) -> Path:
    """Write a paired corpus: DICOM echoes, WFDB ECGs, ``manifest.csv`` and ``truth.json``.

    Views and EFs (0.35-0.70) vary per study from ``seed``; heart rates cover 40-150 bpm evenly
    (:func:`corpus_heart_rate`). The manifest
    has columns ``echo,ecg,view,ef,heart_rate_bpm,split`` with paths relative to ``out_dir``
    (``echo/study_0000.dcm``, ``ecg/study_0000.hea``); about a fifth of the studies (at least one
    when there are three or more) are ``val``.

    With ``screen_trace`` every echo also shows its lead II in a strip under the image, as a scanner
    draws it (sweep mode, GE green or Philips yellow, the cursor starting anywhere); ``truth.json``
    then lists every R-peak drawn, on the echo's clock (``screen_r_peaks_s``, history before frame 0
    included). Every ``screen_only_every``-th train study (0: none) gets no WFDB file and ``ecg`` =
    ``screen``: the trace is its only ECG (val studies keep theirs, so generation from a held-out
    ECG file always has one).

    Args:
        out_dir: output folder (created).
        studies: number of studies.
        seed: corpus seed; the same seed writes identical files.
        duration_s: seconds per study.
        variety: give each study its own :meth:`Appearance.draw` (sector, depth gain, display
            gain, blur, speckle, chamber shapes) so a tokenizer sees more than one look.
        screen_trace: draw the ECG strip under each echo.
        screen_only_every: make every n-th train study's on-screen trace its only ECG (needs
            ``screen_trace``).

    Returns:
        The path of ``manifest.csv``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    val_ids = _val_ids(studies, seed)
    rows, truth = [], []
    n_train = 0
    for i in tqdm(range(studies), desc="synth", unit="study", disable=None):
        rng = np.random.default_rng([seed, i])  # study i does not depend on how many studies there are
        name = f"study_{i:04d}"
        view = str(VIEWS[int(rng.integers(len(VIEWS)))])
        hr = corpus_heart_rate(i, seed)
        ef = float(np.round(rng.uniform(0.35, 0.70), 3))
        study_seed = int(rng.integers(2**31 - 1))
        look = Appearance.draw(np.random.default_rng([seed, i, 3])) if variety else None
        study = make_study(study_seed, view=view, heart_rate_bpm=hr, ef=ef, duration_s=duration_s,
                           appearance=look)
        echo_rel, ecg_rel = f"echo/{name}.dcm", f"ecg/{name}.hea"
        screen = _screen_trace(study, i, rng, study_seed, duration_s) if screen_trace else None
        write_study_dicom(study, out_dir / echo_rel, seed=study_seed, screen=screen)
        split = "val" if i in val_ids else "train"
        n_train += split == "train"
        if screen is not None and screen_only_every and split == "train" and n_train % screen_only_every == 0:
            ecg_rel = "screen"
        else:
            write_study_wfdb(study, out_dir / "ecg", name)
        rows.append(
            {"echo": echo_rel, "ecg": ecg_rel, "view": view, "ef": ef, "heart_rate_bpm": hr, "split": split}
        )
        truth.append(_truth_entry(echo_rel, ef, hr, study, screen))
        log.info("phantom study %d/%d: %s hr=%.0f ef=%.2f", i + 1, studies, view, hr, ef)
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["echo", "ecg", "view", "ef", "heart_rate_bpm", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "truth.json").write_text(json.dumps({"studies": truth}, indent=1))
    return manifest


def _val_ids(studies: int, seed: int) -> set[int]:
    """The corpus's val studies: about a fifth, at least one when there are three or more."""
    n_val = max(1, round(0.2 * studies)) if studies >= 3 else 0
    split_rng = np.random.default_rng([seed, 2**20])
    return set(split_rng.choice(studies, size=n_val, replace=False).tolist()) if n_val else set()


def _screen_trace(study: Study, i: int, rng: np.random.Generator, study_seed: int, duration_s: float) -> ScreenTrace:
    """Study ``i``'s on-screen ECG strip: GE green or Philips yellow by turns, the cursor starting
    at a phase drawn from ``rng`` (one draw)."""
    style = TraceStyle(color=(GE_GREEN, PHILIPS_YELLOW)[i % 2], start_phase=float(rng.uniform()),
                       sweep_s=min(1.6, 0.6 * duration_s))
    return draw_screen_trace(study.frames, study.fps, study.ecg, seed=study_seed + 1, style=style)


def _truth_entry(echo_rel: str, ef: float, hr: float, study: Study, screen: ScreenTrace | None) -> dict:
    """One study's ``truth.json`` entry (R-peaks on the echo's clock; the drawn ones when shown)."""
    return {
        "echo": echo_rel,
        "ef": ef,
        "heart_rate_bpm": hr,
        "ed_frames": study.ed_frames,
        "es_frames": study.es_frames,
        "r_peaks_s": [round(float(x), 6) for x in study.ecg.r_peaks_s],
        "fps": study.fps,
        **({"screen_r_peaks_s": [round(float(x), 6) for x in screen.r_peaks_s],
            "screen_mode": screen.style.mode} if screen is not None else {}),
    }
