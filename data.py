"""Data: FLEURS as raw files, built-in synthetic speech, log-mel features, a character tokenizer, batches.

    python data.py --lang en_us [--root data] [--base_url URL]   # download, prepare, summarise FLEURS
    python data.py --data synth                                  # summarise the built-in synthetic speech

FLEURS is served as {base}/data/{lang}/{split}.tsv and {base}/data/{lang}/audio/{split}.tar.gz. On disk:
{root}/{lang}/{split}.tsv, the WAVs in {root}/{lang}/audio/{split}/, and the prepared cache that training
reads: {split}.pcm (16 kHz int16 samples, utterances back to back) and {split}.json (the index).
"""
import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from http.client import HTTPException

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import pitch

SR = 16000   # Hz, all audio
HOP = 160    # 10 ms frames: a wave of T samples has T // HOP + 1 centred frames
N_FFT = 400  # 25 ms analysis window, as Whisper
N_MELS = 80
FLEURS_URL = "https://huggingface.co/datasets/google/fleurs/resolve/main"
CACHE_VERSION = 1  # bump when the prepared format changes: old caches are rebuilt
DONE = ".complete"  # marker inside an extracted audio folder; written last, so its presence means complete


class DataError(RuntimeError):
    """A data problem the user can fix; the message names the file or argument and says how."""


# ----------------------------------------------------------------------------------------------------
# download

def download_fleurs(lang="en_us", root="data", splits=("train", "dev", "test"), base_url=None, retries=3, backoff=1.0):
    """Fetch FLEURS raw files for `lang` into {root}/{lang} and unpack the audio; return that folder.

    Base URL: the argument, else $FLEURS_BASE_URL, else FLEURS_URL. Done work is skipped without network.
    A network error is retried `retries` times, after backoff * 2^attempt seconds, resuming where it broke.
    """
    base = (base_url or os.environ.get("FLEURS_BASE_URL") or FLEURS_URL).rstrip("/")
    folder = os.path.join(root, lang)
    try:  # fail now, clearly, rather than half-way through a download
        os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise DataError(f"cannot write to the data root {root!r} ({e.strerror}); pass a writable --root") from None
    for split in splits:
        tsv, wavs = os.path.join(folder, f"{split}.tsv"), os.path.join(folder, "audio", split)
        if not os.path.exists(tsv):
            _fetch(f"{base}/data/{lang}/{split}.tsv", tsv, lang, retries, backoff)
        if os.path.exists(os.path.join(wavs, DONE)):
            continue
        if not os.path.exists(wavs + ".tar.gz"):
            _fetch(f"{base}/data/{lang}/audio/{split}.tar.gz", wavs + ".tar.gz", lang, retries, backoff)
        _extract(wavs + ".tar.gz", wavs)
        os.remove(wavs + ".tar.gz")  # later runs read the extracted WAVs (and then only the cache)
    return folder


def _fetch(url, dest, lang, retries, backoff):
    """Download url to dest via dest.part: resume it with an HTTP Range request, retry with backoff, rename."""
    part = dest + ".part"
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                if r.status != 206:
                    have = 0  # the server ignored Range and sends the whole file: start over
                size = r.headers.get("Content-Length")
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=have + int(size) if size else None, initial=have, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=os.path.basename(dest), disable=None) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            if size and os.path.getsize(part) != have + int(size):  # read() just ends on a cut connection
                raise ConnectionError(f"connection closed after {os.path.getsize(part) - have} of {size} bytes")
            os.replace(part, dest)
            return
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise DataError(f"{url} not found (HTTP 404): is the language code {lang!r} right? "
                                "FLEURS codes look like en_us, fr_fr, cmn_hans_cn") from None
            if e.code == 416:  # the partial file does not fit what the server has now
                os.remove(part)
            elif e.code < 500 and e.code != 429:
                raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
            error = e
        except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as e:
            error = e
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise DataError(f"could not download {url} after {retries + 1} tries ({error}). Without network, train on "
                    "the built-in synthetic speech with `--data synth`, or point --base_url (or FLEURS_BASE_URL) "
                    "at a mirror")


