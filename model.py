"""A compact Whisper-like encoder-decoder whose encoder self-attention can hear pitch.

    mel (B, n_mels, T) --conv stem, stride 2--> (B, T/2, d) --pre-LN blocks with pitch-aware RoPE
    [+ pitch bias]--> encoder states --decoder: causal self-attention with plain RoPE, cross-attention,
    tied output embedding--> logits (B, L, vocab)

f0 (B, T) arrives at the mel frame rate (100 Hz) and is pooled to the encoder's 50 Hz. The pitch switches
(config.rope, radii, theta_mod, pitch_bias) only touch the encoder's self-attention; with all of them
off, the encoder is a plain RoPE transformer and f0 has no effect.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pitch import pool_f0
from rope import apply_rotary, rope_angles, rope_radius, rotation


@dataclass
class ModelConfig:
    n_mels: int = 80
    d_model: int = 384
    n_heads: int = 6
    n_enc_layers: int = 4
    n_dec_layers: int = 4
    vocab_size: int = 64        # set from the tokenizer
    max_text_len: int = 512     # tokens, BOS and EOS included
    dropout: float = 0.1
    rope: str = "std"           # encoder rotary frequencies: 'std' or 'mel'
    band: str = "200-4000"      # mel band, a key of rope.BANDS
    theta: float = 10000.0
    learn_theta: bool = False   # learn log(theta), as the seed learned theta
    radii: bool = False         # rotation radius from f0 (torch.polar)
    radius_mode: str = "relative"  # 'relative' (f0 / median voiced f0) or the seed's 'hz'
    theta_mod: str | None = None   # None, 'accumulate' (relative) or the seed's 'absolute'
    pitch_bias: bool = False    # add exp(-|z_t - z_s|) of z-scored f0 to encoder attention logits
    ctc: bool = False           # a CTC head on the encoder, a training aid (train.py --ctc_weight)
    bos_id: int = 1
    eos_id: int = 2


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention, with optional rotary q/k."""

    def __init__(self, d_model, n_heads, dropout, bias_gain=False):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model, bias=False)  # a key bias only shifts each row's logits
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        # per-head gain of the pitch bias, learned, starting at 1
        self.bias_gain = nn.Parameter(torch.ones(n_heads)) if bias_gain else None

    def split(self, x):  # (B, T, d) -> (B, H, T, d/H)
        return x.view(*x.shape[:2], self.n_heads, -1).transpose(1, 2)

    def kv(self, source):
        return self.split(self.key(source)), self.split(self.value(source))

    def forward(self, x, kv=None, rot=None, mask=None, pitch_bias=None, causal=False, past=None):
        """x (B, Tq, d). Self-attention unless kv = (k, v) is given (cross-attention, never rotated).
        rot rotates q and the new k; past = (k, v) of earlier positions, already rotated, goes first.
        mask: additive float mask broadcastable to (B, H, Tq, Tk). Returns (output, (k, v))."""
        q = self.split(self.query(x))
        if kv is None:
            k, v = self.kv(x)
            if rot is not None:
                k = apply_rotary(k, rot)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        else:
            k, v = kv
        if rot is not None:
            q = apply_rotary(q, rot)
        if pitch_bias is not None:  # (B, 1, T, T) * (1, H, 1, 1)
            mask = self.bias_gain.view(1, -1, 1, 1) * pitch_bias + (0.0 if mask is None else mask)
        if mask is not None:
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2)), (k, v)


class MLP(nn.Sequential):
    def __init__(self, d_model, dropout):
        super().__init__(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                         nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attn = Attention(c.d_model, c.n_heads, c.dropout, bias_gain=c.pitch_bias)
        self.mlp, self.drop = MLP(c.d_model, c.dropout), nn.Dropout(c.dropout)

    def forward(self, x, rot, mask, pitch_bias):
        x = x + self.drop(self.attn(self.ln1(x), rot=rot, mask=mask, pitch_bias=pitch_bias)[0])
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(c.d_model) for _ in range(3))
        self.self_attn = Attention(c.d_model, c.n_heads, c.dropout)
        self.cross_attn = Attention(c.d_model, c.n_heads, c.dropout)
        self.mlp, self.drop = MLP(c.d_model, c.dropout), nn.Dropout(c.dropout)

    def forward(self, x, rot, self_mask, causal, past, cross_kv, cross_mask):
        """Returns the new hidden states and this layer's self-attention (k, v), past included."""
        y, kv = self.self_attn(self.ln1(x), rot=rot, mask=self_mask, causal=causal, past=past)
        x = x + self.drop(y)
        x = x + self.drop(self.cross_attn(self.ln2(x), kv=cross_kv, mask=cross_mask)[0])
        return x + self.mlp(self.ln3(x)), kv


