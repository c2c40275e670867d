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

import json
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

__all__ = [
    "ChannelTable",
    "apply_style_delta",
    "build_channel_table",
    "load_or_build_table",
    "style_stats",
    "table_path",
    "text_to_style_delta",
]

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


@torch.no_grad()
def _layer_directions(
    G: Generator, encode: ImageEncoder, styles: Styles, std: torch.Tensor, *, layer: str,
    alpha: float, batch_size: int, noise_mode: NoiseMode, on_chunk: Callable[[int], None],
) -> torch.Tensor:
    """Directions [C, D] for every channel of one layer."""
    syn = G.synthesis
    begin = syn.layer_names.index(layer)
    n = styles[layer].shape[0]
    state = syn.run(styles, end=begin, noise_mode=noise_mode)  # computed once per layer
    c = styles[layer].shape[1]
    per_chunk = max(1, batch_size // (2 * n))
    out = []
    for c0 in range(0, c, per_chunk):
        k = min(per_chunk, c - c0)
        reps = 2 * k  # [k channels] x [-, +] x [n samples]
        batch = {name: s.repeat(reps, 1) for name, s in styles.items()}
        eye = torch.zeros(k, c, device=std.device)
        eye[torch.arange(k), torch.arange(c0, c0 + k)] = alpha * std[c0:c0 + k]
        signs = torch.tensor([-1.0, 1.0], device=std.device)
        delta = (signs.reshape(1, 2, 1, 1) * eye.reshape(k, 1, 1, c))  # [k, 2, 1, C]
        batch[layer] = (styles[layer].reshape(1, 1, n, c) + delta).reshape(reps * n, c)
        x, img = state
        prefix = (None if x is None else x.repeat(reps, 1, 1, 1),
                  None if img is None else img.repeat(reps, 1, 1, 1))
        _, images = syn.run(batch, begin=begin, state=prefix, noise_mode=noise_mode)
        assert images is not None
        emb = F.normalize(encode(images).float(), dim=-1).reshape(k, 2, n, -1)
        diff = F.normalize(emb[:, 1] - emb[:, 0], dim=-1)  # [k, n, D]
        out.append(F.normalize(diff.mean(1), dim=-1))
        on_chunk(k)
    return torch.cat(out)


def build_channel_table(
    G: Generator,
    encode: ImageEncoder,
    *,
    model_hash: str,
    clip_key: str,
    samples: int = 32,
    alpha: float = 5.0,
    batch_size: int = 64,
    seed: int = 0,
    truncation_psi: float = 0.7,
    noise_mode: NoiseMode = "const",
    work_dir: Path | None = None,
    progress: ProgressFn = no_progress,
) -> ChannelTable:
    """Measure every conv style channel's effect on the CLIP embedding (see module doc).

    ``work_dir`` makes the build resumable: each finished layer is saved there and skipped
    when the build is run again. ``progress(channels_done, channels_total, {"layer": ...})``.
    """
    if samples < 1:
        raise EngineError("samples must be at least 1")
    layers = _conv_layers(G)
    _, std = style_stats(G, seed=seed)
    styles = _sample_styles(G, samples=samples, seed=seed, truncation_psi=truncation_psi)
    sizes = [styles[name].shape[1] for name in layers]
    total, done = sum(sizes), 0
    parts = []
    for layer, size in zip(layers, sizes, strict=True):
        saved = None if work_dir is None else work_dir / f"{layer}.npy"
        if saved is not None and saved.exists():
            parts.append(torch.from_numpy(np.load(saved, allow_pickle=False)))
            done += size
            progress(done, total, {"layer": layer, "resumed": True})
            continue

        def on_chunk(k: int, layer: str = layer) -> None:
            nonlocal done
            done += k
            progress(done, total, {"layer": layer})

        d = _layer_directions(G, encode, styles, std[layer], layer=layer, alpha=alpha,
                              batch_size=batch_size, noise_mode=noise_mode, on_chunk=on_chunk).cpu()
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            np.save(saved, d.numpy(), allow_pickle=False)
        parts.append(d)
    return ChannelTable(layers=layers, sizes=sizes, directions=torch.cat(parts),
                        style_std=torch.cat([std[name].cpu() for name in layers]),
                        model_hash=model_hash, clip_key=clip_key, samples=samples)


def load_or_build_table(
    G: Generator, encode: ImageEncoder, *, model_hash: str, clip_key: str, home: Path,
    samples: int = 32, rebuild: bool = False, batch_size: int = 64,
    progress: ProgressFn = no_progress,
) -> tuple[ChannelTable, bool]:
    """The cached table for (generator, CLIP), building it first when absent.

    Returns (table, built_now)."""
    path = table_path(home, model_hash=model_hash, clip_key=clip_key)
    if path.exists() and not rebuild:
        return ChannelTable.load(path), False
    work = path.with_suffix(".partial")
    if rebuild and work.exists():
        shutil.rmtree(work)
    table = build_channel_table(G, encode, model_hash=model_hash, clip_key=clip_key,
                                samples=samples, batch_size=batch_size, work_dir=work,
                                progress=progress)
    table.save(path)
    shutil.rmtree(work, ignore_errors=True)
    return table, True


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
