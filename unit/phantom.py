"""
Synthetic paired T1w/T2w axial brain slices: the embedded default data set.

A subject is a handful of random numbers (head size and shape, atrophy, folding pattern,
deformation, ...). A slice is drawn at an axial level z in [0, 1] (0 = basal ganglia and
third ventricle, ~0.4 = bodies of the lateral ventricles, 1 = centrum semiovale), so anatomy
changes with level. For each pixel we compute analytic tissue *fractions* from signed
distances (in mm) to every boundary, which gives partial volume for free; then

    signal   = sum_k fraction_k * S_k,   S_k = PD (1 - exp(-TR/T1)) exp(-TE/T2)   (spin echo)
    image    = |blur(signal) * bias + n_re + i n_im|,   n ~ N(0, sigma^2)         (Rician)
    image   /= 99.5th percentile over brain pixels of the subject, clip to [0, 1], float32

Everything is plain numpy and deterministic from the seed (numpy.random.default_rng).
About 20-40 ms per 304x256 slice on one core.

Coordinates: mm, x to the image right, y down the rows (anterior at the top, posterior at the
bottom), theta = atan2(y, x).
"""

import numpy as np

# ----------------------------------------------------------------------------------------
# tissues and sequences

TISSUES = ("background", "csf", "gm", "wm", "deep_gm", "skull", "fat", "scalp")
BRAIN_TISSUES = ("csf", "gm", "wm", "deep_gm")   # intracranial: what `mask` covers
LABEL = {name: i for i, name in enumerate(TISSUES)}

# (T1 ms, T2 ms, relative proton density) at 3 T. APPROXIMATE, rounded values inside the
# spread reported in the literature, not measurements of ours:
#   brain (WM, GM, deep GM, CSF): Wansapura et al. JMRI 1999 (WM T1 ~830, GM ~1330 ms),
#     Stanisz et al. MRM 2005 (WM 1084/69, GM 1820/99 ms), Lu et al. JMRI 2005 (CSF T1 ~4 s);
#     CSF T2 at 3 T is long and poorly defined (1-2 s); deep GM (thalamus, putamen, caudate)
#     sits between WM and GM in T1 and is short in T2 (iron).
#   fat, scalp muscle: Gold et al. AJR 2004 / Stanisz 2005 (muscle T1 ~1400, T2 ~30-50 ms;
#     subcutaneous fat T1 ~380 ms). Fat T2 is ~70 ms in a conventional spin echo.
#   cortical bone: T2* ~0.4 ms (ultrashort-TE studies), so ~no signal at TE >= 10 ms.
#   PD: water content relative to CSF (WM ~0.70, GM ~0.80).
TISSUE_PARAMS = {
    "background": (1.0, 1.0, 0.0),       # no protons; T1/T2 unused
    "csf":        (4300.0, 2000.0, 1.00),
    "gm":         (1600.0, 95.0, 0.80),
    "wm":         (1000.0, 70.0, 0.70),
    "deep_gm":    (1350.0, 75.0, 0.78),
    "skull":      (250.0, 0.5, 0.20),
    "fat":        (380.0, 70.0, 0.90),
    "scalp":      (1400.0, 35.0, 0.75),  # skin + muscle
}

# (TR ms, TE ms): short TR / short TE = T1-weighted, long TR / long TE = T2-weighted.
SEQUENCES = {"t1": (500.0, 10.0), "t2": (4000.0, 100.0)}
# resulting noiseless signals (x1000), see signal():
#            csf   gm   wm  deep_gm  fat  scalp  skull
#   t1:      109  193  239   211     571   169     0     -> WM > deep GM > GM > CSF, fat brightest
#   t2:      576  256  165   195     216    41     0     -> CSF > GM > deep GM > WM


