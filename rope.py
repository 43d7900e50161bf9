"""Rotary position embeddings (RoPE) that can carry pitch.

RoPE treats each interleaved pair (x_2i, x_2i+1) of a query or key as a complex number and turns it by
an angle that grows with position: at frame t, pair i is multiplied by r_t * exp(j * angle_i(t)). Plain
RoPE has r = 1 and angle_i(t) = t * w_i, so the score <R_t q, R_s k> depends on t - s only. The
pitch-aware variants change three things, each switchable:

    frequencies  w_i          standard theta^(-2i/D), or the seed's mel-spaced ones
    angles       angle_i(t)   t*w_i, or with theta modulated by pitch (theta_t = theta + f0_t):
                              accumulated phase sum_{s=1..t} w_i(theta_s) (stays relative), or the
                              seed's absolute t * w_i(theta_t) (kept only to show it is not relative)
    radius       r_t          1, f0_t / median voiced f0 (default when on), or the seed's raw Hz

Angles are computed in float64 and reduced mod 2*pi before the float32 rotation: only the angle mod
2*pi matters, and in float32 a phase of 1e5 rad would already be off by ~0.01 rad.
"""
import math

import torch

# Mel bands (Hz) the seed used for its mel-spaced frequencies; "200-4000" is the default.
BANDS = {"200-4000": (200.0, 4000.0), "150-6000": (150.0, 6000.0),
         "80-2000": (80.0, 2000.0), "700-8000": (700.0, 8000.0)}


def _check_head_dim(head_dim):
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even integer >= 2 (dimensions rotate in pairs), got {head_dim!r}")


def _theta64(theta, device=None):
    """theta as a float64 tensor (...,), keeping the autograd graph when theta is a learnable tensor."""
    if torch.is_tensor(theta):
        return theta.to(torch.float64)
    return torch.tensor(float(theta), dtype=torch.float64, device=device)


