"""The EXIF orientation of an opened image, read one way for the serializers and the image-file corruptions."""

from __future__ import annotations


def orientation(im) -> int:
    """The EXIF orientation tag (274) of an opened Pillow image: 1 as stored; 2-8 mirrored and/or turned to display.
    A value outside 1-8, or an EXIF block Pillow cannot read, counts as 1 (Pillow's own display ignores it too)."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block
        return 1
    return value if 1 <= value <= 8 else 1