def signal(tissue: str, seq: str) -> float:
    """Noiseless spin-echo signal PD * (1 - exp(-TR/T1)) * exp(-TE/T2) of one tissue."""
    if tissue not in TISSUE_PARAMS:
        raise ValueError(f"unit/phantom.py: unknown tissue {tissue!r}; use one of {TISSUES}.")
    if seq not in SEQUENCES:
        raise ValueError(f"unit/phantom.py: unknown sequence {seq!r}; use one of {tuple(SEQUENCES)}.")
    t1, t2, pd = TISSUE_PARAMS[tissue]
    tr, te = SEQUENCES[seq]
    return float(pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2))


# field of view: 200 mm across the width at the default 304x256 (0.78 mm pixels, HCP-like);
# other sizes keep the whole FOV in frame (the pixel grows).
FOV_MM = (200.0 * 304 / 256, 200.0)   # (H, W)
NTHETA = 2048                         # per-angle tables: bins of 0.18 deg (nearest lookup)

# ----------------------------------------------------------------------------------------
# small numpy helpers


def _sat(d):
    """Signed distance in pixels (positive inside) -> area fraction inside; a 1-pixel ramp."""
    return np.clip(d + 0.5, 0.0, 1.0)


def _band(d, width):
    """Like _sat, but the fraction never exceeds the structure's width (px): a line thinner than
    a pixel covers only part of it."""
    return np.clip(d + 0.5, 0.0, np.minimum(width, 1.0))


def _fourier(rng, theta, n_terms, amp, decay=1.0):
    """Random smooth periodic function of theta: sum_m a_m cos(m theta + p_m), |a_m| ~ amp/m^decay."""
    m = np.arange(1, n_terms + 1)
    a = rng.uniform(-1.0, 1.0, n_terms) * amp / m ** decay
    p = rng.uniform(0.0, 2 * np.pi, n_terms)
    return (a[:, None] * np.cos(m[:, None] * theta[None, :] + p[:, None])).sum(0)


def _ellipse_sd(x, y, cx, cy, a, b, rot=0.0):
    """Approximate signed distance (mm, positive inside) to an ellipse; exact on the boundary
    to first order: (1 - q) / |grad q| with q the ellipse 'radius'."""
    c, s = float(np.cos(rot)), float(np.sin(rot))
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-6
    g = np.sqrt((u / a ** 2) ** 2 + (v / b ** 2) ** 2) / q + 1e-6
    return (1.0 - q) / g


def _blur(img, sigma):
    """Separable Gaussian blur along the last two axes, edges replicated; numpy only."""
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(img.dtype)
    for axis in (-1, -2):
        n = img.shape[axis]
        p = np.concatenate([np.repeat(np.take(img, [0], axis), r, axis), img,
                            np.repeat(np.take(img, [n - 1], axis), r, axis)], axis)
        out = np.zeros_like(img)
        for i, w in enumerate(k):
            out += w * np.take(p, np.arange(i, i + n), axis)
        img = out
    return img


def _smooth_noise(rng, shape, sigma_px):
    """Gaussian random field, unit std, correlation length ~sigma_px (FFT low-pass of white noise)."""
    H, W = shape
    w = np.fft.rfft2(rng.standard_normal((H, W)))
    fy = np.fft.fftfreq(H)[:, None]
    fx = np.fft.rfftfreq(W)[None, :]
    w *= np.exp(-2 * np.pi ** 2 * sigma_px ** 2 * (fx * fx + fy * fy))
    f = np.fft.irfft2(w, s=(H, W))
    return (f / (f.std() + 1e-12)).astype(np.float32)


def _smoothstep(z, lo, hi):
    t = np.clip((z - lo) / (hi - lo), 0.0, 1.0)
    t = t * t * (3 - 2 * t)
    return float(t) if np.ndim(t) == 0 else t   # python floats keep float32 arrays float32


# ----------------------------------------------------------------------------------------
# a subject: the random numbers that stay fixed across its slices