def padding_mask(lengths, T):
    """(B,) lengths -> (B, T) bool, True on real frames."""
    return torch.arange(T, device=lengths.device) < lengths[:, None]


def pitch_bias_matrix(f0, real):
    """B_ts = exp(-|z_t - z_s|), z = (f0 - mean) / (std + 1e-8) over the real frames, (B, 1, T, T).

    Mean and (population) std include unvoiced real frames (f0 = 0), exclude padding."""
    n = real.sum(-1, keepdim=True).clamp(min=1)
    mean = (f0 * real).sum(-1, keepdim=True) / n
    std = (((f0 - mean) * real) ** 2).sum(-1, keepdim=True).div(n).sqrt()
    z = (f0 - mean) / (std + 1e-8)
    return torch.exp(-(z[:, :, None] - z[:, None, :]).abs()).unsqueeze(1)


class ASRModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        if c.d_model % c.n_heads or (c.d_model // c.n_heads) % 2:
            raise ValueError(f"d_model {c.d_model} must split into {c.n_heads} heads of even size")
        self.head_dim = c.d_model // c.n_heads
        self.conv1 = nn.Conv1d(c.n_mels, c.d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, 3, stride=2, padding=1)
        self.encoder = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_enc_layers))
        self.ln_enc = nn.LayerNorm(c.d_model)
        self.ctc_head = nn.Linear(c.d_model, c.vocab_size) if c.ctc else None
        self.log_theta = nn.Parameter(torch.tensor(math.log(c.theta))) if c.learn_theta else None
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_dec_layers))
        self.ln_dec = nn.LayerNorm(c.d_model)
        self.register_buffer("dec_rot", rotation(rope_angles(c.max_text_len, self.head_dim)), persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # scaled residual projections, as in GPT-2
            if name.endswith(("out.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (c.n_enc_layers + c.n_dec_layers)))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def _check(self, mel, f0, mel_lengths):
        c = self.config
        if mel.dim() != 3 or mel.shape[1] != c.n_mels:
            raise ValueError(f"mel must be (B, n_mels={c.n_mels}, T), got {tuple(mel.shape)}")
        if f0.shape != (mel.shape[0], mel.shape[2]):
            raise ValueError(f"f0 must be (B, T) = {(mel.shape[0], mel.shape[2])} to match mel, got {tuple(f0.shape)}")
        if mel_lengths is not None and (mel_lengths.shape != (mel.shape[0],) or mel_lengths.min() < 1
                                        or mel_lengths.max() > mel.shape[2]):
            raise ValueError(f"mel_lengths must be (B,) with values in 1..T={mel.shape[2]}")

    def encoder_rotation(self, f0):
        """Complex rotation (Te, hd/2) or (B, Te, hd/2) for the encoder from f0 at the encoder rate."""
        c = self.config
        theta = self.log_theta.exp() if self.log_theta is not None else c.theta
        angles = rope_angles(f0.shape[-1], self.head_dim, c.rope, theta, c.band, f0=f0, theta_mod=c.theta_mod)
        return rotation(angles, rope_radius(f0, c.radius_mode) if c.radii else None)

    def encode(self, mel, f0, mel_lengths=None):
        """mel (B, n_mels, T), f0 (B, T) Hz -> states (B, Te, d) and key mask (B, Te) bool or None."""
        self._check(mel, f0, mel_lengths)
        T = mel.shape[2]
        real = None if mel_lengths is None or bool((mel_lengths == T).all()) else padding_mask(mel_lengths, T)
        # zero the padding before each conv and the pooling, so real frames see what they would unpadded
        x, f0 = (mel, f0) if real is None else (mel * real[:, None], f0 * real)
        x = F.gelu(self.conv1(x))
        x = x if real is None else x * real[:, None]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, Te, d), Te = ceil(T / 2)
        Te = x.shape[1]
        f0 = pool_f0(f0.float())  # (B, Te)
        enc_real = None if real is None else padding_mask((mel_lengths + 1) // 2, Te)
        mask = None if enc_real is None else torch.zeros(enc_real.shape, device=x.device).masked_fill(
            ~enc_real, float("-inf"))[:, None, None, :]  # (B, 1, 1, Te)
        bias = None
        if self.config.pitch_bias:
            bias = pitch_bias_matrix(f0, torch.ones_like(f0, dtype=torch.bool) if enc_real is None else enc_real)
        rot = self.encoder_rotation(f0)
        for block in self.encoder:
            x = block(x, rot, mask, bias)
        return self.ln_enc(x), mask

    def decode(self, tokens, enc, enc_mask=None, cache=None, cross_kv=None):
        """tokens (B, L) -> logits (B, L, vocab). cache: list of per-layer (k, v) of earlier positions,
        updated in place (generation); cross_kv: per-layer cross-attention (k, v), computed once."""
        c = self.config
        if tokens.dtype != torch.long or tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise ValueError(f"tokens must be int64 ids in 0..{c.vocab_size - 1}")
        L = tokens.shape[1]
        past = cache[0][0].shape[2] if cache else 0
        if past + L > c.max_text_len:
            raise ValueError(f"{past + L} tokens exceed max_text_len={c.max_text_len}")
        self_mask = None
        if past and L > 1:  # query i sits at position past + i and sees keys 0..past + i
            self_mask = torch.zeros(L, past + L, device=tokens.device).masked_fill(
                torch.ones(L, past + L, dtype=torch.bool, device=tokens.device).triu(past + 1), float("-inf"))
        rot = self.dec_rot[past:past + L]
        x = self.embed(tokens)
        new_cache = []
        for i, block in enumerate(self.decoder):
            kv_cross = cross_kv[i] if cross_kv is not None else block.cross_attn.kv(enc)
            x, kv = block(x, rot, self_mask, past == 0 and L > 1, cache[i] if cache else None, kv_cross, enc_mask)
            new_cache.append(kv)
        if cache is not None:
            cache[:] = new_cache
        return self.ln_dec(x) @ self.embed.weight.T

    def ctc_log_probs(self, enc):
        """Encoder states (B, Te, d) -> per-frame log-probabilities (Te, B, vocab), the layout of
        F.ctc_loss; the padding id doubles as CTC's blank."""
        return self.ctc_head(enc).float().log_softmax(-1).transpose(0, 1)

    def forward(self, mel, f0, tokens, mel_lengths=None):
        return self.decode(tokens, *self.encode(mel, f0, mel_lengths))

    @torch.no_grad()
    def generate(self, mel, f0, mel_lengths=None, max_len=None, use_cache=True):
        """Greedy autoregressive decoding, batched; each sequence stops at EOS.

        Returns token ids without BOS and EOS. use_cache=False recomputes the whole prefix at every step
        (the same result, slower; kept to measure what the cache saves)."""
        c = self.config
        max_len = min(max_len or c.max_text_len - 1, c.max_text_len - 1)
        enc, enc_mask = self.encode(mel, f0, mel_lengths)
        cross_kv = [block.cross_attn.kv(enc) for block in self.decoder]
        tokens = torch.full((enc.shape[0], 1), c.bos_id, dtype=torch.long, device=enc.device)
        done = torch.zeros(enc.shape[0], dtype=torch.bool, device=enc.device)
        cache = [] if use_cache else None
        for _ in range(max_len):
            step_in = tokens[:, -1:] if use_cache else tokens
            logits = self.decode(step_in, enc, enc_mask, cache=cache, cross_kv=cross_kv)[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, c.eos_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == c.eos_id
            if bool(done.all()):
                break
        out = []
        for seq in tokens[:, 1:].tolist():
            out.append(seq[:seq.index(c.eos_id)] if c.eos_id in seq else seq)
        return out