def std_freqs(head_dim, theta=10000.0, device=None):
    """Standard rotary frequencies w_i = theta^(-2i/D), i = 0..D/2-1, in radians per frame.

    theta: float or tensor (...,); returns float64 (..., D/2). w_0 = 1, and w decays geometrically.
    """
    _check_head_dim(head_dim)
    theta = _theta64(theta, device)
    i = torch.arange(head_dim // 2, dtype=torch.float64, device=theta.device)
    return theta.unsqueeze(-1) ** (-2.0 * i / head_dim)


def mel_freqs(head_dim, theta=10000.0, fmin=200.0, fmax=4000.0, device=None):
    """The seed's mel-spaced rotary frequencies, in radians per frame:

        w_i = (theta / 220) * fmin * (10^(m_i / 2595) - 1) / 1000,
        m_i = linspace(0, 2595 * log10(1 + fmax / fmin), D/2).

    So w_i is (theta/220) * (Hz of mel point m_i above fmin) / 1000: w_0 = 0 (that pair never rotates)
    and the top one is theta/220 * fmax/1000 (~182 rad/frame at theta 1e4, 4 kHz), far beyond pi, so it
    aliases: at integer positions only w mod 2*pi is seen. This is the seed's formula, kept as it is.
    theta: float or tensor (...,); returns float64 (..., D/2).
    """
    _check_head_dim(head_dim)
    if not 0 < fmin < fmax:
        raise ValueError(f"mel band needs 0 < fmin < fmax, got fmin={fmin}, fmax={fmax}")
    theta = _theta64(theta, device)
    m = torch.linspace(0.0, 2595.0 * math.log10(1.0 + fmax / fmin), head_dim // 2,
                       dtype=torch.float64, device=theta.device)
    return (theta.unsqueeze(-1) / 220.0) * fmin * (10.0 ** (m / 2595.0) - 1.0) / 1000.0


def rotary_freqs(head_dim, theta=10000.0, rope="std", band=(200.0, 4000.0), device=None):
    """w_i for the named kind of rope: 'std' -> std_freqs, 'mel' -> mel_freqs over band (Hz, or a BANDS key)."""
    if rope == "std":
        return std_freqs(head_dim, theta, device)
    if rope == "mel":
        fmin, fmax = BANDS[band] if isinstance(band, str) else band
        return mel_freqs(head_dim, theta, fmin, fmax, device)
    raise ValueError(f"rope must be 'std' or 'mel', got {rope!r}")


def _check_f0(f0, T=None):
    if not torch.is_tensor(f0) or not f0.is_floating_point():
        raise TypeError(f"f0 must be a floating-point tensor (..., T) in Hz, got {type(f0).__name__}"
                        + (f" of {f0.dtype}" if torch.is_tensor(f0) else ""))
    if T is not None and f0.shape[-1] != T:
        raise ValueError(f"f0 has {f0.shape[-1]} frames but the sequence has T={T}: lengths must match")
    if not torch.isfinite(f0).all():
        raise ValueError("f0 contains NaN or inf")
    if (f0 < 0).any():
        raise ValueError("f0 must be >= 0 Hz (0 marks unvoiced frames); got a negative value")


def rope_angles(T, head_dim, rope="std", theta=10000.0, band=(200.0, 4000.0), f0=None, theta_mod=None):
    """Rotation angles for positions t = 0..T-1, float32 in [0, 2*pi).

    theta_mod=None:          angle_i(t) = t * w_i(theta)                     -> (T, D/2); f0 is ignored
    theta_mod='accumulate':  angle_i(t) = sum_{s=1..t} w_i(theta + f0_s)     -> (..., T, D/2)
    theta_mod='absolute':    angle_i(t) = t * w_i(theta + f0_t)  (the seed's; not relative)

    The accumulated phase is the integral of an instantaneous frequency, so angle(t) - angle(s) is what
    the frames between s and t contributed, whatever t and s are; with constant f0 it is exactly
    t * w_i(theta + f0), and with f0 = 0 it is plain RoPE.
    """
    if theta_mod is None:
        t = torch.arange(T, dtype=torch.float64, device=theta.device if torch.is_tensor(theta) else None)
        w = rotary_freqs(head_dim, theta, rope, band, device=t.device)  # (D/2,)
        angles = t[:, None] * w
    elif theta_mod in ("accumulate", "absolute"):
        if f0 is None:
            raise ValueError(f"theta_mod={theta_mod!r} needs an f0 track")
        _check_f0(f0, T)
        w = rotary_freqs(head_dim, _theta64(theta, f0.device) + f0.to(torch.float64), rope, band)  # (..., T, D/2)
        if theta_mod == "accumulate":
            angles = torch.cat([torch.zeros_like(w[..., :1, :]), w[..., 1:, :].cumsum(-2)], dim=-2)
        else:
            t = torch.arange(T, dtype=torch.float64, device=f0.device)
            angles = t[:, None] * w
    else:
        raise ValueError(f"theta_mod must be None, 'accumulate' or 'absolute', got {theta_mod!r}")
    return torch.remainder(angles, 2 * math.pi).to(torch.float32)


def rope_radius(f0, mode="relative"):
    """Radius r_t of each frame's rotation, (..., T) float32.

    mode='relative': r_t = f0_t / median of the utterance's voiced f0 on voiced frames (f0 > 0), and 1 on
                     unvoiced and padding frames, so logits scale by r_t * r_s ~ 1 and consonants survive.
    mode='hz':       r_t = f0_t in Hz, the seed's choice: logits scale by f0_t * f0_s ~ 1e4-1e5 and every
                     unvoiced frame's q and k become 0. Kept for comparison only.
    (torch.nanmedian takes the lower of the two middle values when the count is even.)
    """
    _check_f0(f0)
    if mode == "hz":
        return f0.float()
    if mode != "relative":
        raise ValueError(f"radius mode must be 'relative' or 'hz', got {mode!r}")
    voiced = f0 > 0
    median = torch.nanmedian(torch.where(voiced, f0, torch.nan), dim=-1, keepdim=True).values
    return torch.where(voiced, f0 / median, torch.ones_like(f0)).float()


def rotation(angles, radius=None):
    """Complex rotation factors r * exp(j * angle) = torch.polar(r, angle), complex64 of angles' shape.

    angles (T, D/2) or (B, T, D/2); radius None (unit circle) or (T,) or (B, T), broadcast over the pairs
    (a batch of radii turns shared angles into a batch of rotations).
    """
    angles = angles.float()
    r = torch.ones_like(angles) if radius is None else radius.float().unsqueeze(-1)
    return torch.polar(r, angles)


def apply_rotary(x, rot):
    """Rotate interleaved pairs of x by rot: y_2i + j y_2i+1 = (x_2i + j x_2i+1) * rot_i.

    x (B, H, T, D) in any float dtype; rot complex (T, D/2) or (B, T, D/2), shared by all heads.
    Computed in float32, returned in x's dtype.
    """
    if x.shape[-1] != 2 * rot.shape[-1] or x.shape[-2] != rot.shape[-2]:
        raise ValueError(f"x (..., T={x.shape[-2]}, D={x.shape[-1]}) does not match rotation "
                         f"(..., T={rot.shape[-2]}, D/2={rot.shape[-1]})")
    if rot.dim() == 3:
        rot = rot.unsqueeze(1)  # (B, 1, T, D/2): the same rotation for every head
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, H, T, D/2)
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


if __name__ == "__main__":
    D = 64
    std, mel = std_freqs(D), mel_freqs(D)
    print(f"rotary frequencies (rad/frame) for head_dim {D}, theta 1e4; mel band 200-4000 Hz")
    print(f"{'pair':>4} {'std w':>10} {'mel w':>10} {'mel w mod 2pi':>14}")
    for i in [0, 1, 2, 4, 8, 16, 24, 31]:
        print(f"{i:>4} {std[i].item():>10.5f} {mel[i].item():>10.3f} {(mel[i] % (2 * math.pi)).item():>14.3f}")
    print(f"mel pairs with w > pi (aliased at integer positions): {(mel > math.pi).sum().item()} of {D // 2}")