def _draw_subject(rng):
    S = {}
    S["atrophy"] = rng.beta(2.0, 3.0)                    # 0 young .. 1 old: ventricles, sulci, CSF
    S["head_a"] = rng.uniform(74.0, 84.0)                # half-width (left-right), mm
    S["head_ratio"] = rng.uniform(1.14, 1.28)            # length / width
    S["skin"] = rng.uniform(1.2, 2.0)                    # mm
    S["fat"] = rng.uniform(1.5, 4.0)
    S["skull"] = rng.uniform(5.0, 8.0)
    S["csf"] = rng.uniform(0.8, 1.6) + 2.0 * S["atrophy"]   # extra-axial CSF, mm
    S["cortex"] = rng.uniform(2.6, 3.4)                  # GM thickness, mm
    S["gyrus"] = rng.uniform(14.0, 18.0)                 # gyral period along the surface, mm
    S["sulc_hw"] = 0.45 + 0.6 * S["atrophy"] + rng.uniform(0, 0.2)   # sulcal CSF half-width, mm
    S["sulc_depth"] = rng.uniform(14.0, 22.0)            # mean sulcal depth, mm
    S["fold_noise"] = rng.uniform(1.0, 1.8)              # how much sulci meander, rad
    S["vent"] = 0.65 + 0.9 * S["atrophy"] + rng.uniform(-0.1, 0.1)   # ventricle scale
    S["rot"] = rng.uniform(-0.08, 0.08)                  # in-plane rotation, rad
    S["shift"] = rng.uniform(-4.0, 4.0, 2)               # mm
    # smooth random deformation: 3 plane waves per axis, wavelength 60-160 mm, 1-2.5 mm
    S["warp_k"] = rng.uniform(-1, 1, (2, 3, 2)) * (2 * np.pi / rng.uniform(60, 160, (2, 3, 1)))
    S["warp_a"] = rng.uniform(0.5, 1.5, (2, 3)) * rng.choice([-1, 1], (2, 3))
    S["warp_p"] = rng.uniform(0, 2 * np.pi, (2, 3))
    # per-angle shapes (tables over theta), drawn once per subject
    th = -np.pi + (np.arange(NTHETA) + 0.5) * (2 * np.pi / NTHETA)   # bin centres
    S["head_shape"] = _fourier(rng, th, 5, 0.025, 1.2)                  # relative radius wobble
    S["skull_var"] = _fourier(rng, th, 4, 0.25, 1.0)                    # relative thickness wobble
    S["cortex_var"] = _fourier(rng, th, 6, 0.15, 0.5)
    S["diploe"] = np.clip(0.1 + _fourier(rng, th, 5, 0.6, 0.7), 0.0, 0.4)  # marrow share of the skull
    # folding: per-level phase perturbation terms (amplitude, phase, how fast they drift in z)
    m = np.arange(1, 11)
    S["fold_a"] = rng.uniform(-1, 1, 10) * 5.0 / (m * np.sqrt(m))
    S["fold_p"] = rng.uniform(0, 2 * np.pi, 10)
    S["fold_w"] = rng.uniform(-6, 6, 10)
    S["bend_a"] = rng.uniform(-1, 1, 4) * 0.12
    S["bend_p"] = rng.uniform(0, 2 * np.pi, 4)
    # per-sulcus depth profiles over z (index = sulcus number)
    S["sd_w"] = rng.uniform(3, 9, 64)
    S["sd_p"] = rng.uniform(0, 2 * np.pi, 64)
    S["sd2_w"] = rng.uniform(3, 9, 64)
    S["sd2_p"] = rng.uniform(0, 2 * np.pi, 64)
    # deep structures: small random offsets (mm) and scales
    S["deep_jit"] = rng.uniform(-1.5, 1.5, 8).tolist()   # python floats: keep arrays float32
    S["deep_scale"] = rng.uniform(0.85, 1.15, 4).tolist()
    S["vent_asym"] = rng.uniform(0.85, 1.15, 2).tolist()
    S["midline_c"] = rng.uniform(-0.0015, 0.0015)           # midline curvature, 1/mm
    # acquisition: noise level (fraction of the brain's top signal), bias fields
    S["noise"] = rng.uniform(0.012, 0.035)
    S["bias"] = rng.uniform(-1, 1, (2, 6)) * np.array([0.12, 0.12, 0.06, 0.06, 0.06, 0.04])
    return S


