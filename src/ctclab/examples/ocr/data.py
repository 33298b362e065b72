"""Synthetic text lines with the true horizontal extent of every character.

Each line is drawn character by character with Pillow's bundled TrueType font, so the pen
position of every glyph is known exactly; its ink extent comes from the font's glyph metrics
(``getbbox``). Random extra spacing, a small vertical shift and pixel noise make the task less
trivial. Deterministic given the seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

CHARSET = " abcdefghijklmnopqrstuvwxyz0123456789"
BLANK = 0  # class 0 is blank, class i + 1 is CHARSET[i]
NUM_CLASSES = len(CHARSET) + 1
HEIGHT = 32
DOWNSAMPLE = 4  # the model's width reduction: frame t covers pixels [4t, 4t + 4)


def _font(size: int = 20):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Line:
    """One rendered line: ``image`` ``(HEIGHT, W)`` float in [0, 1] (ink = 1), its ``text``, and
    for every character the pixel columns ``[x0, x1)`` it occupies (ink extent; for a space, the
    gap between its neighbours' ink)."""

    image: np.ndarray
    text: str
    extents: tuple[tuple[int, int], ...]

    @property
    def targets(self) -> list[int]:
        return [CHARSET.index(c) + 1 for c in self.text]

    def frame_extents(self) -> list[tuple[int, int]]:
        """Character extents in frames of the model (``[start, end)``)."""
        return [(x0 // DOWNSAMPLE, max(x0 // DOWNSAMPLE + 1, -(-x1 // DOWNSAMPLE))) for x0, x1 in self.extents]


def random_text(rng: random.Random, min_len: int = 5, max_len: int = 30) -> str:
    n = rng.randint(min_len, max_len)
    chars = []
    for i in range(n):
        if 0 < i < n - 1 and chars[-1] != " " and rng.random() < 0.15:
            chars.append(" ")
        else:
            chars.append(rng.choice(CHARSET[1:]))
    return "".join(chars)


def render(text: str, rng: random.Random, noise: float = 0.08) -> Line:
    from PIL import Image, ImageDraw

    font = _font()
    spacing = [rng.randint(0, 3) for _ in text]
    margin = rng.randint(2, 6)
    width = margin * 2 + int(sum(font.getlength(c) for c in text)) + sum(spacing) + 4
    width = -(-width // DOWNSAMPLE) * DOWNSAMPLE
    image = Image.new("L", (width, HEIGHT), 0)
    draw = ImageDraw.Draw(image)
    dy = rng.randint(-2, 2)
    x = float(margin)
    ink = []
    for c, extra in zip(text, spacing):
        draw.text((x, 4 + dy), c, fill=255, font=font)
        left, _, right, _ = font.getbbox(c)
        ink.append((x + left, x + right) if c != " " else None)
        x += font.getlength(c) + extra
    extents = []
    for i, box in enumerate(ink):
        if box is None:  # a space spans the gap between the neighbouring glyphs' ink
            before = next((ink[j][1] for j in range(i - 1, -1, -1) if ink[j] is not None), margin)
            after = next((ink[j][0] for j in range(i + 1, len(ink)) if ink[j] is not None), x)
            box = (before, after)
        extents.append((int(box[0]), max(int(box[0]) + 1, int(round(box[1])))))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = np.clip(pixels + np.random.default_rng(rng.randint(0, 2**31)).normal(0, noise, pixels.shape), 0, 1)
    return Line(pixels.astype(np.float32), text, tuple(extents))


def make_lines(count: int, seed: int) -> list[Line]:
    rng = random.Random(seed)
    return [render(random_text(rng), rng) for _ in range(count)]


def collate(lines: list[Line]):
    """Batch of lines -> images ``(B, 1, H, W_max)``, targets ``(B, S)``, input and target lengths."""
    width = max(line.image.shape[1] for line in lines)
    images = torch.zeros(len(lines), 1, HEIGHT, width)
    for i, line in enumerate(lines):
        images[i, 0, :, : line.image.shape[1]] = torch.from_numpy(line.image)
    longest = max(len(line.text) for line in lines)
    targets = torch.tensor([line.targets + [1] * (longest - len(line.text)) for line in lines])
    input_lengths = torch.tensor([line.image.shape[1] // DOWNSAMPLE for line in lines])
    target_lengths = torch.tensor([len(line.text) for line in lines])
    return images, targets, input_lengths, target_lengths
