"""StyleCLIP global directions for whatever generator is loaded.

A *channel-relevance table* says, for every style channel of every conv layer, which way in
CLIP's image-embedding space the image moves when that channel is pushed (StyleCLIP, section
6: perturb each channel by +-alpha standard deviations on sample images, average the change of
the normalised CLIP embedding). With it, a text edit is a projection: relevance of each channel
to the text direction, channels under the disentanglement threshold ``beta`` zeroed, the rest
scaled by the channel's standard deviation, ``s' = s + strength * delta_s``.

The original code ships the table for FFHQ only and takes hours to build it; here it is built
for any generator, batched, layer by layer (each layer's prefix computed once and reused for all
its channels), resumable, and cached by the generator's content hash and the CLIP model's key.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import EngineError
from engine.progress import ProgressFn, no_progress
from engine.stylegan2 import Generator, NoiseMode, Styles
from settings import EngineConfig

__all__ = [
    "CHUNK_SIZE",
    "ChannelTable",
    "TableBuild",
    "TableKeeper",
    "apply_style_delta",
    "build_channel_table",
    "load_or_build_table",
    "style_stats",
    "table_path",
    "text_to_style_delta",
]

DEFAULT_SAMPLES = EngineConfig().direction_samples  # the one default: `[engine] direction_samples`
CHUNK_SIZE = 64  # style channels rendered per batch while building a table

log = logging.getLogger("stylebot.engine")

# CLIP image encoder: images [B, 3, H, W] in [-1, 1] -> unit embeddings [B, D].
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ChannelTable:
    layers: list[str]  # the conv layers covered, in synthesis order
    sizes: list[int]  # channels per layer
    directions: torch.Tensor  # [num_channels, D] unit CLIP-space direction per channel
    style_std: torch.Tensor  # [num_channels] std of each style channel over W samples
    model_hash: str
    clip_key: str
    samples: int

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A per-channel vector [num_channels] -> {layer: [C]}."""
        return dict(zip(self.layers, torch.split(flat, self.sizes), strict=True))

    def save(self, path: Path) -> None:
        meta = {"layers": json.dumps(self.layers), "sizes": json.dumps(self.sizes),
                "model_hash": self.model_hash, "clip_key": self.clip_key,
                "samples": str(self.samples)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"directions": self.directions.contiguous(),
                   "style_std": self.style_std.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ChannelTable:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            return cls(layers=json.loads(meta["layers"]), sizes=json.loads(meta["sizes"]),
                       directions=f.get_tensor("directions"), style_std=f.get_tensor("style_std"),
                       model_hash=meta["model_hash"], clip_key=meta["clip_key"],
                       samples=int(meta["samples"]))


def table_path(home: Path, *, model_hash: str, clip_key: str) -> Path:
    return home / "directions" / f"{model_hash[:16]}-{clip_key}.safetensors"


def _conv_layers(G: Generator) -> list[str]:
    # StyleCLIP manipulates the conv layers' styles, not the ToRGB ones.
    return [n for n in G.synthesis.layer_names if not n.endswith("torgb")]


@torch.no_grad()
def style_stats(
    G: Generator, *, samples: int = 4096, seed: int = 0
) -> tuple[Styles, Styles]:
    """Mean and std of every style channel over random W (mapping + affines only: cheap)."""
    device = G.w_avg.device
    z = torch.randn(samples, G.cfg.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    styles = G.synthesis.styles(G.mapping(z))
    return ({k: v.mean(0) for k, v in styles.items()}, {k: v.std(0) for k, v in styles.items()})


def _sample_styles(G: Generator, *, samples: int, seed: int, truncation_psi: float) -> Styles:
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(samples, G.cfg.z_dim, generator=gen).to(G.w_avg.device)
    return G.synthesis.styles(G.mapping(z, truncation_psi=truncation_psi))


class TableBuild:
    """A channel table built one chunk of channels at a time (see module doc), so that a serving
    engine can build it between jobs. With ``work_dir`` every chunk is saved as it finishes and a
    later build (another process too) resumes after the last saved chunk.
    """

    def __init__(
        self, G: Generator, encode: ImageEncoder, *, model_hash: str, clip_key: str,
        samples: int = DEFAULT_SAMPLES, alpha: float = 5.0, batch_size: int = CHUNK_SIZE, seed: int = 0,
        truncation_psi: float = 0.7, noise_mode: NoiseMode = "const", work_dir: Path | None = None,
    ) -> None:
        if samples < 1:
            raise EngineError("samples must be at least 1")
        self.G, self.encode, self.alpha, self.noise_mode = G, encode, alpha, noise_mode
        self.model_hash, self.clip_key, self.samples = model_hash, clip_key, samples
        self.work_dir = work_dir
        self.layers = _conv_layers(G)
        _, self._std = style_stats(G, seed=seed)
        self._styles = _sample_styles(G, samples=samples, seed=seed, truncation_psi=truncation_psi)
        self.sizes = [self._styles[name].shape[1] for name in self.layers]
        self.total = sum(self.sizes)
        # Channels per chunk: one chunk renders 2 * channels * samples images (minus and plus).
        self._per_chunk = max(1, batch_size // (2 * samples))
        self._parts: dict[str, list[torch.Tensor]] = {name: self._saved(name) for name in self.layers}
        self._prefix: tuple[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None

    @property
    def done(self) -> int:
        """Channels measured so far (saved ones included)."""
        return sum(sum(len(p) for p in parts) for parts in self._parts.values())

    @property
    def finished(self) -> bool:
        return self.done == self.total

    @property
    def layer(self) -> str:
        """The layer the next chunk measures (the last one once finished)."""
        return next((name for name, size in zip(self.layers, self.sizes, strict=True)
                     if sum(len(p) for p in self._parts[name]) < size), self.layers[-1])

    def _chunk_file(self, layer: str, c0: int) -> Path:
        assert self.work_dir is not None
        return self.work_dir / f"{layer}.c{c0:05d}.npy"

    def _saved(self, layer: str) -> list[torch.Tensor]:
        """The rows of ``layer`` saved by an earlier build, contiguous from channel 0."""
        if self.work_dir is None:
            return []
        whole = self.work_dir / f"{layer}.npy"
        if whole.exists():
            return [torch.from_numpy(np.load(whole, allow_pickle=False))]
        parts: list[torch.Tensor] = []
        while (chunk := self._chunk_file(layer, sum(len(p) for p in parts))).exists():
            parts.append(torch.from_numpy(np.load(chunk, allow_pickle=False)))
        return parts

    @torch.no_grad()
    def step(self) -> None:
        """Measure the next chunk of channels (``per_chunk`` of one layer) and save it."""
        if self.finished:
            return
        layer = self.layer
        syn, styles, std = self.G.synthesis, self._styles, self._std[layer]
        begin = syn.layer_names.index(layer)
        if self._prefix is None or self._prefix[0] != layer:  # computed once per layer
            self._prefix = (layer, syn.run(styles, end=begin, noise_mode=self.noise_mode))
        n, c = styles[layer].shape
        c0 = sum(len(p) for p in self._parts[layer])
        k = min(self._per_chunk, c - c0)
        reps = 2 * k  # [k channels] x [-, +] x [n samples]
        batch = {name: s.repeat(reps, 1) for name, s in styles.items()}
        eye = torch.zeros(k, c, device=std.device)
        eye[torch.arange(k), torch.arange(c0, c0 + k)] = self.alpha * std[c0:c0 + k]
        signs = torch.tensor([-1.0, 1.0], device=std.device)
        delta = (signs.reshape(1, 2, 1, 1) * eye.reshape(k, 1, 1, c))  # [k, 2, 1, C]
        batch[layer] = (styles[layer].reshape(1, 1, n, c) + delta).reshape(reps * n, c)
        x, img = self._prefix[1]
        prefix = (None if x is None else x.repeat(reps, 1, 1, 1),
                  None if img is None else img.repeat(reps, 1, 1, 1))
        _, images = syn.run(batch, begin=begin, state=prefix, noise_mode=self.noise_mode)
        assert images is not None
        emb = F.normalize(self.encode(images).float(), dim=-1).reshape(k, 2, n, -1)
        diff = F.normalize(emb[:, 1] - emb[:, 0], dim=-1)  # [k, n, D]
        rows = F.normalize(diff.mean(1), dim=-1).cpu()  # [k, D]
        self._parts[layer].append(rows)
        self._save(layer, c0, rows)

    def _save(self, layer: str, c0: int, rows: torch.Tensor) -> None:
        if self.work_dir is None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        parts = self._parts[layer]
        if sum(len(p) for p in parts) < self.sizes[self.layers.index(layer)]:
            _save_npy(self._chunk_file(layer, c0), rows)
            return
        whole = torch.cat(parts)
        _save_npy(self.work_dir / f"{layer}.npy", whole)  # the layer's chunks, merged
        self._parts[layer] = [whole]
        for chunk in self.work_dir.glob(f"{layer}.c*.npy"):
            chunk.unlink()

    def table(self) -> ChannelTable:
        if not self.finished:
            raise EngineError("the direction table is not finished yet")
        return ChannelTable(layers=self.layers, sizes=self.sizes,
                            directions=torch.cat([torch.cat(self._parts[n]) for n in self.layers]),
                            style_std=torch.cat([self._std[n].cpu() for n in self.layers]),
                            model_hash=self.model_hash, clip_key=self.clip_key, samples=self.samples)


def _save_npy(path: Path, rows: torch.Tensor) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:  # np.save on a path would append ".npy" to the temporary name
        np.save(f, rows.numpy(), allow_pickle=False)
    tmp.replace(path)


def build_channel_table(
    G: Generator,
    encode: ImageEncoder,
    *,
    model_hash: str,
    clip_key: str,
    samples: int = DEFAULT_SAMPLES,
    alpha: float = 5.0,
    batch_size: int = CHUNK_SIZE,
    seed: int = 0,
    truncation_psi: float = 0.7,
    noise_mode: NoiseMode = "const",
    work_dir: Path | None = None,
    progress: ProgressFn = no_progress,
) -> ChannelTable:
    """Measure every conv style channel's effect on the CLIP embedding (see module doc), all at
    once. ``work_dir``: as for :class:`TableBuild`.
    ``progress(channels_done, channels_total, {"layer": ...})``.
    """
    build = TableBuild(G, encode, model_hash=model_hash, clip_key=clip_key, samples=samples,
                       alpha=alpha, batch_size=batch_size, seed=seed, truncation_psi=truncation_psi,
                       noise_mode=noise_mode, work_dir=work_dir)
    while not build.finished:
        layer = build.layer
        build.step()
        progress(build.done, build.total, {"layer": layer})
    return build.table()


def _try_lock(path: Path) -> int | None:
    """An exclusive advisory lock on ``path`` (a descriptor to close to release it), or None
    when another process (or another descriptor in this one) holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _busy(path: Path) -> EngineError:
    return EngineError(f"another process is building this direction table now ({path.name}); "
                       "try again when it has finished")


def load_or_build_table(
    G: Generator, encode: ImageEncoder, *, model_hash: str, clip_key: str, home: Path,
    samples: int = DEFAULT_SAMPLES, rebuild: bool = False, batch_size: int = CHUNK_SIZE,
    progress: ProgressFn = no_progress,
) -> tuple[ChannelTable, bool]:
    """The cached table for (generator, CLIP), building it first when absent (resuming the
    chunks an interrupted build, or an engine building between jobs, left).

    Returns (table, built_now)."""
    path = table_path(home, model_hash=model_hash, clip_key=clip_key)
    if path.exists() and not rebuild:
        return ChannelTable.load(path), False
    lock = _try_lock(path.with_suffix(".lock"))
    if lock is None:
        raise _busy(path)
    try:
        work = path.with_suffix(".partial")
        if rebuild and work.exists():
            shutil.rmtree(work)
        table = build_channel_table(G, encode, model_hash=model_hash, clip_key=clip_key,
                                    samples=samples, batch_size=batch_size, work_dir=work,
                                    progress=progress)
        table.save(path)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        os.close(lock)
    return table, True


class TableKeeper:
    """The direction table a serving engine edits with. When it is missing it is built between
    jobs, one chunk per :meth:`build_step` (so a job that arrives waits for one chunk at most),
    by one process per cache dir at a time (an advisory lock), resuming where any earlier build
    stopped. The log shows the build's progress."""

    def __init__(
        self, G: Generator, encode: ImageEncoder, *, model_hash: str, clip_key: str, home: Path,
        samples: int = DEFAULT_SAMPLES, batch_size: int = CHUNK_SIZE,
    ) -> None:
        self.G, self.encode, self.model_hash, self.clip_key = G, encode, model_hash, clip_key
        self.samples, self.batch_size = samples, batch_size
        self.path = table_path(home, model_hash=model_hash, clip_key=clip_key)
        self._table: ChannelTable | None = None
        self._build: TableBuild | None = None
        self._lock: int | None = None
        self._logged_tenth = -1

    def ready(self) -> ChannelTable | None:
        """The finished table (built by this process or any other), else None."""
        if self._table is None and self.path.exists():
            self._table = ChannelTable.load(self.path)
        return self._table

    @property
    def progress(self) -> float | None:
        """How far this process's build is (0..1); None when another process builds it."""
        return None if self._build is None else self._build.done / self._build.total

    def build_step(self) -> bool:
        """Build one more chunk of the missing table. False when there is nothing to do here
        (the table is ready, or another process holds the build)."""
        if self.ready() is not None:
            return False
        if self._build is None:
            return self._start()
        self._build.step()
        tenth = self._build.done * 10 // self._build.total
        if tenth > self._logged_tenth:
            self._logged_tenth = tenth
            log.info("direction table for fast edits: %d%% (%d of %d channels)", tenth * 10,
                     self._build.done, self._build.total)
        if self._build.finished:
            self._finish(self._build)
        return True

    def _start(self) -> bool:
        self._lock = _try_lock(self.path.with_suffix(".lock"))
        if self._lock is None:
            return False
        if self.ready() is not None:  # finished by another process just before we locked
            self._release()
            return False
        self._build = TableBuild(self.G, self.encode, model_hash=self.model_hash,
                                 clip_key=self.clip_key, samples=self.samples,
                                 batch_size=self.batch_size, work_dir=self.path.with_suffix(".partial"))
        log.info("building the direction table for fast edits between jobs (%d channels, %d "
                 "already measured); until it is ready, /edit uses the optimisation method",
                 self._build.total, self._build.done)
        return True

    def _finish(self, build: TableBuild) -> None:
        table = build.table()
        table.save(self.path)
        shutil.rmtree(self.path.with_suffix(".partial"), ignore_errors=True)
        self._table, self._build = table, None
        self._release()
        log.info("direction table ready: fast edits are on (%s)", self.path.name)

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def close(self) -> None:
        """Stop building (what was measured stays saved for the next build)."""
        self._build = None
        self._release()


def text_to_style_delta(
    table: ChannelTable, text_direction: torch.Tensor, *, beta: float
) -> tuple[dict[str, torch.Tensor], int]:
    """StyleCLIP's GetBoundary: relevance to the text direction, threshold beta, scale by std.

    Returns ({layer: delta_s [C]}, number of channels kept). Raises EngineError when no channel
    passes ``beta`` (the text is unrelated to anything this generator controls)."""
    rel = table.directions @ text_direction.to(table.directions)  # [num_channels]
    rel = torch.where(rel.abs() < beta, torch.zeros_like(rel), rel)
    kept = int((rel != 0).sum())
    if kept == 0:
        best = float((table.directions @ text_direction.to(table.directions)).abs().max())
        raise EngineError(
            f"no style channel is related strongly enough to this text (best {best:.3f} < beta "
            f"{beta:.3f}); try other words or a lower beta"
        )
    rel = rel / rel.abs().max()
    return table.split(rel * table.style_std), kept


def apply_style_delta(
    styles: Styles, delta: dict[str, torch.Tensor], *, strength: float
) -> Styles:
    """s' = s + strength * delta_s (layers without a delta are unchanged)."""
    out = dict(styles)
    for name, d in delta.items():
        out[name] = styles[name] + strength * d.to(styles[name])
    return out