# ----------------------------------------------------------------------------------------
# one slice: tissue fractions (K, H, W)


VENTRICLE_Y = (-32.0, 30.0)                              # ventricle extent along y (reference brain, mm)


def _fractions(S, rng, z, size):
    """Tissue fractions (len(TISSUES), H, W), summing to 1, of subject S at level z in [0, 1] (bottom to top), on
    an H x W grid: the head's coordinates, its per-angle radii, the distance to CSF (sulci, fissure), the deep
    structures, then the fractions nested from the outside in."""
    px, x, y, r, theta = _coordinates(S, size)
    T, k, R_mean = _angle_tables(S, z, theta)
    (R_head, R_skin, R_fat, R_dip_out, R_dip_in, R_skull_in, R_brain, thick,
     pert, rate, bend, sylvian, midline_supp) = T
    depth, d_s1, d_s2, hw, d_f, hw_f, dp, xm, sy, vs = _csf_distance(S, rng, z, px, x, y, r, theta, T, k, R_mean)
    v, d_n = _deep_structures(S, z, px, x, y, xm, sy, vs)
    H, W = size
    f32 = np.float32
    ip = f32(1.0 / px)

    # ---- fractions, nested from the outside in (all in [0, 1], summing to 1)
    f_head = _sat((R_head - r) * ip)
    f_in_skin = _sat((R_skin - r) * ip)
    f_in_fat = _sat((R_fat - r) * ip)
    f_dip_out = _sat((R_dip_out - r) * ip)
    f_dip_in = _sat((R_dip_in - r) * ip)
    f_ic = _sat((R_skull_in - r) * ip)
    # thin CSF bands (sulci, fissure) are capped at their width so sub-pixel ones stay faint
    c_thin = np.maximum(np.maximum(_band(-d_s1 * ip, 2 * hw * ip), _band(-d_s2 * ip, 2 * hw * ip)),
                        _band(-d_f * ip, 2 * hw_f * ip))
    p = np.minimum(np.minimum(_sat(depth * ip), 1.0 - c_thin), f_ic)   # parenchyma
    wr = np.minimum(_sat((dp - thick) * ip), p)          # deeper than the cortical ribbon
    nuc = np.minimum(_sat(d_n * ip), 1.0 - v)
    F = np.empty((len(TISSUES), H, W), f32)
    F[LABEL["background"]] = 1.0 - f_head
    F[LABEL["scalp"]] = f_head - f_in_skin
    F[LABEL["fat"]] = (f_in_skin - f_in_fat) + (f_dip_out - f_dip_in)
    F[LABEL["skull"]] = (f_in_fat - f_dip_out) + (f_dip_in - f_ic)
    F[LABEL["csf"]] = f_ic - p + wr * v
    F[LABEL["gm"]] = p - wr
    F[LABEL["deep_gm"]] = wr * nuc
    F[LABEL["wm"]] = wr * (1.0 - v - nuc)
    return F


def _coordinates(S, size):
    """mm per pixel and the head's coordinates of every pixel (rotated, shifted, smoothly deformed): x, y, and
    their polar r, theta, each (H, W) float32."""
    H, W = size
    px = max(FOV_MM[0] / H, FOV_MM[1] / W)             # mm per pixel
    f32 = np.float32
    y0 = ((np.arange(H, dtype=f32) - (H - 1) / 2) * px)[:, None]
    x0 = ((np.arange(W, dtype=f32) - (W - 1) / 2) * px)[None, :]
    c, s = float(np.cos(S["rot"])), float(np.sin(S["rot"]))
    x = c * x0 + s * y0 - f32(S["shift"][0])
    y = -s * x0 + c * y0 - f32(S["shift"][1])
    # smooth deformation: x += sum a sin(k.(x,y) + p), same for y
    dx = np.zeros((H, W), f32)
    dy = np.zeros((H, W), f32)
    for j in range(3):
        kx, ky = S["warp_k"][0, j]
        dx += f32(S["warp_a"][0, j]) * np.sin(f32(kx) * x + f32(ky) * y + f32(S["warp_p"][0, j]))
        kx, ky = S["warp_k"][1, j]
        dy += f32(S["warp_a"][1, j]) * np.sin(f32(kx) * x + f32(ky) * y + f32(S["warp_p"][1, j]))
    x = x + dx
    y = y + dy
    r = np.sqrt(x * x + y * y)
    theta = np.arctan2(y, x)
    return px, x, y, r, theta


