"""Stand-ins for the evaluate tests: a backbone that predicts the test images perfectly, one that counts its
windows on a clock that moves only inside forwards, and a voc21 layout whose classes are exact under resizing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spar_pipeline.datasets import get_spec


class OneHot(torch.nn.Module):
    """A perfect backbone for the test images: channel 0 holds 10 × class id, each 16×16 patch's
    feature is the one-hot of that class, and each class's text embedding is the same one-hot."""

    name, patch_size, window, dim = "onehot", 16, 48, 32
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # normalised input = pixels / 255

    def __init__(self):
        super().__init__()
        self.calls = 0

    def normalize(self, x, scale=1.0):
        """As ``Backbone.normalize``: (x − scale·mean) / (scale·std)."""
        mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) * scale for v in (self.mean, self.std))
        return (x - mean) / std

    def dense(self, x):
        self.calls += 1
        k = torch.round(F.avg_pool2d(x[:, :1], 16) * 255 / 10).long().clamp(0, self.dim - 1)
        return F.one_hot(k[:, 0], self.dim).float()

    def class_embeddings(self, lines, templates):
        emb, index = [], []
        for c, line in enumerate(lines):
            for _ in line.split(", "):
                emb.append(F.one_hot(torch.tensor(c), self.dim).float())
                index.append(c)
        return torch.stack(emb), torch.tensor(index)


def striped_voc(root, n=3, h=64, w=96, seed=0):
    """voc21 layout; classes constant over 16-pixel stripes (so bilinear logits are exact), ignore blocks."""
    spec, rng = get_spec("voc21"), np.random.default_rng(seed)
    base = root / spec.data_root
    for d in (spec.img_dir, spec.ann_dir, "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(n):
        cls = rng.integers(0, 21, (w if i % 2 == 0 else h) // 16)
        stripes = np.repeat(cls, 16)
        label = np.broadcast_to(stripes[None, :] if i % 2 == 0 else stripes[:, None], (h, w)).astype(np.uint8)
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        image[..., 0] = label * 10
        label = label.copy()
        label[16:32, 16:32] = 255  # ignored pixels (the image still encodes a class there)
        stem = f"2007_{i:06d}"
        Image.fromarray(image).save(base / spec.img_dir / f"{stem}.jpg", quality=100, subsampling=0)
        Image.fromarray(label).save(base / spec.ann_dir / f"{stem}.png")
        stems.append(stem)
    (base / spec.ann_file).write_text("\n".join(stems) + "\n")
    return root


class Clock:
    """A clock that moves only inside ``dense``: a timing that reads it counts forward time and nothing else."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingWindows(OneHot):
    """OneHot whose forwards record their batch shapes and advance ``clock`` by one second per window."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.shapes = clock, []

    def dense(self, x):
        self.shapes.append(tuple(x.shape))
        self.clock.now += x.shape[0]
        return super().dense(x)
