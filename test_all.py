"""Shape and equivalence checks for every piece of the project.

    python test_all.py            # run everything, print "N passed, M failed"
    python test_all.py rope       # run only the tests whose name contains "rope"
    python -m pytest test_all.py  # also works, if pytest happens to be installed

Each test compares against an independent formulation (a closed form, a second implementation written
differently, or a known value), with fixed seeds and tolerances that mean something.
"""
import math
import sys
import time
import traceback

import numpy as np
import torch

# one thread: the tests run small ops, where a second thread costs more than it saves, and under load
# (other processes on the same cores) waiting threads can slow small ops down a hundredfold
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------
# rope.py

from rope import (BANDS, apply_rotary, mel_freqs, rope_angles, rope_radius, rotary_freqs, rotation,
                  std_freqs)


def _rope_rotate_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplying each pair by j, written in numpy."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def _rope_reference(x, angles):
    """Real-valued RoPE in float64 numpy: y = x * cos + rotate_pairs(x) * sin, angles repeated per pair."""
    cos = np.repeat(np.cos(angles), 2, axis=-1)
    sin = np.repeat(np.sin(angles), 2, axis=-1)
    return x * cos + _rope_rotate_pairs(x) * sin


def _rope_scores(q, k, rot):
    """Attention scores <R_t q_t, R_s k_s> for (B, H, T, D) queries and keys."""
    return apply_rotary(q, rot) @ apply_rotary(k, rot).transpose(-1, -2)