def _angle_tables(S, z, theta):
    """The per-angle radii and folding parameters at level z, looked up for every pixel's theta: T (13, H, W) in the
    order of _fractions' unpacking, the number of gyri k and the mean brain radius."""
    f32 = np.float32
    # ---- per-angle tables (NTHETA,), then looked up per pixel (nearest bin)
    th = -np.pi + (np.arange(NTHETA) + 0.5) * (2 * np.pi / NTHETA)   # bin centres
    level = float(np.sqrt(1.0 - (0.5 * z) ** 2))               # head cross-section shrinks upwards
    a = S["head_a"] * level
    b = a * S["head_ratio"]
    # egg shape: a little wider at the back (theta = +pi/2 is posterior)
    R_head = a * b / np.sqrt((b * np.cos(th)) ** 2 + (a * np.sin(th)) ** 2)
    R_head = R_head * (1.0 + S["head_shape"] + 0.03 * np.sin(th))
    skull_t = S["skull"] * (1.0 + S["skull_var"]) * (1.0 + 0.25 * np.sin(th) ** 2)  # thicker front/back
    R_skin = R_head - S["skin"]
    R_fat = R_skin - S["fat"] * (1.0 + 0.5 * S["skull_var"])
    R_dip_out = R_fat - (0.5 - 0.5 * S["diploe"]) * skull_t
    R_dip_in = R_fat - (0.5 + 0.5 * S["diploe"]) * skull_t
    R_skull_in = R_fat - skull_t
    R_brain = R_skull_in - S["csf"] * (1.0 + 0.4 * S["skull_var"])
    thick = S["cortex"] * (1.0 + S["cortex_var"])
    # folding phase phi(theta) = k theta + pert(theta); sulci sit at phi = 2 pi n
    R_mean = float(R_brain.mean())
    k = max(8, int(round(2 * np.pi * R_mean / S["gyrus"])))
    m = np.arange(1, 11)[:, None]
    ph = S["fold_p"][:, None] + S["fold_w"][:, None] * z
    pert = (S["fold_a"][:, None] * np.sin(m * th + ph)).sum(0)
    dpert = (S["fold_a"][:, None] * m * np.cos(m * th + ph)).sum(0)
    rate = np.maximum(k + dpert, 0.3 * k)               # d phi / d theta (kept positive)
    mb = np.arange(1, 5)[:, None]
    bend = (S["bend_a"][:, None] * np.sin(mb * th + S["bend_p"][:, None] + 3 * z)).sum(0)
    # deeper Sylvian fissure laterally at low levels; no sulci right at the midline (fissure)
    lat = np.minimum(np.abs(np.angle(np.exp(1j * (th + 0.25)))),
                     np.abs(np.angle(np.exp(1j * (th - np.pi - 0.25)))))
    sylvian = 26.0 * np.exp(-(lat / 0.12) ** 2) * (1.0 - _smoothstep(z, 0.15, 0.45))
    mid = np.minimum(np.abs(th - np.pi / 2), np.abs(th + np.pi / 2))
    midline_supp = _smoothstep(mid, 0.05, 0.25)

    tables = np.stack([R_head, R_skin, R_fat, R_dip_out, R_dip_in, R_skull_in, R_brain, thick,
                       pert, rate, bend, sylvian, midline_supp]).astype(f32)
    it = np.minimum(((theta + f32(np.pi)) * f32(NTHETA / (2 * np.pi))).astype(np.intp), NTHETA - 1)
    T = np.take(tables, it, axis=1)                      # (13, H, W)
    return T, k, R_mean