def _extract(archive, out):
    """Unpack the files of a tar.gz flat into `out` (members are matched by base name), all or nothing."""
    tmp = out + ".partial"  # never trusted: only a finished extraction is renamed to `out`
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
                    raise DataError(f"{archive}: refusing member {m.name!r} (absolute path, '..', link or device)")
                if m.isfile():
                    with tar.extractfile(m) as src, open(os.path.join(tmp, os.path.basename(m.name)), "wb") as dst:
                        shutil.copyfileobj(src, dst)
            while tar.fileobj.read(1 << 20):  # read to the end so gzip checks its CRC: a corrupt tail is caught too
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        shutil.rmtree(tmp)
        os.remove(archive)
        raise DataError(f"{archive} is corrupt ({e}); deleted it: run again to download it afresh") from None
    open(os.path.join(tmp, DONE), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------------
# audio files and the prepared cache

def resample(x, sr_in, sr_out, zeros=16, rolloff=0.945):
    """Windowed-sinc resampling along the last dim, as one strided conv1d over the polyphase kernels.

    y[n] = sum_k x[k] h(n sr_in/sr_out - k),  h(t) = 2 fc sinc(2 fc t) hann(t / width), |t| < width,
    fc = rolloff min(sr_in, sr_out) / (2 sr_in) cycles per input sample, width = zeros / (2 fc) samples.
    Output n = j + up*q uses phase j's kernel at input offset q*down (up/down = sr_out/sr_in, reduced).
    """
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    fc = rolloff * min(up, down) / (2 * down)
    width = math.ceil(zeros / (2 * fc))
    t = torch.arange(up, dtype=torch.float64)[:, None] * down / up + width - torch.arange(down + 2 * width + 1)
    h = 2 * fc * torch.sinc(2 * fc * t) * (0.5 + 0.5 * torch.cos(math.pi * t / width)) * (t.abs() < width)
    T = x.shape[-1]
    xp = torch.nn.functional.pad(x.reshape(-1, 1, T), (width, width + down))
    y = torch.nn.functional.conv1d(xp, h[:, None].to(x.dtype), stride=down)  # (B, up, ceil(T / down))
    return y.transpose(1, 2).reshape(*x.shape[:-1], -1)[..., :math.ceil(T * up / down)]


def load_audio(path):
    """An audio file as float32 mono at 16 kHz (numpy): channels averaged, other sample rates resampled."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    return resample(torch.from_numpy(x), sr, SR).numpy() if sr != SR else x


@dataclass
class Corpus:
    """Utterances stored back to back in one array (memory-mapped int16 for FLEURS, float32 for synth)."""
    audio: np.ndarray
    offsets: np.ndarray  # (N,) int64, start of each utterance in `audio`
    lengths: np.ndarray  # (N,) int64, samples
    texts: list
    ids: list
    genders: list
    f0: list = None      # known f0 tracks (synth), float32 tensors of T // HOP + 1 frames; None for FLEURS
    dropped: Counter = field(default_factory=Counter)  # reason -> count of utterances left out
    examples: list = field(default_factory=list)       # the first few of those, in words

    def __len__(self):
        return len(self.texts)

    def wave(self, i):
        x = torch.from_numpy(self.audio[self.offsets[i]:self.offsets[i] + self.lengths[i]].astype(np.float32))
        return x / 32768 if self.audio.dtype == np.int16 else x

    def subset(self, keep):
        keep = np.asarray(keep, dtype=np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]
        return Corpus(self.audio, self.offsets[keep], self.lengths[keep], pick(self.texts), pick(self.ids),
                      pick(self.genders), pick(self.f0), self.dropped.copy(), list(self.examples))


def _stamp(path):  # what invalidates a cache: the source table changed (or the cache format did)
    st = os.stat(path)
    return [CACHE_VERSION, st.st_size, st.st_mtime_ns]


def _prepare(folder, split):
    """Decode a split's WAVs into {split}.pcm + {split}.json; bad rows are skipped and counted, never fatal."""
    tsv, wavs, pcm = (os.path.join(folder, f) for f in (f"{split}.tsv", f"audio/{split}", f"{split}.pcm"))
    index = dict(stamp=_stamp(tsv), ids=[], texts=[], genders=[], lengths=[], dropped=Counter(), examples=[])

    def drop(reason, where):
        index["dropped"][reason] += 1
        if len(index["examples"]) < 5:
            index["examples"].append(f"{where}: {reason}")

    with open(tsv, encoding="utf-8", errors="replace") as f, open(pcm + ".tmp", "wb") as out:
        for line, text in enumerate(tqdm(f.readlines(), desc=f"prepare {split}", disable=None), 1):
            row, where = text.rstrip("\n").split("\t"), f"{tsv} line {line}"  # no quoting in these files
            if len(row) != 7 or not row[3].strip():  # id, file, raw text, normalised text, spelling, samples, gender
                drop("malformed row", f"{where} ({len(row)} columns, 7 expected, or no transcription)")
                continue
            path = os.path.join(wavs, os.path.basename(row[1]))
            if not os.path.exists(path):
                drop("missing audio", f"{where} ({row[1]})")
                continue
            try:
                x = load_audio(path)
            except (RuntimeError, ValueError, OSError) as e:  # soundfile raises RuntimeErrors
                drop("unreadable audio", f"{where} ({row[1]}: {e})")
                continue
            if x.size == 0 or not np.isfinite(x).all():
                drop("empty audio" if x.size == 0 else "NaN samples", f"{where} ({row[1]})")
                continue
            out.write(np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16).tobytes())
            index["ids"].append(os.path.splitext(os.path.basename(row[1]))[0])
            index["texts"].append(" ".join(row[3].split()))
            index["genders"].append(row[6])
            index["lengths"].append(len(x))
    if not index["lengths"]:
        raise DataError(f"{tsv}: no usable utterances ({dict(index['dropped'])}; e.g. {index['examples']})")
    os.replace(pcm + ".tmp", pcm)
    with open(pcm[:-4] + ".json.tmp", "w") as f:
        json.dump(index, f)
    os.replace(pcm[:-4] + ".json.tmp", pcm[:-4] + ".json")  # the index comes last: it vouches for the .pcm


