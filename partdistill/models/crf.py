"""Dense-CRF refinement of mined part label maps (PartDistillation §4.2, the reference's settings).

K-means assigns full-resolution pixels through bilinearly upsampled stride-8 features, so part
borders are blurry and follow the feature grid rather than the image. The reference cleans them
up with a fully connected CRF (Krähenbühl & Koltun 2011, ``pydensecrf``):

- labels are background + k parts: label map value -1 → CRF label 0, part i → CRF label i + 1;
- unary ``unary_from_labels(labels, k + 1, gt_prob=0.7, zero_unsure=False)``;
- ``addPairwiseGaussian(sxy=3, compat=3)`` and ``addPairwiseBilateral(sxy=20, srgb=13, compat=10)``,
  both with ``DIAG_KERNEL`` and ``NORMALIZE_SYMMETRIC``;
- 10 mean-field iterations, then the argmax label.

Three deliberate departures from the reference script:

- it works on any (H, W): pydensecrf's constructor is ``DenseCRF2D(width, height, labels)`` and
  wants a C-contiguous uint8 (H, W, 3) image; the reference swapped W/H and so asserted square
  (padded) inputs;
- it runs on a crop around the object's box (+ ``margin`` pixels, 16 by default) instead of the
  whole image, for speed: the bilateral kernel's spatial reach (sxy=20) makes pixels further away
  matter little, and the clamp below removes anything outside the object anyway;
- after inference a part may not leave its object: pixels outside the object mask are forced to
  background (-1). Object pixels the CRF calls background stay background (-1), as in the
  reference, so a refined part can shrink but never grow beyond the object.

Only numpy and pydensecrf are imported here (no torch), so worker processes start quickly.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CRFItem", "CRFParams", "crf_box", "dense_crf", "make_pool", "refine", "refine_many"]


@dataclass(frozen=True)
class CRFParams:
    """The CRF's settings; the defaults are the reference's."""

    gt_prob: float = 0.7
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 20.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10
    margin: int = 16  # pixels of context around the object's box that the CRF sees

    def __post_init__(self) -> None:
        if not 0.0 < self.gt_prob < 1.0:
            raise ValueError(f"crf gt_prob must be in (0, 1), got {self.gt_prob}")
        if self.iterations < 0 or self.margin < 0:
            raise ValueError(f"crf iterations and margin must be >= 0, got {self.iterations}, {self.margin}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CRFParams:
        """From the `mining.crf` config section (keys ``gt_prob``, ``gaussian={sxy, compat}``,
        ``bilateral={sxy, srgb, compat}``, ``iterations``, ``margin``); missing keys keep defaults."""
        d = cls()
        g, b = dict(cfg.get("gaussian", {})), dict(cfg.get("bilateral", {}))
        return cls(
            gt_prob=float(cfg.get("gt_prob", d.gt_prob)),
            gaussian_sxy=float(g.get("sxy", d.gaussian_sxy)),
            gaussian_compat=float(g.get("compat", d.gaussian_compat)),
            bilateral_sxy=float(b.get("sxy", d.bilateral_sxy)),
            bilateral_srgb=float(b.get("srgb", d.bilateral_srgb)),
            bilateral_compat=float(b.get("compat", d.bilateral_compat)),
            iterations=int(cfg.get("iterations", d.iterations)),
            margin=int(cfg.get("margin", d.margin)),
        )


@dataclass
class CRFItem:
    """One refinement job.

    image:   uint8 (H, W, 3) RGB
    labels:  integer (H, W) part label map, -1 background, 0..n_parts-1 parts
    mask:    bool (H, W) object mask (default: ``labels >= 0``); the result never leaves it
    n_parts: k, the number of part labels (default: ``labels.max() + 1``); a part absent from
             ``labels`` still counts, so the unary's "wrong label" energy matches k-means' k
    """

    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None = None
    n_parts: int | None = None


def crf_box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """The object's box grown by ``margin`` and clipped to the image: (y0, y1, x0, x1), end
    exclusive; ``None`` for an empty mask. ``mask``: bool (H, W)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h),
            max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w))