def test_rope_std_matches_real_cos_sin_reference():
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 50, 16
    x = torch.randn(B, H, T, D, generator=g)
    y = apply_rotary(x, rotation(rope_angles(T, D)))
    i = np.arange(D // 2)
    angles = np.arange(T)[:, None] * 10000.0 ** (-2.0 * i / D)  # closed form, float64
    ref = _rope_reference(x.double().numpy(), angles)
    err = np.abs(y.double().numpy() - ref).max()
    assert err < 1e-5, f"max |apply_rotary - cos/sin reference| = {err:.2e}"
    x_small = x[..., :8, :]  # small positions keep float32 rounding of the angles below 1e-6
    err_small = np.abs(apply_rotary(x_small, rotation(rope_angles(8, D))).double().numpy()
                       - _rope_reference(x_small.double().numpy(), angles[:8])).max()
    assert err_small < 1e-6, f"first 8 positions differ by {err_small:.2e}"


def test_rope_matches_rotate_half_after_permutation():
    g = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 2, 20, 8
    x = torch.randn(B, H, T, D, generator=g)
    angles = rope_angles(T, D)
    # rotate_half pairs dim i with dim i + D/2; interleaved pairs (2i, 2i+1) map there by this permutation
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    xh = x[..., perm]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotate_half = torch.cat([-xh[..., D // 2:], xh[..., :D // 2]], dim=-1)
    yh = xh * cos + rotate_half * sin
    y = apply_rotary(x, rotation(angles))
    assert torch.allclose(y[..., perm], yh, atol=1e-6), (y[..., perm] - yh).abs().max()


def test_rope_relative_property_std_and_accumulated_but_not_absolute():
    g = torch.Generator().manual_seed(2)
    H, T, D, shift = 2, 30, 16, 7
    q, k = torch.randn(1, H, T, D, generator=g), torch.randn(1, H, T, D, generator=g)
    f0 = 100 + 150 * torch.rand(1, T, generator=g)
    f0[:, 10:14] = 0  # an unvoiced stretch
    prefix = 80 + 200 * torch.rand(1, shift, generator=g)  # any pitch before: a shift of both positions
    f0_shifted = torch.cat([prefix, f0], dim=-1)
    pad = torch.zeros(1, H, shift, D)
    qs, ks = torch.cat([pad, q], dim=2), torch.cat([pad, k], dim=2)
    for rope in ["std", "mel"]:
        a = _rope_scores(q, k, rotation(rope_angles(T, D, rope)))
        b = _rope_scores(qs, ks, rotation(rope_angles(T + shift, D, rope)))[..., shift:, shift:]
        assert torch.allclose(a, b, atol=1e-5), f"{rope}: plain RoPE scores changed by a shift"
        a = _rope_scores(q, k, rotation(rope_angles(T, D, rope, f0=f0, theta_mod="accumulate")))
        b = _rope_scores(qs, ks, rotation(rope_angles(T + shift, D, rope, f0=f0_shifted,
                                                      theta_mod="accumulate")))[..., shift:, shift:]
        assert torch.allclose(a, b, atol=1e-5), f"{rope}: accumulated-phase scores changed by a shift"
        a = _rope_scores(q, k, rotation(rope_angles(T, D, rope, f0=f0, theta_mod="absolute")))
        b = _rope_scores(qs, ks, rotation(rope_angles(T + shift, D, rope, f0=f0_shifted,
                                                      theta_mod="absolute")))[..., shift:, shift:]
        # with std freqs, theta + f0 moves w by only ~f0/theta, so the break is small but 100x the tolerance
        assert (a - b).abs().max() > 1e-3, f"{rope}: the seed's absolute form looked relative"


def test_rope_special_cases_collapse():
    T, D = 40, 16
    plain = rope_angles(T, D, "mel")
    zero = rope_angles(T, D, "mel", f0=torch.zeros(3, T), theta_mod="accumulate")
    assert torch.allclose(zero, plain.expand(3, T, D // 2), atol=1e-6), "f0 = 0 must mean no modulation"
    f0 = torch.full((T,), 180.0)
    acc = rope_angles(T, D, "std", theta=5000.0, f0=f0, theta_mod="accumulate").double()
    closed = np.arange(T)[:, None] * (5000.0 + 180.0) ** (-2.0 * np.arange(D // 2) / D)
    diff = np.angle(np.exp(1j * (acc.numpy() - closed)))  # compare on the circle
    assert np.abs(diff).max() < 1e-5, f"constant f0: accumulated phase != t*w(theta+f0), {np.abs(diff).max():.1e}"
    x = torch.randn(1, 2, T, D)
    unit = apply_rotary(x, rotation(rope_angles(T, D), radius=torch.ones(T)))
    assert torch.allclose(unit, apply_rotary(x, rotation(rope_angles(T, D))), atol=0), "radius 1 != plain RoPE"


def test_rope_mel_freqs_formula_per_band_and_aliasing():
    D = 32
    for name, (lo, hi) in BANDS.items():
        m = np.linspace(0.0, 2595.0 * np.log10(1.0 + hi / lo), D // 2)
        hz_above_lo = lo * (10.0 ** (m / 2595.0) - 1.0)
        for theta in [10000.0, 500.0]:
            ref = theta / 220.0 * hz_above_lo / 1000.0
            got = mel_freqs(D, theta, lo, hi).numpy()
            assert np.allclose(got, ref, rtol=1e-12, atol=0), f"band {name}, theta {theta}"
            assert got[0] == 0.0, "w_0 must be exactly 0 (one pair never rotates)"
        assert np.allclose(rotary_freqs(D, rope="mel", band=name).numpy(), mel_freqs(D, 10000.0, lo, hi).numpy())
    w = mel_freqs(D)  # default band, theta 1e4: the top frequency is 10000/220 * 4 = 181.8 rad/frame
    assert abs(w[-1].item() - 10000.0 / 220.0 * 4.0) < 1e-9 and w[-1] > math.pi
    # aliasing, shown rather than hidden: at integer positions w and w - 2*pi*n rotate identically
    t = torch.arange(50, dtype=torch.float64)
    aliased = w[-1] - 2 * math.pi * torch.floor(w[-1] / (2 * math.pi))
    assert torch.allclose(torch.polar(torch.ones(50, dtype=torch.float64), t * w[-1]),
                          torch.polar(torch.ones(50, dtype=torch.float64), t * aliased), atol=1e-9)


def test_rope_std_freqs_closed_form():
    for D in [2, 8, 64]:
        ref = np.array([10000.0 ** (-2.0 * i / D) for i in range(D // 2)])
        assert np.allclose(std_freqs(D).numpy(), ref, rtol=1e-12), D
    assert std_freqs(64)[-1] < 2e-4, "the exponent is 2i/D (not 2i/(D/2)): the slowest pair is ~theta^-1"


def test_rope_radius_relative_hz_and_logit_scaling():
    f0 = torch.tensor([[0.0, 100.0, 200.0, 0.0, 150.0, 0.0], [0.0] * 6])  # row 2: all unvoiced/padding
    r = rope_radius(f0)
    assert torch.allclose(r[0], torch.tensor([1.0, 100 / 150, 200 / 150, 1.0, 1.0, 1.0])), r[0]
    assert torch.equal(r[1], torch.ones(6)), "no voiced frame: every radius is 1"
    g = torch.Generator().manual_seed(3)
    T, D = 6, 8
    q, k = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    angles = rope_angles(T, D)
    unit = _rope_scores(q, k, rotation(angles))
    rr = rope_radius(f0[:1])[0]
    scaled = _rope_scores(q, k, rotation(angles, rr))
    assert torch.allclose(scaled, unit * rr[:, None] * rr[None, :], atol=1e-5), "q.k must scale by r_t*r_s"
    hz = _rope_scores(q, k, rotation(angles, rope_radius(f0[:1], mode="hz")[0]))
    voiced = f0[0] > 0
    ratio = (hz / unit)[0, 0][voiced][:, voiced]
    assert ratio.min() >= 1e4 - 1 and ratio.max() <= 4e4 + 1, "raw-Hz radius scales logits by f0_t*f0_s ~ 1e4"
    assert torch.equal(hz[0, 0][~voiced], torch.zeros(int((~voiced).sum()), T)), "raw Hz zeroes unvoiced q"
    assert torch.equal(hz[0, 0][:, ~voiced], torch.zeros(T, int((~voiced).sum()))), "raw Hz zeroes unvoiced k"


def test_rope_gradient_reaches_learnable_theta():
    for rope in ["std", "mel"]:
        for theta_mod in [None, "accumulate"]:
            log_theta = torch.tensor(math.log(10000.0), requires_grad=True)
            f0 = torch.full((2, 12), 120.0)
            angles = rope_angles(12, 8, rope, theta=log_theta.exp(), f0=f0, theta_mod=theta_mod)
            x = torch.randn(2, 1, 12, 8)
            apply_rotary(x, rotation(angles)).square().mul(torch.randn(2, 1, 12, 8)).sum().backward()
            assert log_theta.grad is not None and log_theta.grad.abs() > 0, (rope, theta_mod)


def test_rope_batched_f0_and_dtypes():
    g = torch.Generator().manual_seed(4)
    B, H, T, D = 3, 2, 25, 16
    f0 = torch.stack([torch.full((T,), 100.0), torch.full((T,), 220.0), torch.zeros(T)])
    angles = rope_angles(T, D, "mel", f0=f0, theta_mod="accumulate")
    rot = rotation(angles, rope_radius(f0))
    assert angles.shape == (B, T, D // 2) and rot.shape == (B, T, D // 2) and rot.dtype == torch.complex64
    x = torch.randn(B, H, T, D, generator=g)
    y = apply_rotary(x, rot)
    for b in range(B):  # each item's rotation is its own
        alone = apply_rotary(x[b:b + 1], rotation(rope_angles(T, D, "mel", f0=f0[b:b + 1], theta_mod="accumulate"),
                                                  rope_radius(f0[b:b + 1])))
        assert torch.allclose(y[b:b + 1], alone, atol=1e-6), b
    assert not torch.allclose(y[0], y[1], atol=1e-3), "different pitch tracks must rotate differently"
    y16 = apply_rotary(x.bfloat16(), rot)
    assert y16.dtype == torch.bfloat16 and torch.allclose(y16.float(), y, atol=0.05, rtol=0.02)


def test_rope_bad_input_errors():
    def raises(fn, words):
        try:
            fn()
        except (ValueError, TypeError) as e:
            assert words in str(e), f"message {str(e)!r} lacks {words!r}"
            return
        raise AssertionError(f"no error raised (expected one mentioning {words!r})")
    raises(lambda: std_freqs(7), "head_dim")
    raises(lambda: mel_freqs(8, fmin=4000.0, fmax=200.0), "fmin < fmax")
    raises(lambda: rope_angles(5, 8, f0=torch.tensor([100.0, -1, 0, 0, 0]), theta_mod="accumulate"), "negative")
    raises(lambda: rope_angles(6, 8, f0=torch.zeros(5), theta_mod="accumulate"), "lengths must match")
    raises(lambda: rope_angles(5, 8, theta_mod="accumulate"), "needs an f0")
    raises(lambda: rope_angles(5, 8, rope="cos"), "rope must be")
    raises(lambda: rope_radius(torch.zeros(5), mode="db"), "radius mode")
    raises(lambda: apply_rotary(torch.zeros(1, 1, 5, 8), rotation(rope_angles(4, 8))), "does not match")


# ----------------------------------------------------------------------------------------------------
# model.py

import torch.nn.functional as F

from model import ASRModel, ModelConfig

_MODEL_PITCH_SWITCHES = dict(rope="mel", radii=True, theta_mod="accumulate", pitch_bias=True)


def _model_tiny(seed=0, **switches):
    torch.manual_seed(seed)
    c = ModelConfig(d_model=32, n_heads=4, n_enc_layers=2, n_dec_layers=2, vocab_size=24, max_text_len=32,
                    dropout=0.0, **switches)
    return ASRModel(c).eval()


def _model_inputs(B=3, T=41, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, 80, T, generator=g)
    f0 = 90 + 200 * torch.rand(B, T, generator=g)
    f0[:, T // 4:T // 3] = 0  # unvoiced stretch
    tokens = torch.randint(4, 24, (B, L), generator=g)
    tokens[:, 0] = 1
    return mel, f0, tokens


def _model_manual_attention(attn, x, rot_angles=None, additive=None, causal=False, source=None):
    """softmax(Q K^T / sqrt(d) + mask) V written out with the module's weights, rotary via cos/sin in float64."""
    H = attn.n_heads
    x, src = x.double(), (x if source is None else source).double()
    q = x @ attn.query.weight.double().T + attn.query.bias.double()
    k = src @ attn.key.weight.double().T
    v = src @ attn.value.weight.double().T + attn.value.bias.double()
    q, k, v = (t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2) for t in (q, k, v))
    if rot_angles is not None:
        q = torch.from_numpy(_rope_reference(q.numpy(), rot_angles.double().numpy()))
        k = torch.from_numpy(_rope_reference(k.numpy(), rot_angles.double().numpy()))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        logits = logits + additive.double()
    if causal:
        Tq = logits.shape[-1]
        logits = logits.masked_fill(torch.ones(Tq, Tq, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(logits, -1) @ v
    y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return y @ attn.out.weight.double().T + attn.out.bias.double()


@torch.no_grad()
def test_model_sdpa_attention_matches_manual_softmax():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    attn = m.encoder[0].attn
    with torch.no_grad():
        attn.bias_gain.copy_(torch.tensor([0.5, 1.0, -2.0, 3.0]))
    g = torch.Generator().manual_seed(5)
    B, T = 2, 13
    x = torch.randn(B, T, 32, generator=g)
    angles = 2 * math.pi * torch.rand(B, T, 4, generator=g)
    bias = torch.rand(B, 1, T, T, generator=g)
    pad = torch.zeros(B, 1, 1, T)
    pad[1, ..., 9:] = float("-inf")
    from rope import rotation
    y = attn(x, rot=rotation(angles), mask=pad, pitch_bias=bias)[0]
    ref = _model_manual_attention(attn, x, angles[:, None], attn.bias_gain.view(1, -1, 1, 1) * bias + pad)
    assert torch.allclose(y.double(), ref, atol=1e-5), (y.double() - ref).abs().max()
    dec = m.decoder[0].self_attn  # causal self-attention with plain RoPE
    y = dec(x, rot=m.dec_rot[:T], causal=True)[0]
    i = np.arange(4)
    plain = torch.from_numpy(np.arange(T)[:, None] * 10000.0 ** (-2.0 * i / 8))
    ref = _model_manual_attention(dec, x, plain, causal=True)
    assert torch.allclose(y.double(), ref, atol=1e-5), (y.double() - ref).abs().max()


def _model_manual_encoder(m, mel):
    """The encoder as a plain RoPE transformer, written with functional ops and the model's weights."""
    x = F.gelu(F.conv1d(mel.double(), m.conv1.weight.double(), m.conv1.bias.double(), padding=1))
    x = F.gelu(F.conv1d(x, m.conv2.weight.double(), m.conv2.bias.double(), stride=2, padding=1)).transpose(1, 2)
    T, D = x.shape[1], m.head_dim
    angles = torch.from_numpy(np.arange(T)[:, None] * 10000.0 ** (-2.0 * np.arange(D // 2) / D))
    ln = lambda t, mod: F.layer_norm(t, t.shape[-1:], mod.weight.double(), mod.bias.double())
    for blk in m.encoder:
        x = x + _model_manual_attention(blk.attn, ln(x, blk.ln1), angles)
        h = F.gelu(ln(x, blk.ln2) @ blk.mlp[0].weight.double().T + blk.mlp[0].bias.double())
        x = x + h @ blk.mlp[2].weight.double().T + blk.mlp[2].bias.double()
    return ln(x, m.ln_enc)


@torch.no_grad()
def test_model_plain_encoder_ignores_pitch_and_each_switch_uses_it():
    mel, f0, _ = _model_inputs(B=2, T=33)
    other_f0 = f0.flip(-1) * 1.3
    m = _model_tiny()
    enc = m.encode(mel, f0)[0]
    assert torch.allclose(enc.double(), _model_manual_encoder(m, mel), atol=1e-5), "not a plain RoPE transformer"
    assert torch.equal(enc, m.encode(mel, other_f0)[0]), "with every pitch switch off, f0 must not matter"
    # std frequencies barely move with theta + f0 at theta 1e4 (w_i changes by ~(2i/D) f0/theta), so the
    # std case uses a small theta; mel frequencies are proportional to theta and large, so they move a lot
    for switch in [dict(rope="mel", theta_mod="accumulate"), dict(theta_mod="accumulate", theta=300.0), dict(radii=True),
                   dict(pitch_bias=True), dict(rope="mel", theta_mod="absolute"), dict(radii=True, radius_mode="hz")]:
        m = _model_tiny(**switch)
        diff = (m.encode(mel, f0)[0] - m.encode(mel, other_f0)[0]).abs().max()
        assert diff > 1e-5, f"{switch}: f0 had no effect ({diff:.1e})"  # 100x float32 noise at this scale


def test_model_decoder_never_sees_the_future():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    mel, f0, tokens = _model_inputs(L=12)
    base = m(mel, f0, tokens)
    for t in [0, 4, 10]:
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(4, 24, changed[:, t + 1:].shape)
        out = m(mel, f0, changed)
        assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5), f"position <= {t} saw a later token"
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3), "later positions should change"


def test_model_kv_cache_matches_full_forward():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    with torch.no_grad():  # a sharper random output layer makes greedy choices unambiguous
        m.embed.weight.mul_(20)
    mel, f0, tokens = _model_inputs(L=10)
    lengths = torch.tensor([41, 30, 17])
    with torch.no_grad():
        enc, mask = m.encode(mel, f0, lengths)
        full = m.decode(tokens, enc, mask)
        cache = []
        steps = torch.cat([m.decode(tokens[:, t:t + 1], enc, mask, cache=cache) for t in range(10)], dim=1)
        assert torch.allclose(steps, full, atol=1e-4), f"one token at a time: {(steps - full).abs().max():.1e}"
        cache = []
        chunks = torch.cat([m.decode(tokens[:, :6], enc, mask, cache=cache),
                            m.decode(tokens[:, 6:], enc, mask, cache=cache)], dim=1)
        assert torch.allclose(chunks, full, atol=1e-4), "a prefix then a chunk must match too"
        # greedy decoding by full recomputation, written here, against generate() with its cache
        seqs = torch.ones(3, 1, dtype=torch.long)
        for _ in range(15):
            seqs = torch.cat([seqs, m(mel, f0, seqs, lengths)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = []
    for row in seqs[:, 1:].tolist():
        expected.append(row[:row.index(2)] if 2 in row else row)
    assert m.generate(mel, f0, lengths, max_len=15) == expected
    assert m.generate(mel, f0, lengths, max_len=15, use_cache=False) == expected


def test_model_padding_changes_nothing_real():
    m = _model_tiny(**_MODEL_PITCH_SWITCHES)
    mel, f0, tokens = _model_inputs(B=3, T=41)
    lengths = [41, 28, 17]
    with torch.no_grad():
        enc, mask = m.encode(mel, f0, torch.tensor(lengths))
        logits = m.decode(tokens, enc, mask)
        for b, n in enumerate(lengths):
            enc1, _ = m.encode(mel[b:b + 1, :, :n], f0[b:b + 1, :n])
            ne = (n + 1) // 2
            assert torch.allclose(enc[b, :ne], enc1[0], atol=1e-4), f"item {b}: encoder states changed"
            assert torch.allclose(logits[b], m.decode(tokens[b:b + 1], enc1)[0], atol=1e-4), f"item {b}: logits"
        # padding frames filled with anything (here large noise) must not matter either
        noisy = mel.clone()
        noisy[1, :, 28:] = 100 * torch.randn(80, 13)
        assert torch.allclose(m(noisy, f0, tokens, torch.tensor(lengths)), logits, atol=1e-4)


def test_model_shapes_odd_lengths_and_bf16_autocast():
    for B, T in [(1, 1), (1, 7), (3, 40), (3, 51)]:
        m = _model_tiny(**_MODEL_PITCH_SWITCHES)
        mel, f0, tokens = _model_inputs(B=B, T=T, L=5)
        enc, _ = m.encode(mel, f0)
        assert enc.shape == (B, (T + 1) // 2, 32), enc.shape
        assert m(mel, f0, tokens).shape == (B, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(mel, f0, tokens, torch.tensor([51, 40, 33]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = m(mel, f0, tokens, torch.tensor([51, 40, 33]))
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max(), "bf16 result far from float32"


def test_model_default_config_and_learnable_theta():
    m = ASRModel(ModelConfig())
    c = m.config
    assert (c.d_model, c.n_heads, c.n_enc_layers, c.n_dec_layers) == (384, 6, 4, 4)
    per_block = 4 * 384 * 384 + 3 * 384 + 2 * 4 * 384 * 384 + 5 * 384 + 4 * 384  # attention, MLP, 2 LayerNorms
    expected = (80 * 384 * 3 + 384 + 384 * 384 * 3 + 384 + 4 * per_block + 2 * 384
                + 64 * 384 + 4 * (per_block + 4 * 384 * 384 + 3 * 384 + 2 * 384) + 2 * 384)
    assert m.num_params() == expected, (m.num_params(), expected)
    m = _model_tiny(rope="mel", learn_theta=True, theta_mod="accumulate")
    mel, f0, tokens = _model_inputs()
    m(mel, f0, tokens).square().mean().backward()
    assert m.log_theta.grad is not None and m.log_theta.grad.abs() > 0


def test_model_bad_input_errors():
    m = _model_tiny()
    mel, f0, tokens = _model_inputs()
    for args, words in [((mel, f0[:, :-1], tokens), "f0 must be"), ((mel, f0, tokens + 30), "tokens must be"),
                        ((mel[:, :40], f0, tokens), "n_mels"), ((mel, f0, tokens.float()), "tokens must be")]:
        try:
            m(*args)
        except ValueError as e:
            assert words in str(e), (words, str(e))
        else:
            raise AssertionError(f"no error for {words}")
    try:
        ASRModel(ModelConfig(d_model=30, n_heads=4))
    except ValueError as e:
        assert "heads" in str(e)
    else:
        raise AssertionError("d_model not divisible by heads accepted")


# ----------------------------------------------------------------------------------------------------
# eval.py

from eval import cer, edit_distance, normalize, wer


def test_eval_wer_cer_hand_computed():
    assert wer("this is a test", "this test") == 0.5  # two deletions / four words
    assert cer("this is a test", "this test") == 5 / 14  # "is a " deleted: five characters / fourteen
    assert wer(["a b", "c d e f"], ["a", "c d e f g"]) == 2 / 6, "corpus level: total edits / total words"
    assert wer("the cat sat", "the bat sat on") == 2 / 3  # one substitution, one insertion
    assert cer("kitten", "sitting") == 3 / 6  # the textbook Levenshtein example
    assert wer("naïve café", "naive café") == 1 / 2 and cer("naïve café", "naive café") == 1 / 10
    assert cer("日本語", "日本") == 1 / 3
    # empty strings as jiwer 4 treats them: no division by zero; with no reference words the rate is
    # the number of edits
    assert wer("", "") == 0.0 and cer("", "") == 0.0
    assert wer("", "a b c") == 3 and cer("", "ab c") == 4
    assert wer("a b", "") == 1.0 and cer("ab", "") == 1.0
    assert wer(["a b", ""], ["a b", "c d"]) == 1.0
    try:
        wer(["a"], ["a", "b"])
    except ValueError as e:
        assert "hypotheses" in str(e)
    else:
        raise AssertionError("mismatched list lengths accepted")


def _eval_levenshtein_recursive(a, b):
    """Edit distance by the textbook recursion with memoisation: an independent formulation."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_eval_edit_distance_matches_recursive_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc "), size=rng.integers(0, 12)))
        b = "".join(rng.choice(list("abc "), size=rng.integers(0, 12)))
        assert edit_distance(a, b) == _eval_levenshtein_recursive(a, b), (a, b)
        assert edit_distance(a.split(), b.split()) == _eval_levenshtein_recursive(tuple(a.split()), tuple(b.split()))


def test_eval_normalize():
    assert normalize("Hello,  World!  It's\tme.") == "hello world its me"
    assert normalize("  «Ça va?» — oui…  ") == "ça va oui"
    assert normalize("") == ""
    assert normalize("state-of-the-art 3.5") == "stateoftheart 35", "punctuation is deleted, not spaced"


# ----------------------------------------------------------------------------------------------------
# train.py (end to end on synthetic speech, tiny settings)

import contextlib
import io
import json
import os
import tempfile

_TRAIN_TINY = ["--data", "synth", "--synth_train", "24", "--synth_dev", "6", "--synth_test", "6",
               "--d_model", "32", "--n_heads", "2", "--n_enc_layers", "1", "--n_dec_layers", "1",
               "--dropout", "0.1", "--batch_size", "4", "--warmup", "2", "--lr", "3e-3", "--log_interval", "1",
               "--eval_utts", "6", "--device", "cpu"]


def _train_run(argv):
    """Run train.main in-process -> (exit message or None, captured stdout+stderr)."""
    import train
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            train.main(argv)
        except SystemExit as e:
            return str(e.code), buf.getvalue()
    return None, buf.getvalue()


def _train_losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_train_resume_equals_uninterrupted_and_eval_runs():
    import train
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        common = _TRAIN_TINY + ["--steps", "8", "--eval_interval", "4", "--rope", "mel", "--radii",
                                "--theta_mod", "--pitch_bias", "--seed", "3"]
        err, out = _train_run(common + ["--out_dir", a])
        assert err is None, out
        # the same run, "Ctrl-C" during step 5 (through the real handler): it finishes the step, saves, exits
        real_lr_at = train.lr_at
        train.lr_at = lambda step, cfg: (train.request_stop(2, None) if step == 5 and not train.STOP else None,
                                         real_lr_at(step, cfg))[1]
        try:
            err, out = _train_run(common + ["--out_dir", b])
        finally:
            train.lr_at = real_lr_at
        assert err and "interrupted at step 6" in err, (err, out)
        assert torch.load(os.path.join(b, "last.pt"), weights_only=False)["step"] == 6
        err, out = _train_run(["--resume", "--out_dir", b])  # settings come from the checkpoint
        assert err is None, out
        la, lb = _train_losses(a), _train_losses(b)
        assert sorted(la) == list(range(1, 9)) and sorted(lb) == list(range(1, 9)), (la, lb)
        for step in range(1, 9):
            assert abs(la[step] - lb[step]) < 1e-4, f"step {step}: {la[step]} uninterrupted vs {lb[step]} resumed"
        config = json.load(open(os.path.join(b, "config.json")))
        assert config["resumed"][0]["step"] == 6 and "--resume" in config["resumed"][0]["command"]
        import eval as evaluation
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            evaluation.main(["--ckpt", os.path.join(b, "best.pt"), "--split", "test", "--device", "cpu"])
        summary = json.load(open(os.path.join(b, "eval_test_best.json")))
        assert summary["utterances"] == 6 and 0 <= summary["cer"] and "WER" in buf.getvalue()
        lines = open(os.path.join(b, "eval_test_best.tsv")).read().splitlines()
        assert len(lines) == 7 and lines[0].startswith("reference\thypothesis")
        table = evaluation.compare([a, b])
        assert table.count("\n") == 2, "two runs of one configuration pool into one row"
        assert "mel" in table and "+-" in table


def test_train_bad_input_gives_one_line_errors_and_overwrites_nothing():
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        err, out = _train_run(_TRAIN_TINY + ["--steps", "2", "--eval_interval", "2", "--out_dir", run])
        assert err is None, out
        last = os.path.join(run, "last.pt")
        before = open(last, "rb").read()
        cases = [
            (["--steps", "2", "--out_dir", run], "already holds a run"),
            (["--resume", "--out_dir", run, "--d_model", "64", "--n_heads", "2"], "different model config"),
            (["--resume", "--out_dir", os.path.join(tmp, "nothing")], "no checkpoint"),
            (["--out_dir", os.path.join(last, "sub")], "cannot write to out_dir"),
            (["--stepz", "3"], "unrecognized arguments"),
            (["--steps", "three"], "invalid int value"),
            (["--rope", "cosine"], "invalid choice"),
        ]
        for argv, words in cases:
            err, out = _train_run(_TRAIN_TINY + argv)
            text = (err or "") + out
            assert words in text, f"{argv}: expected {words!r} in {text!r}"
            assert "Traceback" not in text and len([l for l in text.splitlines() if "error" in l]) == 1, text
        with open(os.path.join(tmp, "corrupt.pt"), "wb") as f:
            f.write(before[:len(before) // 3])
        import eval as evaluation
        for path, words in [(os.path.join(tmp, "corrupt.pt"), "not a readable checkpoint"),
                            (os.path.join(tmp, "missing.pt"), "no checkpoint")]:
            try:
                evaluation.load_checkpoint(path)
            except SystemExit as e:
                assert words in str(e) and "\n" not in str(e), str(e)
            else:
                raise AssertionError(f"{path} accepted")
        assert open(last, "rb").read() == before, "a refused command overwrote last.pt"


# ----------------------------------------------------------------------------------------------------
# harness

def main(argv):
    pattern = argv[1] if len(argv) > 1 else ""
    tests = [(name, fn) for name, fn in globals().items()
             if name.startswith("test_") and callable(fn) and pattern in name]
    passed = failed = 0
    t_start = time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"ok   {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # a failing test must not stop the others
            failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"FAIL {name}: {type(e).__name__}: {e} (line {where.lineno})", flush=True)
    print(f"total {time.time() - t_start:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