def _load_prepared(folder, split):
    """The cached split as a Corpus, or None if there is no cache or its source changed."""
    tsv, pcm, index = (os.path.join(folder, f"{split}.{ext}") for ext in ("tsv", "pcm", "json"))
    if not all(map(os.path.exists, (tsv, pcm, index))):
        return None
    with open(index) as f:
        meta = json.load(f)
    if meta["stamp"] != _stamp(tsv):
        return None
    lengths = np.array(meta["lengths"], dtype=np.int64)
    return Corpus(np.memmap(pcm, dtype=np.int16, mode="r"),
                  np.cumsum(lengths) - lengths, lengths, meta["texts"], meta["ids"], meta["genders"],
                  dropped=Counter(meta["dropped"]), examples=meta["examples"])


def load_split(source, split, root="data", lang="en_us", base_url=None, max_seconds=30.0, n=None):
    """One split as a Corpus. 'fleurs': downloaded and prepared once, then read from the cache in seconds;
    'synth': the built-in synthetic speech (each split its own seed). Utterances over max_seconds (or under
    0.1 s) are dropped and counted; n keeps the first n."""
    if split not in SYNTH_SEEDS:
        raise DataError(f"unknown split {split!r}: use train, dev or test")
    if source == "synth":
        corpus, name = synth_corpus(n or SYNTH_SIZES[split], SYNTH_SEEDS[split]), f"synth {split}"
    elif source == "fleurs":
        folder, name = os.path.join(root, lang), f"fleurs {lang} {split}"
        corpus = _load_prepared(folder, split)
        if corpus is None:
            download_fleurs(lang, root, (split,), base_url)
            _prepare(folder, split)
            corpus = _load_prepared(folder, split)
    else:
        raise DataError(f"unknown data source {source!r}: use 'fleurs' or 'synth'")
    drop = {f"longer than {max_seconds:g} s": corpus.lengths > max_seconds * SR,
            "shorter than 0.1 s": corpus.lengths < SR // 10}  # too short for one f0 analysis window
    for reason, mask in drop.items():
        if mask.any():
            corpus.dropped[reason] += int(mask.sum())
    corpus = corpus.subset(np.flatnonzero(~np.logical_or(*drop.values())))
    if n:
        corpus = corpus.subset(np.arange(min(n, len(corpus))))
    if corpus.dropped:
        print(f"{name}: {len(corpus)} utterances kept, dropped " + ", ".join(f"{v} {k}" for k, v in
              corpus.dropped.items()) + "".join(f"\n  e.g. {e}" for e in corpus.examples))
    return corpus


def describe(corpus):
    """A few lines about a corpus: size, hours, genders, characters and words."""
    words = Counter(w for t in corpus.texts for w in t.split())
    chars = "".join(sorted(set("".join(corpus.texts))))
    return (f"  {len(corpus)} utterances, {corpus.lengths.sum() / SR / 3600:.2f} h, "
            f"{np.median(corpus.lengths) / SR:.1f} s median, {corpus.lengths.max() / SR:.1f} s longest\n"
            f"  by gender: {dict(Counter(corpus.genders).most_common())}\n"
            f"  {len(chars)} characters: {chars!r}\n"
            f"  {sum(words.values())} words, {len(words)} distinct")


# ----------------------------------------------------------------------------------------------------
# built-in synthetic speech

SYNTH_SEEDS = {"train": 0, "dev": 1, "test": 2}  # disjoint: each utterance is seeded by (split seed, index)
SYNTH_SIZES = {"train": 2000, "dev": 200, "test": 200}
SYNTH_WORDS = ("bad bed big bird blue boat bone bread desk dog drum farm fish five fire frog gift gold hand hat home "
               "hot kind lake lamp land map milk mind mud nest note pink road rose salt sand silk song stone sun ten "
               "tide time vase zero zone").split()  # no doubled letters: every letter is one countable segment
# letter -> states (ms, voiced formants Hz, noise band Hz, level). Vowels: Peterson & Barney's formants;
# voiced consonants: weaker formant patterns; fricatives: noise bands; stops: a closure, then a burst.
PHONES = {
    "a": [(80, (730, 1090, 2440), None, 1.0)], "e": [(80, (530, 1840, 2480), None, 1.0)],
    "i": [(80, (270, 2290, 3010), None, 1.0)], "o": [(80, (570, 840, 2410), None, 1.0)],
    "u": [(80, (300, 870, 2240), None, 1.0)],
    "m": [(70, (250, 1100), None, 0.4)], "n": [(70, (250, 1700), None, 0.4)],
    "l": [(70, (360, 1300, 2700), None, 0.6)], "r": [(70, (460, 1200, 1600), None, 0.6)],
    "v": [(70, (250,), (1000, 7000), 0.3)], "z": [(70, (250,), (4000, 7500), 0.4)],
    "f": [(70, (), (1000, 7500), 0.2)], "s": [(70, (), (4000, 7500), 0.4)], "h": [(60, (), (500, 3000), 0.2)],
    "p": [(40, (), None, 0.0), (30, (), (300, 1500), 0.5)],
    "t": [(40, (), None, 0.0), (30, (), (3000, 6000), 0.5)],
    "k": [(40, (), None, 0.0), (30, (), (1500, 3000), 0.5)],
    "b": [(40, (180,), None, 0.3), (30, (180,), (300, 1500), 0.3)],  # voiced stops: a voice bar, then the burst
    "d": [(40, (180,), None, 0.3), (30, (180,), (3000, 6000), 0.3)],
    "g": [(40, (180,), None, 0.3), (30, (180,), (1500, 3000), 0.3)],
}
SYNTH_FFT, SYNTH_HOP = 512, 128  # the STFT in which sources are shaped
SYNTH_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(SYNTH_FFT) / SYNTH_FFT)  # periodic Hann
NOISE_GAIN = 0.3  # white noise spreads over every bin, harmonics over few: this balances fricatives against vowels
# each state as one row: ms, F1, F2, F3 (0 = none), noise band lo, hi (0 = none), level
STATE_ROWS = {c: np.array([(ms, *F, *(0,) * (3 - len(F)), *(band or (0, 0)), level) for ms, F, band, level in states])
              for c, states in PHONES.items()}
