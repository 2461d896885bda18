"""Episodes as sequences, for memory-augmented networks (Santoro et al. 2016, Sec. 4).

An episode draws ``classes`` Omniglot characters and ``instances`` drawings of each, shows them in
a random order, and gives each class a label that is fresh for the episode. The learner sees
``(x_t, y_{t-1})`` at step t: the label of an image arrives one step *after* the image (the first
step gets a zero label), so it must remember which image it saw last, bind it to the label when
that comes, and recognise the class the next time.

Labels (``labels``):

* ``onehot``: class ``c`` of the episode is ``c`` in a random permutation of ``0..classes-1``,
  shown as a one-hot vector of ``classes`` entries (Table 1: 5 classes).
* ``string``: a 5-character string over ``{a..e}`` (3125 labels), drawn without repetition per
  episode, shown as five one-hot blocks of 5 (25 entries); correct means all five characters right
  (Table 2: 5 and 15 classes).

Classes (Vinyals et al. 2016's Omniglot split, the split files' order; the same 1200 / 423
characters as Santoro's "1200 training classes, the remaining 423 for testing"):

* ``train``: 1028 of the 1200 training characters, each at 0/90/180/270 degrees as four classes
  (4112), every image shifted by up to ``max_shift`` pixels at random;
* ``val``: the other 172 training characters, upright, no shift (model selection only);
* ``trainval``: all 1200 training characters, rotated and shifted (no validation part left);
* ``test``: the 423 remaining characters, upright, no shift.

Images are 20x20 (Lanczos from 105x105), ink = 1, flattened to 400 inputs.

Episode ``i`` of a stream depends only on ``(part, seed, i)`` (its own NumPy generator), so the
fixed validation and test episodes never move when a training stream advances, and a sampler's
state is the index of its next episode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalab.errors import ConfigError

LABEL_KINDS = ("onehot", "string")
STRING_LENGTH = 5  # characters of a string label
STRING_SYMBOLS = 5  # {a, b, c, d, e}
STREAMS = {"train": 0, "val": 1, "trainval": 2, "test": 3}
AUGMENTED = ("train", "trainval")


@dataclass
class Sequences:
    """A batch of episodes as sequences.

    Attributes:
        x: float32 ``(B, T, 400)`` images in [0, 1].
        labels: int64 ``(B, T, blocks)`` the label of each image: ``blocks = 1`` digit in
            ``0..classes-1`` (one-hot labels) or 5 characters in ``0..4`` (string labels).
        instance: int64 ``(B, T)`` which presentation of its class the image is (1 = the first).
        digits: entries per label block (``classes`` for one-hot labels, 5 for strings).
    """

    x: torch.Tensor
    labels: torch.Tensor
    instance: torch.Tensor
    digits: int

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences(
            self.x.to(device), self.labels.to(device), self.instance.to(device), self.digits
        )

    @property
    def episodes(self) -> int:
        return self.x.shape[0]


def label_vectors(labels: torch.Tensor, digits: int) -> torch.Tensor:
    """``(..., blocks)`` label digits -> ``(..., blocks * digits)`` concatenated one-hot blocks."""
    one_hot = torch.nn.functional.one_hot(labels, digits).to(torch.float32)
    return one_hot.flatten(-2)


def present(x: torch.Tensor, labels: torch.Tensor, digits: int) -> torch.Tensor:
    """The network's input ``(x_t, y_{t-1})``, ``(B, T, 400 + blocks * digits)``: each label is
    shown one step after its image, and step 0 gets a zero label (Santoro et al. 2016)."""
    vectors = label_vectors(labels, digits)
    shifted = torch.cat([torch.zeros_like(vectors[:, :1]), vectors[:, :-1]], dim=1)
    return torch.cat([x, shifted], dim=-1)


def string_codes(labels: torch.Tensor) -> torch.Tensor:
    """``(..., 5)`` characters in ``0..4`` -> ``(...,)`` the string as a number in ``0..3124``
    (first character most significant)."""
    weights = STRING_SYMBOLS ** torch.arange(STRING_LENGTH - 1, -1, -1, device=labels.device)
    return (labels * weights).sum(-1)


def string_characters(codes: np.ndarray) -> np.ndarray:
    """``(...,)`` string numbers -> ``(..., 5)`` characters in ``0..4`` (inverse of
    :func:`string_codes`)."""
    powers = STRING_SYMBOLS ** np.arange(STRING_LENGTH - 1, -1, -1)
    return (np.asarray(codes)[..., None] // powers) % STRING_SYMBOLS


def as_text(labels: torch.Tensor) -> str:
    """One string label ``(5,)`` as letters, e.g. ``"adcbe"``."""
    return "".join("abcde"[int(c)] for c in labels)


def load_characters(part: str, root: Path | None = None, size: int = 20) -> torch.Tensor:
    """The classes of ``part`` (see the module doc) as uint8 ``(classes, 20, size, size)``."""
    from metalab.data.omniglot import DRAWINGS, omniglot

    if part not in STREAMS:
        raise ConfigError(f"unknown part {part!r}: use one of {sorted(STREAMS)}")
    data = omniglot("vinyals", part, root, size)
    images = data.images.view(data.num_classes, DRAWINGS, size, size)
    if part not in AUGMENTED:  # held-out characters are shown as drawn: no rotated classes
        upright = [i for i, n in enumerate(data.class_names) if n.endswith("/rot000")]
        images = images[torch.tensor(upright)]
    return images.contiguous()


class SequenceSampler:
    """A seeded stream of episodes of one class part, handed out in batches.

    Args:
        images: uint8 ``(classes, drawings, H, W)``, ink = 255.
        classes: classes per episode.
        instances: drawings of each class per episode (episode length ``classes * instances``).
        labels: ``onehot`` or ``string``.
        seed: the stream's seed.
        part: names the stream (``train``, ``val``, ``trainval``, ``test``) in the episode seeds.
        max_shift: random translation of every image by up to this many pixels (0: none).
    """

    def __init__(
        self,
        images: torch.Tensor,
        classes: int,
        instances: int,
        labels: str = "onehot",
        seed: int = 0,
        part: str = "train",
        max_shift: int = 0,
    ) -> None:
        available, drawings = images.shape[:2]
        if labels not in LABEL_KINDS:
            raise ConfigError(f"--labels {labels!r}: use onehot or string")
        if not 2 <= classes <= available:
            raise ConfigError(
                f"--classes {classes}: the {part} part has {available} classes; use 2 to {available}"
            )
        if labels == "string" and classes > STRING_SYMBOLS**STRING_LENGTH:
            raise ConfigError(f"--classes {classes}: there are only 3125 string labels")
        if not 1 <= instances <= drawings:
            raise ConfigError(
                f"--instances {instances}: each character has {drawings} drawings; use 1 to {drawings}"
            )
        if part not in STREAMS:
            raise ConfigError(f"unknown part {part!r}: use one of {sorted(STREAMS)}")
        self.images = images.numpy()  # NumPy gathers stay on one thread (see FewShotDataset.gather)
        self.classes, self.instances, self.label_kind = classes, instances, labels
        self.seed, self.part, self.max_shift = seed, part, max_shift
        self.next_episode = 0

    @property
    def length(self) -> int:
        """Steps per episode."""
        return self.classes * self.instances

    @property
    def digits(self) -> int:
        return self.classes if self.label_kind == "onehot" else STRING_SYMBOLS

    def protocol(self) -> dict:
        return {
            "part": self.part,
            "available_classes": int(self.images.shape[0]),
            "classes": self.classes,
            "instances": self.instances,
            "length": self.length,
            "labels": self.label_kind,
            "max_shift": self.max_shift,
            "seed": self.seed,
        }

    def _draw(self, index: int) -> tuple[np.ndarray, ...]:
        """Episode ``index``: class, drawing, label digits, instance and shift of every step."""
        rng = np.random.default_rng([STREAMS[self.part], self.seed, index])
        available, drawings = self.images.shape[:2]
        chosen = rng.choice(available, self.classes, replace=False)  # (C,)
        drawing = np.argsort(rng.random((self.classes, drawings)), axis=1)[:, : self.instances]
        if self.label_kind == "onehot":  # a fresh class -> label map every episode
            digits = rng.permutation(self.classes)[:, None]  # (C, 1)
        else:  # strings drawn without repetition within the episode
            codes = rng.choice(STRING_SYMBOLS**STRING_LENGTH, self.classes, replace=False)
            digits = string_characters(codes)  # (C, 5)
        order = rng.permutation(self.length)  # shuffled presentation order
        cls = np.repeat(np.arange(self.classes), self.instances)[order]  # (T,) class of each step
        # instance k of a class = the k-th time it appears in the shuffled order
        seen = np.cumsum(cls[:, None] == np.arange(self.classes), axis=0)  # (T, C)
        instance = seen[np.arange(self.length), cls].astype(np.int64)
        shift = rng.integers(-self.max_shift, self.max_shift + 1, (self.length, 2))
        return chosen[cls], drawing[cls, instance - 1], digits[cls], instance, shift

    def episodes(self, indices) -> Sequences:
        """The episodes ``indices`` of this stream, as one batch."""
        parts = [self._draw(int(i)) for i in indices]
        cls, drawing, digits, instance, shift = (np.stack(p) for p in zip(*parts))
        images = self.images[cls, drawing]  # (B, T, H, W) uint8
        if self.max_shift:
            images = _translate(images, shift, self.max_shift)
        x = np.multiply(
            images.reshape(*images.shape[:2], -1), np.float32(1 / 255), dtype=np.float32
        )
        return Sequences(
            torch.from_numpy(x),
            torch.from_numpy(digits.astype(np.int64)),
            torch.from_numpy(instance),
            self.digits,
        )

    def sample_batch(self, n: int) -> Sequences:
        batch = self.episodes(range(self.next_episode, self.next_episode + n))
        self.next_episode += n
        return batch

    def sample(self) -> Sequences:
        return self.sample_batch(1)

    def fixed(self, count: int, batch: int = 100):
        """Episodes ``0..count-1`` of this stream in batches of at most ``batch``."""
        for start in range(0, count, batch):
            yield self.episodes(range(start, min(start + batch, count)))

    def state(self) -> dict:
        return {"next_episode": self.next_episode}

    def set_state(self, state: dict) -> None:
        self.next_episode = int(state["next_episode"])


def _translate(images: np.ndarray, shift: np.ndarray, pad: int) -> np.ndarray:
    """Shift each ``(H, W)`` image of ``images (B, T, H, W)`` by ``shift (B, T, 2)`` pixels
    (rows, columns), filling with blank paper."""
    b, t, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = pad - shift[..., 0, None] + np.arange(h)  # (B, T, H)
    cols = pad - shift[..., 1, None] + np.arange(w)  # (B, T, W)
    bi = np.arange(b)[:, None, None, None]
    ti = np.arange(t)[None, :, None, None]
    return padded[bi, ti, rows[..., :, None], cols[..., None, :]]