def _csf_distance(S, rng, z, px, x, y, r, theta, T, k, R_mean):
    """Signed distance to CSF of every pixel and its parts (sulci, interhemispheric fissure), plus what the deep
    structures need: the curved midline xm, the brain scale sy and the ventricle size vs at this level."""
    (R_head, R_skin, R_fat, R_dip_out, R_dip_in, R_skull_in, R_brain, thick,
     pert, rate, bend, sylvian, midline_supp) = T
    H, W = x.shape
    f32 = np.float32
    # ---- cortex: distance to CSF = min(depth below brain surface, distance to a sulcus).
    # Sulci are the lines phi = 2 pi n of a folding phase phi = k theta + (smooth wobble in theta)
    # + bend * depth + N(x, y), N a smooth random field: curved, branching-looking, roughly
    # perpendicular to the surface like real sulci. Distance to a line ~ |phi - 2 pi n| / |grad phi|.
    depth = R_brain - r                                  # mm below the brain surface
    N = _smooth_noise(rng, (H, W), 9.0 / px) * f32(S["fold_noise"])
    Ny, Nx = np.gradient(N, px)
    dpos = np.maximum(depth, 0)
    phi = k * theta + pert + bend * dpos + N
    ir = 1.0 / np.maximum(r, 1.0)
    radial = np.where(depth > 0, bend, 0)
    gx = -rate * y * ir * ir - radial * x * ir + Nx
    gy = rate * x * ir * ir - radial * y * ir + Ny
    inv_g = 1.0 / np.maximum(np.sqrt(gx * gx + gy * gy), 1e-3)   # mm per radian of phi
    n = np.round(phi / (2 * np.pi))
    u = phi - 2 * np.pi * n                              # in [-pi, pi], 0 on a sulcus
    n = n.astype(np.int64) % k
    D = S["sulc_depth"] * (0.6 + 0.4 * np.sin(S["sd_w"] * z + S["sd_p"]))[:k].astype(f32)
    D2 = 0.8 * S["sulc_depth"] * np.sin(S["sd2_w"] * z + S["sd2_p"])[:k].astype(f32) - 0.25 * S["sulc_depth"]
    Dp = np.maximum(D[n], sylvian) * midline_supp        # primary sulcus depth at this pixel
    hw = f32(S["sulc_hw"]) * (1.0 + 0.5 * sylvian / 26.0)
    s1 = np.abs(u) * inv_g
    d_s1 = np.where(depth <= Dp, s1, np.sqrt(s1 * s1 + (depth - Dp) ** 2)) - hw
    # secondary (shallower, often absent) sulci half-way between the primary ones
    u2 = np.pi - np.abs(u)
    n2 = np.where(u >= 0, n, (n - 1) % k)
    Dq = D2[n2] * midline_supp
    s2 = u2 * inv_g
    d_s2 = np.where(depth <= Dq, s2, np.sqrt(s2 * s2 + (depth - Dq) ** 2)) - hw
    # interhemispheric fissure, interrupted by the corpus callosum at low/mid levels
    cc = 1.0 - _smoothstep(z, 0.5, 0.68)
    vs = S["vent"] * (0.55 + 0.45 * float(np.exp(-((z - 0.35) / 0.22) ** 2)))   # ventricle size at this level
    y_front, y_back = VENTRICLE_Y
    sy = R_mean / 62.0                                   # brain scale relative to the reference
    ya, yp = (y_front - 6.0) * sy * cc, (y_back + 6.0) * sy * cc
    xm = f32(S["midline_c"]) * y * y                     # slightly curved midline
    gap = np.clip(np.minimum(y - ya, yp - y), 0.0, None)
    hw_f = f32(0.9 + 0.6 * S["atrophy"])
    d_f = np.sqrt((x - xm) ** 2 + gap * gap) - hw_f
    dp = np.minimum(np.minimum(depth, d_f), np.minimum(d_s1, d_s2))   # signed dist. to CSF
    return depth, d_s1, d_s2, hw, d_f, hw_f, dp, xm, sy, vs