def dense_crf(image: np.ndarray, labels: np.ndarray, n_parts: int, params: CRFParams = CRFParams()) -> np.ndarray:
    """The bare CRF on the whole of ``image`` (no crop, no clamp to the object).

    image:   uint8 (H, W, 3) RGB, any H and W
    labels:  integer (H, W), -1 background, 0..n_parts-1 parts
    Returns int16 (H, W), -1 background, 0..n_parts-1 parts.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = labels.shape
    if n_parts < 1:
        return np.full((h, w), -1, np.int16)
    n_labels = n_parts + 1  # CRF label 0 is the background
    # pydensecrf reads the image's raw buffer as H rows of W RGB triplets: anything else (a view,
    # float, BGRA) would be silently misread.
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    unary = unary_from_labels(labels.astype(np.int64) + 1, n_labels, gt_prob=params.gt_prob, zero_unsure=False)
    crf = dcrf.DenseCRF2D(w, h, n_labels)  # (width, height): the reference swapped these
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat,
                            kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                             compat=params.bilateral_compat, kernel=dcrf.DIAG_KERNEL,
                             normalization=dcrf.NORMALIZE_SYMMETRIC)
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)  # (n_labels, H * W), row-major pixels
    return (q.argmax(0).reshape(h, w) - 1).astype(np.int16)


@dataclass
class _Crop:
    """What a worker needs: the cropped image and labels (small to pickle) and the box."""

    image: np.ndarray   # uint8 (h, w, 3)
    labels: np.ndarray  # int16 (h, w)
    n_parts: int
    params: CRFParams


def _prepare(item: CRFItem, params: CRFParams) -> tuple[_Crop | None, np.ndarray, tuple[int, int, int, int] | None]:
    """Validate an item and cut its crop. Returns (crop or None when there is nothing to refine,
    the bool (H, W) object mask, the box)."""
    labels = np.asarray(item.labels)
    image = np.asarray(item.image)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if image.shape != (*labels.shape, 3):
        raise ValueError(f"image must be (H, W, 3) = {(*labels.shape, 3)} to match the labels, got {image.shape}")
    if image.dtype != np.uint8:
        # no silent rescaling: a float image in [0, 1] would look black to the bilateral kernel
        raise TypeError(f"image must be uint8 RGB, got {image.dtype}")
    mask = labels >= 0 if item.mask is None else np.asarray(item.mask, bool)
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {mask.shape} differs from labels shape {labels.shape}")
    n_parts = int(labels.max()) + 1 if item.n_parts is None else int(item.n_parts)
    if labels.size and (labels.min() < -1 or labels.max() >= max(n_parts, 0)):
        raise ValueError(f"labels must lie in -1..{n_parts - 1}, got {labels.min()}..{labels.max()}")
    box = crf_box(mask, params.margin)
    if box is None or n_parts < 1:
        return None, mask, box
    y0, y1, x0, x1 = box
    crop = _Crop(np.ascontiguousarray(image[y0:y1, x0:x1]), labels[y0:y1, x0:x1].astype(np.int16), n_parts, params)
    return crop, mask, box


def _run_crop(crop: _Crop) -> np.ndarray:
    """Worker entry point (module level, so it pickles): the CRF on one crop."""
    return dense_crf(crop.image, crop.labels, crop.n_parts, crop.params)


def _paste(refined: np.ndarray | None, mask: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """The crop's result back into a full int16 (H, W) map, clamped to the object mask."""
    out = np.full(mask.shape, -1, np.int16)
    if refined is not None and box is not None:
        y0, y1, x0, x1 = box
        out[y0:y1, x0:x1] = refined
    out[~mask] = -1  # a part may not leave its object
    return out


def refine(
    image: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    n_parts: int | None = None,
    params: CRFParams = CRFParams(),
) -> np.ndarray:
    """Refine one part label map with the dense CRF on a crop around its object.

    image: uint8 (H, W, 3) RGB; labels: integer (H, W), -1 background, 0..n_parts-1;
    mask: bool (H, W) object mask (default ``labels >= 0``); n_parts: k (default ``labels.max() + 1``).
    Returns int16 (H, W): -1 outside the object and where the CRF chose background, else 0..n_parts-1.
    """
    crop, m, box = _prepare(CRFItem(image, labels, mask, n_parts), params)
    return _paste(None if crop is None else _run_crop(crop), m, box)


def make_pool(processes: int) -> ProcessPoolExecutor | None:
    """A process pool for :func:`refine_many`, or ``None`` for ``processes <= 1`` (in-process).

    Workers are forked where the platform allows it: they only run numpy and pydensecrf (no torch,
    no locks of the parent's threads), and forking skips re-importing the caller's modules."""
    if processes <= 1:
        return None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_die_with_parent)


def _die_with_parent() -> None:
    """In a pool worker: ask Linux to SIGKILL this worker when its parent dies. A parent killed
    with SIGKILL cannot shut its pool down, and its idle workers would otherwise wait forever."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def refine_many(
    items: Sequence[CRFItem],
    processes: int = 1,
    params: CRFParams = CRFParams(),
    executor: Executor | None = None,
) -> list[np.ndarray]:
    """:func:`refine` over many items, in input order: int16 (H_i, W_i) per item.

    ``processes`` > 1 runs the CRFs in a ProcessPoolExecutor of that many workers (1: in this
    process); pass ``executor`` to reuse a pool (see :func:`make_pool`) across calls. Crops are cut
    and results clamped here, so only crops travel between processes. The CRF is deterministic,
    so the result does not depend on ``processes``."""
    prepared = [_prepare(it, params) for it in items]
    jobs = [crop for crop, _, _ in prepared if crop is not None]
    own = None
    if executor is None and processes > 1 and len(jobs) > 1:
        executor = own = make_pool(min(processes, len(jobs)))
    try:
        if executor is None:
            results = [_run_crop(c) for c in jobs]
        else:
            # a few jobs per message: a crop takes milliseconds, so per-task IPC would dominate
            workers = getattr(executor, "_max_workers", processes) or 1
            chunk = max(1, len(jobs) // (4 * workers))
            results = list(executor.map(_run_crop, jobs, chunksize=chunk))
    finally:
        if own is not None:
            own.shutdown()
    it = iter(results)
    return [_paste(next(it) if crop is not None else None, m, box) for crop, m, box in prepared]
