"""Generated data with a known truth: vMF features for tests and benchmarks, and a labelled image
set for the demo. Nothing here touches the network.
"""

from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass

import numpy as np


def random_unit_vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sample_vmf(mu: np.ndarray, kappa: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of the von Mises-Fisher distribution on S^{d-1} (Wood, 1994), rows (n, d)."""
    d = mu.shape[0]
    mu = mu / np.linalg.norm(mu)
    b = (-2 * kappa + math.sqrt(4 * kappa ** 2 + (d - 1) ** 2)) / (d - 1)
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + (d - 1) * math.log(1 - x0 ** 2)
    w = np.empty(0)
    while len(w) < n:  # rejection sampling of the cosine to mu, vectorised
        m = 2 * (n - len(w)) + 16
        z = rng.beta((d - 1) / 2, (d - 1) / 2, m)
        cand = (1 - (1 + b) * z) / (1 - (1 - b) * z)
        u = rng.uniform(size=m)
        ok = kappa * cand + (d - 1) * np.log(1 - x0 * cand) - c >= np.log(u)
        w = np.concatenate([w, cand[ok]])
    w = w[:n, None]
    v = rng.standard_normal((n, d))
    v -= (v @ mu)[:, None] * mu[None, :]  # tangent direction orthogonal to mu
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (w * mu[None, :] + np.sqrt(1 - w ** 2) * v).astype(np.float32)


@dataclass
class SyntheticFeatures:
    image: np.ndarray        # (N, d) unit rows
    text: np.ndarray         # (N, d) unit rows: the paired "text counterparts"
    labels: np.ndarray       # (N,)
    nouns: np.ndarray        # (n_nouns, d) unit rows: a noun bank, `nouns_per_class` per class
    noun_names: list[str]    # "class3_noun7", "distractor12", ...
    image_centres: np.ndarray
    text_centres: np.ndarray


def make_vmf_features(n: int = 5000, n_clusters: int = 10, dim: int = 512,
                      image_kappa: float = 400.0, text_kappa: float = 400.0,
                      text_flip: float = 0.0, nouns_per_class: int = 20,
                      distractor_nouns: int = 200, noun_kappa: float = 800.0,
                      imbalance: float = 1.0, seed: int = 0) -> SyntheticFeatures:
    """K vMF clusters of image features and paired noisy text vectors.

    Text vectors of class c are vMF around a text centre t_c that is correlated with the image
    centre (as CLIP's modality gap keeps them apart but aligned); with probability `text_flip` a
    point's text comes from a random other class (uninformative language). `imbalance` is the
    ratio of the largest to the smallest class size.
    """
    rng = np.random.default_rng(seed)
    image_centres = random_unit_vectors(n_clusters, dim, rng)
    gap = random_unit_vectors(1, dim, rng)[0]
    text_centres = image_centres + 1.0 * gap  # a shared offset: the modality gap
    text_centres /= np.linalg.norm(text_centres, axis=1, keepdims=True)
    weights = np.geomspace(1.0, 1.0 / imbalance, n_clusters)
    counts = np.floor(weights / weights.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    labels = np.repeat(np.arange(n_clusters), counts)
    rng.shuffle(labels)
    image = np.empty((n, dim), np.float32)
    text = np.empty((n, dim), np.float32)
    text_class = labels.copy()
    flip = rng.uniform(size=n) < text_flip
    text_class[flip] = (labels[flip] + rng.integers(1, n_clusters, flip.sum())) % n_clusters
    for c in range(n_clusters):
        rows = labels == c
        image[rows] = sample_vmf(image_centres[c], image_kappa, int(rows.sum()), rng)
        rows = text_class == c
        text[rows] = sample_vmf(text_centres[c], text_kappa, int(rows.sum()), rng)
    nouns = [sample_vmf(text_centres[c], noun_kappa, nouns_per_class, rng)
             for c in range(n_clusters)]
    names = [f"class{c}_noun{j}" for c in range(n_clusters) for j in range(nouns_per_class)]
    if distractor_nouns:
        nouns.append(random_unit_vectors(distractor_nouns, dim, rng))
        names += [f"distractor{j}" for j in range(distractor_nouns)]
    return SyntheticFeatures(image, text, labels, np.concatenate(nouns), names,
                             image_centres, text_centres)



def make_two_mode_features(n: int = 3000, n_clusters: int = 10, two_mode_classes: int = 5,
                           close_pairs: int = 2, dim: int = 512, semantic_weight: float = 0.5,
                           image_kappa: float = 400.0, text_kappa: float = 300.0,
                           nouns_per_class: int = 20, distractor_nouns: int = 200,
                           noun_kappa: float = 800.0, seed: int = 0) -> SyntheticFeatures:
    """Classes whose images do not form one visual cluster each, while their nouns agree.

    Every image centre mixes a class's *semantic* direction s_c (what language sees) with a
    *visual* direction r: mu = normalize(w s_c + sqrt(1 - w^2) r), w = `semantic_weight`. The
    first `two_mode_classes` classes have two visual modes with independent r (a photo and a
    sketch of one concept: modes at cosine ~w^2 apart), the next `close_pairs` pairs of classes
    share one r (two visually close concepts: cosine ~1 - w^2), the rest have their own r. Text
    centres, paired text and planted nouns depend on s_c only (t_c = normalize(s_c + gap)), so a
    fitting vocabulary joins the modes and tells the close pairs apart, while k-means with K
    centres spends centres on the extra modes and merges the close pairs. Class sizes are equal
    and each two-mode class is split evenly between its modes. `image_centres` holds one row per
    mode (two-mode classes first mode, then second).
    """
    if two_mode_classes + 2 * close_pairs > n_clusters:
        raise ValueError("two_mode_classes + 2 * close_pairs must not exceed n_clusters")
    rng = np.random.default_rng(seed)
    semantic = random_unit_vectors(n_clusters, dim, rng)
    gap = random_unit_vectors(1, dim, rng)[0]
    text_centres = semantic + gap
    text_centres /= np.linalg.norm(text_centres, axis=1, keepdims=True)
    # visual directions: one per mode, shared inside a close pair
    visual_of = []  # per class, the list of its modes' visual-direction indices
    count = 0
    for c in range(n_clusters):
        if c < two_mode_classes:
            visual_of.append([count, count + 1])
            count += 2
        elif c < two_mode_classes + 2 * close_pairs and (c - two_mode_classes) % 2 == 1:
            visual_of.append([visual_of[-1][0]])  # second of a close pair: its partner's r
        else:
            visual_of.append([count])
            count += 1
    visual = random_unit_vectors(count, dim, rng)
    w = semantic_weight
    labels = np.repeat(np.arange(n_clusters), n // n_clusters)
    labels = np.concatenate([labels, rng.integers(0, n_clusters, n - len(labels))])
    rng.shuffle(labels)
    image = np.empty((n, dim), np.float32)
    text = np.empty((n, dim), np.float32)
    centres = []
    for c in range(n_clusters):
        rows = np.flatnonzero(labels == c)
        parts = np.array_split(rows, len(visual_of[c]))
        for part, v in zip(parts, visual_of[c]):
            mu = w * semantic[c] + math.sqrt(1 - w * w) * visual[v]
            mu /= np.linalg.norm(mu)
            centres.append(mu)
            image[part] = sample_vmf(mu, image_kappa, len(part), rng)
        text[rows] = sample_vmf(text_centres[c], text_kappa, len(rows), rng)
    nouns = [sample_vmf(text_centres[c], noun_kappa, nouns_per_class, rng)
             for c in range(n_clusters)] if nouns_per_class else []
    names = [f"class{c}_noun{j}" for c in range(n_clusters) for j in range(nouns_per_class)]
    if distractor_nouns:
        nouns.append(random_unit_vectors(distractor_nouns, dim, rng))
        names += [f"distractor{j}" for j in range(distractor_nouns)]
    return SyntheticFeatures(image, text, labels, np.concatenate(nouns), names,
                             np.stack(centres).astype(np.float32), text_centres)

# ------------------------------------------------------------------------------------------
# A small labelled image set for the demo and the end-to-end tests

DEMO_CLASSES = ("circle", "square", "triangle", "stripes", "checkerboard", "star")


def _draw(cls: str, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    hue = rng.uniform(0, 1)
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(255 * v) for v in _hsv(hue, 0.8, 0.8))
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.2, 0.32) * size
    if cls == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif cls == "square":
        angle = rng.uniform(0, math.pi / 2)
        pts = [(cx + r * math.cos(angle + a), cy + r * math.sin(angle + a))
               for a in np.arange(4) * math.pi / 2]
        draw.polygon(pts, fill=colour)
    elif cls == "triangle":
        angle = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(angle + a), cy + r * math.sin(angle + a))
               for a in np.arange(3) * 2 * math.pi / 3]
        draw.polygon(pts, fill=colour)
    elif cls == "star":
        angle = rng.uniform(0, 2 * math.pi)
        pts = [(cx + (r if i % 2 == 0 else r * 0.4) * math.cos(angle + i * math.pi / 5),
                cy + (r if i % 2 == 0 else r * 0.4) * math.sin(angle + i * math.pi / 5))
               for i in range(10)]
        draw.polygon(pts, fill=colour)
    elif cls == "stripes":
        width = int(rng.integers(size // 16, size // 8))
        for x in range(0, size, 2 * width):
            draw.rectangle([x, 0, x + width - 1, size], fill=colour)
        image = image.rotate(float(rng.uniform(0, 180)), fillcolor=background)
    elif cls == "checkerboard":
        cell = int(rng.integers(size // 10, size // 5))
        for i in range(0, size, cell):
            for j in range(0, size, cell):
                if (i // cell + j // cell) % 2 == 0:
                    draw.rectangle([i, j, i + cell - 1, j + cell - 1], fill=colour)
    else:
        raise ValueError(f"unknown demo class {cls!r}")
    noise = rng.normal(0, 6, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h, s, v)


def generate_image_folder(root: str, classes: tuple[str, ...] = DEMO_CLASSES,
                          per_class: int = 50, size: int = 160, seed: int = 0,
                          fmt: str = "jpg") -> list[str]:
    """Write `per_class` images of each class under root/<class>/; returns the paths written.

    Deterministic for a given seed; an existing file is left as it is, so re-runs are cheap.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for cls in classes:
        folder = os.path.join(root, cls)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            path = os.path.join(folder, f"{cls}_{i:04d}.{fmt}")
            image = _draw(cls, size, rng)  # drawn even when present, to keep the RNG stream
            if not os.path.exists(path):
                tmp = path + ".tmp"
                image.save(tmp, format="JPEG" if fmt == "jpg" else fmt.upper(), quality=90)
                os.replace(tmp, path)
            paths.append(path)
    return paths