def _deep_structures(S, z, px, x, y, xm, sy, vs):
    """Ventricles v (a fraction) and the signed distance d_n to the deep grey nuclei (caudate, thalamus, putamen)."""
    H, W = x.shape
    f32 = np.float32
    # ---- ventricles and deep grey nuclei, in reference-brain coordinates (half-width 62 mm).
    # A lateral ventricle is a band along y from the frontal-horn tip (tv=0) to the occipital
    # horn (tv=1): medial edge xc(tv) (straight septum, diverging behind), half-width prof(tv)
    # (frontal horn, body at mid levels only, atrium).
    xr, yr = (x - xm) / sy, y / sy
    vent_on = 1.0 - _smoothstep(z, 0.6, 0.78)
    body = _smoothstep(z, 0.12, 0.3)                     # bodies join horns above the thalami
    y_front, y_back = VENTRICLE_Y
    tv = (yr - y_front) / (y_back - y_front)
    inside = (tv > 0) & (tv < 1)
    tvc = np.clip(tv, 0.0, 1.0)
    prof = (5.0 * np.exp(-((tvc - 0.17) / 0.12) ** 2)
            + 3.5 * body * np.exp(-((tvc - 0.5) / 0.2) ** 2)
            + 5.5 * np.exp(-((tvc - 0.8) / 0.1) ** 2) * (0.6 + 0.4 * (1 - body)))
    prof = prof * np.clip(4 * tvc * (1 - tvc), 0, 1) ** 0.35 * (vs * vent_on)
    xc = 1.5 + 0.3 * vs + 60.0 * np.clip(tvc - 0.45, 0, None) ** 2 * (1.2 - 0.4 * body)
    ip = f32(1.0 / px)
    v = np.zeros((H, W), f32)
    for side, asym in zip((-1.0, 1.0), S["vent_asym"]):
        dv = np.where(inside, prof * asym - np.abs(side * xr - xc - prof * asym), -1e3)
        v = np.maximum(v, _band(dv * sy * ip, 2 * prof * asym * sy * ip))
    low = 1.0 - _smoothstep(z, 0.22, 0.38)              # third ventricle, thalami, putamen
    if low > 0.01:
        third = _ellipse_sd(xr, yr, 0.0, 6.0, (1.0 + 1.0 * S["vent"]) * low, 8.0 * low)
        v = np.maximum(v, _sat(third * sy * ip))
    j = S["deep_jit"]
    ds = S["deep_scale"]
    d_n = np.full((H, W), -1e3, f32)
    caud = (1.0 - _smoothstep(z, 0.45, 0.62)) * ds[0]   # caudate follows the ventricle upwards
    if caud > 0.01:
        horn_lat = 1.5 + 0.3 * vs + 2 * 5.0 * 0.9 * vs * vent_on   # lateral wall of the frontal horn
        for side in (-1.0, 1.0):
            d_n = np.maximum(d_n, _ellipse_sd(xr, yr, side * (horn_lat + 2.5 + j[0]), -19.0 + j[1],
                                              4.5 * caud, 9.0 * caud, side * 0.3))
    if low > 0.01:
        for side in (-1.0, 1.0):
            d_n = np.maximum(d_n, _ellipse_sd(xr, yr, side * (10.0 + j[2]), 9.0 + j[3],   # thalamus
                                              7.5 * low * ds[1], 11.0 * low * ds[1], -side * 0.2))
            d_n = np.maximum(d_n, _ellipse_sd(xr, yr, side * (25.0 + j[4]), -4.0 + j[5],  # putamen
                                              5.0 * low * ds[2], 13.0 * low * ds[2], -side * 0.15))
    d_n = d_n * sy
    return v, d_n