PAUSE = np.array([(100, 0, 0, 0, 0, 0, 0.0)])  # between words


def _synth_utterance(rng):
    """One utterance: (wave, f0 track at HOP frames, text, gender).

    A band-limited sawtooth at f0(t) and white noise are shaped frame by frame in the STFT domain by the
    current state's voiced and noise envelopes, smoothed over neighbouring frames (coarticulation):
        log f0(t) = log f0_speaker - declination t / duration + sum of accents (Gaussian bumps)
        Hv(f) = level (sum_j 0.6^j exp(-(f - F_j)^2 / 2 B_j^2) + 0.005),  B_j = 50 Hz + 0.08 F_j
        Hn(f) = NOISE_GAIN level, between the band's edges (logistic, 150 Hz wide)
    """
    words = list(rng.choice(SYNTH_WORDS, rng.integers(2, 5)))
    f0_speaker = rng.uniform(100, 240)
    female = f0_speaker > 160
    parts = [PAUSE] + [r for w in words for r in (*(STATE_ROWS[c] for c in w), PAUSE)]
    rows, is_pause = np.concatenate(parts), np.concatenate([np.full(len(p), p is PAUSE) for p in parts])
    S = len(rows)
    rows[:, 0] *= np.where(is_pause, rng.uniform(0.5, 1.5, S),  # pauses of 50-150 ms
                           rng.uniform(0.85, 1.15) * rng.uniform(0.85, 1.15, S))  # speaking rate, per-state jitter
    stretch = rng.uniform(0.94, 1.04) + 0.06 * female  # a shorter vocal tract raises every formant
    formants, band, level = rows[:, 1:4] * stretch * rng.uniform(0.96, 1.04, (S, 3)), rows[:, 4:6], rows[:, 6:]
    level = level * 10 ** rng.normal(0, 0.05, (S, 1))
    ends = np.cumsum(rows[:, 0] * SR / 1000).astype(np.int64)
    T = int(ends[-1])
    t = np.arange(T) / SR
    log_f0 = np.log(f0_speaker) - rng.uniform(0.1, 0.25) * t / t[-1]
    for _ in range(rng.integers(1, 3)):  # accents: +8-25% over ~0.1 s
        centre, width = rng.uniform(0.15, 0.85) * t[-1], rng.uniform(0.08, 0.15)
        log_f0 += rng.uniform(0.08, 0.25) * np.exp(-0.5 * ((t - centre) / width) ** 2)
    f0 = np.exp(log_f0)
    phase, dt = np.cumsum(f0 / SR) % 1.0, f0 / SR
    # PolyBLEP: smooth the sawtooth's jump over one sample on each side, which removes most aliasing
    blep = np.where(phase < dt, 2 * phase / dt - (phase / dt) ** 2 - 1,
                    np.where(phase > 1 - dt, ((phase - 1) / dt) ** 2 + 2 * (phase - 1) / dt + 1, 0.0))
    saw = 2 * phase - 1 - blep
    f = np.fft.rfftfreq(SYNTH_FFT, 1 / SR)
    F = formants[:, :, None]
    Hv = (0.6 ** np.arange(3)[:, None] * (F > 0) * np.exp(-0.5 * ((f - F) / (50 + 0.08 * F)) ** 2)).sum(1)
    Hv = level * (Hv + 0.005 * (formants[:, :1] > 0))
    lo, hi = band[:, :1], band[:, 1:]
    Hn = NOISE_GAIN * level * (hi > 0) / ((1 + np.exp(-(f - lo) / 150)) * (1 + np.exp(-(hi - f) / 150)))
    # STFT by numpy (tiny per-utterance torch ops crawl when threads are oversubscribed): centred frames,
    # shaped spectra, then weighted overlap-add (a periodic Hann squared sums to 1.5 at a quarter-window hop)
    frame_state = np.searchsorted(ends, np.arange(T // SYNTH_HOP + 1) * SYNTH_HOP, side="right").clip(max=S - 1)
    Hv, Hn = Hv[frame_state], Hn[frame_state]  # (frames, freqs)
    for H in (Hv, Hn):  # glide between states over ~8 ms, like coarticulation
        H[1:-1] = 0.5 * H[1:-1] + 0.25 * (H[:-2] + H[2:])
    half = SYNTH_FFT // 2
    sources = np.pad(np.stack([saw, rng.standard_normal(T)]), ((0, 0), (half, half)))
    frames = np.lib.stride_tricks.sliding_window_view(sources, SYNTH_FFT, axis=1)[:, ::SYNTH_HOP]
    spec = np.fft.rfft(frames * SYNTH_WINDOW, axis=-1)
    shaped = np.fft.irfft(spec[0] * Hv + spec[1] * Hn, axis=-1) * SYNTH_WINDOW
    out = np.zeros((len(shaped) + 3, SYNTH_HOP))
    for j in range(4):
        out[j:j + len(shaped)] += shaped[:, j * SYNTH_HOP:(j + 1) * SYNTH_HOP]
    wave = out.ravel()[half:half + T] / 1.5
    wave = (wave * rng.uniform(0.3, 0.9) / np.abs(wave).max()).astype(np.float32)
    centres = (np.arange(T // HOP + 1) * HOP).clip(max=T - 1)
    voiced = (formants[:, 0] > 0)[np.searchsorted(ends, centres, side="right")]
    track = torch.from_numpy(np.where(voiced, f0[centres], 0.0).astype(np.float32))  # the known f0, 0 if unvoiced
    return wave, track, " ".join(words), "FEMALE" if female else "MALE"


def synth_corpus(n, seed=0):
    """n synthetic utterances (2-4 words, ~1-2 s), each seeded by (seed, index): reproducible, offline."""
    waves, f0, texts, genders = zip(*(_synth_utterance(np.random.default_rng([seed, i])) for i in range(n)))
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    return Corpus(np.concatenate(waves), np.cumsum(lengths) - lengths, lengths, list(texts),
                  [f"synth-{seed}-{i}" for i in range(n)], list(genders), list(f0))


# ----------------------------------------------------------------------------------------------------
# features

@lru_cache(maxsize=None)
def mel_filters(n_mels=N_MELS, device="cpu"):
    """Slaney mel filterbank (n_mels, N_FFT // 2 + 1), as librosa.filters.mel(sr=16000, n_fft=400) used by Whisper.

    Slaney mel: linear below 1 kHz (m = 3 f / 200), logarithmic above (27 mel per factor 6.4); triangles between
    n_mels + 2 equally spaced mel points, each scaled by 2 / (f_hi - f_lo) so that its area is constant.
    """
    hz_to_mel = lambda f: 3 * f / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)
    m = torch.linspace(0, hz_to_mel(SR / 2), n_mels + 2, dtype=torch.float64)
    edges = torch.where(m < 15, 200 * m / 3, 1000 * torch.exp((m - 15) * math.log(6.4) / 27))
    f = torch.linspace(0, SR / 2, N_FFT // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    triangles = torch.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)).clamp(min=0)
    return (triangles * 2 / (hi - lo)).float().to(device)


def log_mel(wave, n_mels=N_MELS):
    """Whisper's log-mel spectrogram, keeping every centred frame: (..., T) -> (..., n_mels, T // HOP + 1).

    P = |STFT|^2 (periodic Hann of N_FFT, hop HOP, centred frames, reflect padding); L = log10(max(mel P, 1e-10));
    L = max(L, max(L) - 8) with the max per item; out = (L + 4) / 4.
    """
    x = wave.reshape(-1, wave.shape[-1]).float()
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT, device=x.device), center=True,
                      pad_mode="reflect", return_complex=True)
    L = (mel_filters(n_mels, x.device) @ spec.abs() ** 2).clamp(min=1e-10).log10()
    L = torch.maximum(L, L.amax(dim=(-2, -1), keepdim=True) - 8)
    return ((L + 4) / 4).reshape(*wave.shape[:-1], n_mels, -1)


# ----------------------------------------------------------------------------------------------------
# tokenizer and batches

class Tokenizer:
    """Characters of the training transcriptions, after four specials: pad 0, bos 1, eos 2, unk 3."""
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.stoi = {c: i + 4 for i, c in enumerate(self.chars)}
        self.vocab_size = 4 + len(self.chars)
        self.unk_count = 0  # characters seen by encode that the training texts did not have

    @classmethod
    def build(cls, texts):
        return cls(sorted(set("".join(texts))))

    def encode(self, text):
        ids = [self.stoi.get(c, self.unk_id) for c in text]
        self.unk_count += ids.count(self.unk_id)
        return ids

    def decode(self, ids):
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
        return "".join(self.chars[i - 4] for i in ids if i >= 4)  # specials are skipped

    def state_dict(self):
        return {"chars": self.chars}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["chars"])


def batch_indices(lengths, batch_size, shuffle=True, seed=0):
    """One epoch as batches of similar lengths (little padding); every index exactly once, deterministic per seed.

    shuffle: a random permutation cut into pools of 50 batches, each pool sorted by length and cut into batches,
    then the batch order shuffled. Otherwise: everything sorted by length (evaluation).
    """
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    perm, pool, batches = rng.permutation(len(lengths)), 50 * batch_size, []
    for start in range(0, len(perm), pool):
        chunk = perm[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def spec_augment(mel, lengths, generator=None, n_freq=2, max_freq=15, n_time=2, max_time=0.05):
    """SpecAugment: n_freq bands of up to max_freq mel bins and n_time spans of up to max_time of each item's
    length (the adaptive time masks of Park et al. 2020) are set to 0, about the middle of the scaled log-mel."""
    B, F, T = mel.shape
    lengths = lengths.cpu()
    f_width = torch.randint(0, max_freq + 1, (B, n_freq), generator=generator)
    f_start = (torch.rand(B, n_freq, generator=generator) * (F - f_width + 1)).long()
    t_width = (torch.rand(B, n_time, generator=generator) * (max_time * lengths[:, None] + 1)).long()
    t_start = (torch.rand(B, n_time, generator=generator) * (lengths[:, None] - t_width + 1)).long()
    inside = lambda pos, start, width: ((pos >= start[..., None]) & (pos < (start + width)[..., None])).any(1)
    mask = inside(torch.arange(F), f_start, f_width)[:, :, None] | inside(torch.arange(T), t_start, t_width)[:, None]
    return mel.masked_fill(mask.to(mel.device), 0.0)


def make_batch(corpus, idx, tokenizer, device="cpu", specaugment=False, envelope=False, generator=None):
    """Pad the waves of `idx` with zeros, compute features on `device` (so a GPU is not starved), add targets.

    Returns mel (B, N_MELS, Tm), f0 (B, Tm), mel_lengths (B,), tokens (B, L) = [BOS, chars, EOS, PAD...],
    texts, and env (B, Tm) if envelope. Tm = longest T // HOP + 1; frames past an item's length are padding.
    """
    lengths = torch.as_tensor(corpus.lengths[np.asarray(idx)])
    wave = torch.zeros(len(idx), int(lengths.max()))
    for b, i in enumerate(idx):
        wave[b, :lengths[b]] = corpus.wave(i)
    wave = wave.to(device)
    mel_lengths = lengths // HOP + 1
    mel = log_mel(wave)
    if specaugment:
        mel = spec_augment(mel, mel_lengths, generator)
    texts = [corpus.texts[i] for i in idx]
    seqs = [[tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id] for t in texts]
    tokens = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.tensor(s)
    batch = dict(mel=mel, f0=pitch.f0_autocorr(wave), mel_lengths=mel_lengths.to(device), tokens=tokens.to(device),
                 texts=texts)
    if envelope:
        batch["env"] = pitch.envelope(wave)
    return batch


# ----------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="Download and prepare FLEURS (or build the synthetic speech), then "
                                             "summarise each split.")
    ap.add_argument("--data", choices=("fleurs", "synth"), default="fleurs")
    ap.add_argument("--lang", default="en_us", help="FLEURS language code, e.g. en_us, fr_fr, cmn_hans_cn")
    ap.add_argument("--root", default="data", help="where the data lives")
    ap.add_argument("--base_url", default=None, help="a FLEURS mirror (default: $FLEURS_BASE_URL, else Hugging Face)")
    ap.add_argument("--max_seconds", type=float, default=30.0, help="drop longer utterances")
    args = ap.parse_args()
    try:
        for split in ("train", "dev", "test"):
            t0 = time.time()
            corpus = load_split(args.data, split, args.root, args.lang, args.base_url, args.max_seconds)
            print(f"{split} (ready in {time.time() - t0:.1f} s)\n{describe(corpus)}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
