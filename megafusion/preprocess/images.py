"""Image references -> decoded RGB PIL images, with the checks that turn bad images into rejects:
missing_image_file (path absent or unreadable), undecodable_image (bytes PIL cannot fully decode, truncated files
included) and image_too_small (shorter side below the minimum)."""

from __future__ import annotations

import io
import warnings

from megafusion.preprocess.records import ImageRef
from megafusion.preprocess.rejects import Rejected


def load_image(ref: ImageRef, min_size: int = 0):
    from PIL import Image

    data = ref.data
    if data is None:
        try:
            with open(ref.path, "rb") as f:  # no isfile() check: pipes and special files are read like files
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as exc:
            raise Rejected("missing_image_file", f"{ref.path}: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            image = image.convert("RGB")
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ValueError)
        raise Rejected("undecodable_image", f"{ref.describe()}: {type(exc).__name__}: {exc}") from None
    if min(image.size) < min_size:
        raise Rejected("image_too_small", f"{ref.describe()}: {image.size[0]}x{image.size[1]} is below "
                                          f"--min-image-size {min_size}")
    return image