def _bias(coef, H, W):
    """Smooth multiplicative field exp(quadratic polynomial in normalised x, y)."""
    yy = np.linspace(-1, 1, H, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, W, dtype=np.float32)[None, :]
    c = coef.astype(np.float32)
    return np.exp(c[0] * xx + c[1] * yy + c[2] * xx * xx + c[3] * yy * yy + c[4] * xx * yy
                  + c[5] * (xx * xx - yy * yy) * xx)


# ----------------------------------------------------------------------------------------
# public API


def phantom_subject(seed: int, size: tuple[int, int] = (304, 256), slices: int = 1) -> dict:
    """One synthetic subject: `slices` axial slices at distinct random levels.

    Returns {'t1': float32 (S,H,W) in [0,1], 't2': float32 (S,H,W) in [0,1],
    'mask': bool (S,H,W) brain mask (intracranial: CSF, GM, WM, deep GM),
    'labels': uint8 (S,H,W) dominant tissue label per pixel (index into TISSUES),
    't1_clean', 't2_clean': float32 (S,H,W), the same images before the Rician noise, divided by
    the same reference as the noisy ones (what a perfect translator could at best produce)}.
    Identical output for identical (seed, size, slices)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"unit/phantom.py: seed must be a non-negative int, got {seed!r}.")
    try:
        H, W = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"unit/phantom.py: size must be (H, W), got {size!r}.") from None
    if H < 16 or W < 16:
        raise ValueError(f"unit/phantom.py: size must be at least 16x16, got {H}x{W}.")
    if not isinstance(slices, (int, np.integer)) or slices < 1:
        raise ValueError(f"unit/phantom.py: slices must be a positive int, got {slices!r}.")

    rng = np.random.default_rng(int(seed))
    S = _draw_subject(rng)
    # distinct levels: one per stratum of [0, 1], in random order
    z = (np.arange(slices) + rng.uniform(0.05, 0.95, slices)) / slices
    z = z[rng.permutation(slices)]
    sig = {q: np.array([signal(t, q) for t in TISSUES], np.float32) for q in SEQUENCES}

    out = {q: np.empty((slices, H, W), np.float32) for q in SEQUENCES}
    labels = np.empty((slices, H, W), np.uint8)
    for i in range(slices):
        F = _fractions(S, rng, float(z[i]), (H, W))
        labels[i] = F.argmax(0)
        for j, q in enumerate(SEQUENCES):
            img = np.tensordot(sig[q], F, axes=1)        # (H, W) noiseless, partial volume
            img = _blur(img, 0.5)                        # point-spread function, ~1.2 px FWHM
            out[q][i] = img * _bias(S["bias"][j], H, W)
    mask = np.isin(labels, [LABEL[t] for t in BRAIN_TISSUES])

    clean = {}
    for q in SEQUENCES:
        img = out[q]
        sigma = np.float32(S["noise"] * np.percentile(img[mask], 99.5) if mask.any() else S["noise"])
        re = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
        im = sigma * rng.standard_normal(img.shape, dtype=np.float32)
        noisy = np.sqrt(re * re + im * im)               # Rician magnitude
        ref = max(float(np.percentile(noisy[mask], 99.5) if mask.any() else noisy.max()), 1e-12)
        out[q] = np.clip(noisy / ref, 0.0, 1.0).astype(np.float32)
        clean[q] = np.clip(img / ref, 0.0, 1.0).astype(np.float32)   # same scale as the noisy image
    return {"t1": out["t1"], "t2": out["t2"], "mask": mask, "labels": labels,
            "t1_clean": clean["t1"], "t2_clean": clean["t2"]}


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject `index` of a data set with master `seed`:
    int(SeedSequence([seed, index]).generate_state(1, uint64)[0]) >> 1 (a non-negative int64)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]) >> 1


def phantom_dataset(n_subjects: int, size: tuple[int, int] = (304, 256), slices: int = 1,
                    seed: int = 0):
    """Yields (index, phantom_subject(subject_seed(seed, index), size, slices)) for index in
    range(n_subjects). Subject i depends only on (seed, i, size, slices)."""
    for i in range(int(n_subjects)):
        yield i, phantom_subject(subject_seed(seed, i), size, slices)
