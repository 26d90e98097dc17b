"""A small seeded sample of the manifest's rows, and the shapes the model sees on them.

Layer costs and activations depend on the data: a text layer's cost grows with the tokens of
its batch, padded to the batch's longest caption (:meth:`~ray_jobs.model.text_ops.TextProcessing.encode`),
not to the tokenizer's maximum length. The stage layout (``num_stages: auto``) and ``tune`` are
balanced on this sample: a few row groups picked with a fixed seed, a few rows of each; the
captions are tokenized with the checkpoint's own tokenizer. An image tower's token count is
fixed by its processor (every image is resized, or its patches padded to the maximum), so image
sizes change the preprocessing's cost, not the layers': ``tune`` opens the sampled images and
reports their sizes beside the text lengths; the layout and the jobs do not (every image is
read once, by the pipeline).
"""

from __future__ import annotations

import io
import random
import statistics
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

#: rows, row groups and seed of the sample the layout and ``tune`` are balanced on
SAMPLE_ROWS = 32
SAMPLE_ROW_GROUPS = 4
SAMPLE_SEED = 0
#: resamples of the sample that estimate a batch's longest caption
_RESAMPLES = 64


@dataclass(frozen=True)
class DataSample:
    """Captions and image URIs of sampled manifest rows, and where they came from."""

    texts: tuple[str, ...]
    image_uris: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.image_uris):
            raise ValueError("a data sample needs one image URI per caption")

    @property
    def rows(self) -> int:
        return len(self.texts)


def manifest_fragments(files) -> list[tuple[str, Sequence[int]]]:
    """``(file URI, row-group indices)`` of every manifest file with rows (:class:`ManifestFile`)."""
    return [(f.uri, range(len(f.row_group_rows))) for f in files if f.rows]


def sample_rows(
    fragments: Iterable[tuple[str, Sequence[int]]],
    rows: int = SAMPLE_ROWS,
    seed: int = SAMPLE_SEED,
    row_groups: int = SAMPLE_ROW_GROUPS,
) -> DataSample:
    """*rows* rows from *row_groups* row groups of *fragments* (``(uri, row-group indices)``),
    all picked with *seed*: the same manifest gives the same sample."""
    import pyarrow.parquet as pq

    from ray_jobs import storage

    rng = random.Random(seed)
    groups = [(uri, rg) for uri, rgs in fragments for rg in rgs]
    chosen = sorted(rng.sample(groups, min(row_groups, len(groups))))
    texts: list[str] = []
    uris: list[str] = []
    per_group = -(-rows // max(1, len(chosen)))
    for uri, rg in chosen:
        fs, path = storage.filesystem_for(uri)
        with fs.open(path, "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(rg, columns=["text", "image_uri"])
        text, image = table.column("text").to_pylist(), table.column("image_uri").to_pylist()
        for i in sorted(rng.sample(range(len(text)), min(per_group, len(text)))):
            texts.append(text[i] or "")
            uris.append(image[i] or "")
    source = f"{len(texts)} rows of {len(chosen)} row group(s) (seed {seed})"
    return DataSample(tuple(texts[:rows]), tuple(uris[:rows]), source)


@dataclass(frozen=True)
class DataShapes:
    """Per sampled row: its caption's tokens (after truncation, with special tokens) and its
    image's size (width, height) where it opened."""

    text_tokens: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...]
    text_max_length: int
    pad_to_max_length: bool
    source: str

    def text_seq(self, batch_size: int, seed: int = SAMPLE_SEED) -> float:
        """Expected tokens of a batch of *batch_size* rows: its longest caption (the encoder pads
        to it), or the maximum length where the tower pads every caption to it."""
        if self.pad_to_max_length or not self.text_tokens:
            return float(self.text_max_length)
        rng = random.Random(seed)
        draws = [max(rng.choices(self.text_tokens, k=batch_size)) for _ in range(_RESAMPLES)]
        return statistics.fmean(draws)

    def to_dict(self) -> dict:
        tokens = sorted(self.text_tokens)
        out = {"source": self.source, "rows": len(tokens), "text_max_length": self.text_max_length}
        if tokens:
            out["text_tokens"] = {"median": statistics.median(tokens), "max": tokens[-1]}
        if self.image_sizes:
            out["image_px"] = {
                "median_width": statistics.median(w for w, _ in self.image_sizes),
                "median_height": statistics.median(h for _, h in self.image_sizes),
                "opened": len(self.image_sizes),
            }
        return out

    def line(self, batch_size: int) -> str:
        d = self.to_dict()
        text = (
            f"caption tokens median {d['text_tokens']['median']:g}, max {d['text_tokens']['max']} of "
            f"{self.text_max_length}, a batch of {batch_size} pads to ~{self.text_seq(batch_size):.0f}"
            if "text_tokens" in d
            else "no captions"
        )
        img = d.get("image_px")
        image = f"images median {img['median_width']:g}x{img['median_height']:g} px" if img else "no image opened"
        return f"data sample: {self.source}: {text}; {image}"


def _image_size(uri: str, max_bytes: int) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    from ray_jobs.errors import TransientFailure
    from ray_jobs.job.preprocess import RowRejected, fetch_bytes

    try:
        data = fetch_bytes(uri, max_bytes, attempts=1)
    except (RowRejected, TransientFailure, OSError):
        return None  # a bad row is the job's to reject; the sample only skips it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, ValueError):
        return None  # the job rejects it with its reason


def token_counts(text, texts: Sequence[str]) -> tuple[int, ...]:
    """Tokens of each caption as *text* (:class:`~ray_jobs.model.text_ops.TextProcessing`)
    encodes it, truncated, special tokens included. A fast tokenizer's ``tokenizer.json`` is read
    with the ``tokenizers`` library alone (no transformers, no torch: a job driver's start stays
    short); otherwise the checkpoint's tokenizer through transformers."""
    import os

    path = os.path.join(text.tokenizer_dir, "tokenizer.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(path)
        tokenizer.no_padding()
        tokenizer.enable_truncation(text.max_length)
        return tuple(len(e.ids) for e in tokenizer.encode_batch(list(texts)))
    _, mask = text.encode(text.load_tokenizer(), list(texts))
    return tuple(int(n) for n in mask.sum(axis=1))


def measure_shapes(
    ckpt, sample: DataSample, max_image_bytes: int = 64 * 1024 * 1024, open_images: bool = True
) -> DataShapes:
    """Tokenize *sample*'s captions with *ckpt*'s tokenizer and, with *open_images*, open its
    images (sizes only). The layout needs only the captions (an image tower's tokens are fixed
    by its processor): ``check_inputs`` and the job's preflight pass ``open_images=False``, so
    the control plane never fetches a URI from the manifest's rows and every image is read
    once, by the pipeline."""
    text = ckpt.text_processing
    tokens = token_counts(text, sample.texts) if sample.rows else ()
    sizes = []
    if open_images:
        with ThreadPoolExecutor(max_workers=8) as pool:
            sizes = [s for s in pool.map(lambda u: _image_size(u, max_image_bytes), sample.image_uris) if s]
    return DataShapes(tokens, tuple(sizes), int(text.max_length), bool(text.pad_to_max_length), sample.source)
