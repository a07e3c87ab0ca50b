"""Reading images and label maps, with errors that name the file.

Images are read the way detectron2's ``read_image`` does (PIL, EXIF orientation applied, converted to
RGB), labels the way its ``SemSegEvaluator`` reads ground truth (``np.asarray`` of the PNG: for a
palette ("P") PNG that gives the palette *indices*, which is how Mapillary Vistas v1.2 stores its class
ids). Nothing here skips a file silently: a missing, unreadable or malformed file raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Single-channel PIL modes accepted for label maps ("P": palette indices are the class ids).
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
# EXIF orientations that swap height and width (transpose / rotations by 90 degrees).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


class DatasetError(ValueError):
    """A dataset file or folder is malformed, inconsistent or unusable. The message names it."""


class MissingDataError(DatasetError, FileNotFoundError):
    """An expected dataset file or folder does not exist. The message names it."""


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily with PIL (header only), mapping every failure to a named error."""
    if not path.is_file():
        raise MissingDataError(f"{path}: file does not exist")
    try:
        return Image.open(path)
    except UnidentifiedImageError as e:
        raise DatasetError(f"{path}: not a readable image ({e})") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot open ({e})") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """Size of an image as ``read_image`` would return it, reading only the file header.

    Args:
        path: image file.
    Returns:
        (height, width), after the EXIF orientation is applied (rotated JPEGs swap the two).
    """
    path = Path(path)
    with _open(path) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not hide the size
            orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return int(height), int(width)


def label_size(path: str | Path) -> tuple[int, int]:
    """Size of a label map from its header: (height, width). Label maps carry no EXIF orientation."""
    path = Path(path)
    with _open(path) as im:
        width, height = im.size
    return int(height), int(width)


def image_sizes(paths: Sequence[str | Path], *, num_threads: int = 8) -> list[tuple[int, int]]:
    """``image_size`` of many files, reading the headers in a thread pool (I/O bound).

    Args:
        paths: image files.
        num_threads: worker threads; 1 reads sequentially.
    Returns:
        one (height, width) per path, in the same order.
    """
    if num_threads <= 1 or len(paths) < 64:
        return [image_size(p) for p in paths]
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        return list(pool.map(image_size, paths))


def check_file(path: str | Path, *, label: bool = False) -> str | None:
    """Check that an image or label file is readable and intact, without decoding its pixels.

    Opens the header and runs PIL's ``verify()``, which for PNG reads every chunk and checks its CRC (a
    truncated or overwritten file fails). Labels must also be single-channel.

    Returns:
        None when the file is fine, else a message naming the file and the problem.
    """
    path = Path(path)
    try:
        with _open(path) as im:
            if label and im.mode not in LABEL_MODES:
                return f"{path}: label maps must be single-channel id images, got mode {im.mode!r}"
            im.verify()
    except DatasetError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds (SyntaxError, OSError, struct.error, ...)
        return f"{path}: corrupt {'label map' if label else 'image'} ({e})"
    return None


def check_files(records: Sequence[dict], *, num_threads: int = 8, limit: int = 20) -> list[str]:
    """:func:`check_file` on every image and label of some records (in a thread pool; I/O bound).

    Args:
        records: dataset records (``file_name``, optional ``sem_seg_file_name``).
        num_threads: worker threads.
        limit: stop collecting after this many problems.
    Returns:
        the problems found (at most ``limit``), in record order.
    """
    jobs = [(r["file_name"], False) for r in records]
    jobs += [(r["sem_seg_file_name"], True) for r in records if r.get("sem_seg_file_name")]
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = pool.map(lambda job: check_file(job[0], label=job[1]), jobs)
        problems = []
        for problem in results:
            if problem is not None:
                problems.append(problem)
                if len(problems) >= limit:
                    break
    return problems


def read_image(path: str | Path, format: Literal["RGB", "BGR"] = "RGB") -> np.ndarray:
    """Read an image file fully.

    Args:
        path: image file (any format PIL reads; grey or palette images are converted).
        format: channel order of the result.
    Returns:
        (H, W, 3) uint8 array, EXIF orientation applied (as detectron2's ``read_image``).
    """
    if format not in ("RGB", "BGR"):
        raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
    path = Path(path)
    im = _open(path)
    try:
        with im:
            im = ImageOps.exif_transpose(im)
            array = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt data surfaces on load
        raise DatasetError(f"{path}: corrupt or unreadable image ({e})") from e
    if format == "BGR":
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array)


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label map.

    Args:
        path: PNG of class ids (mode "L", "P" (palette indices are the ids) or 16/32-bit integer).
    Returns:
        (H, W) int64 array of the stored ids.
    Raises:
        MissingDataError: the file does not exist.
        DatasetError: unreadable, or not single-channel (an RGB colour rendering is not a label map).
    """
    path = Path(path)
    im = _open(path)
    try:
        with im:
            if im.mode not in LABEL_MODES:
                raise DatasetError(
                    f"{path}: label maps must be single-channel id images (modes {', '.join(LABEL_MODES)}), "
                    f"got mode {im.mode!r}; colour renderings such as *_color.png are not labels"
                )
            array = np.asarray(im)
    except DatasetError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: corrupt or unreadable label map ({e})") from e
    if array.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D label map, got shape {array.shape}")
    return array.astype(np.int64)


def check_label_values(
    label: np.ndarray, num_classes: int, ignore_label: int, *, path: str | Path | None = None
) -> None:
    """Raise if a label map holds ids outside ``[0, num_classes)`` that are not ``ignore_label``.

    Args:
        label: (H, W) integer label map.
        num_classes: number of classes of the dataset (length of its class-name JSON).
        ignore_label: the dataset's ignore id (255; 65 for Mapillary Vistas).
        path: the file the label came from, named in the error.
    """
    values = np.unique(label)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_label)]
    if bad.size:
        where = f"{path}: " if path is not None else ""
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise DatasetError(
            f"{where}label ids out of range: {shown}{' ...' if bad.size > 10 else ''} "
            f"(expected 0..{num_classes - 1} or ignore {ignore_label})"
        )


def write_label(path: str | Path, label: np.ndarray, *, palette: Iterable[int] | None = None) -> None:
    """Write an (H, W) label map with values in [0, 255] as an 8-bit PNG ("L", or "P" with ``palette``)."""
    label = np.asarray(label)
    if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"{path}: label must be 2-D with values in [0, 255]")
    data = np.ascontiguousarray(label.astype(np.uint8))
    if palette is None:
        im = Image.fromarray(data)  # 2-D uint8 -> mode "L"
    else:
        im = Image.frombytes("P", (data.shape[1], data.shape[0]), data.tobytes())  # values = indices
        im.putpalette(list(palette))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
