"""The FFCV format's vocabulary: file names, the FFCV field of every array, how values are stored in a
field, the page size and the size of the .beton; what the writer and the reader of this format share."""

from __future__ import annotations

import numpy as np

from ...layout import SCALES_GROUP, Layout

__all__ = ["RECORD", "FORMAT_VERSION", "BETON", "MANIFEST", "SOURCES", "LABELS", "field_names", "variant_shapes",
           "array_dtypes", "beton_bytes"]

RECORD = "ffcv.json"  # the record that makes a folder an FFCV cache
FORMAT_VERSION = 1
BETON = "data.beton"
MANIFEST = "manifest.json"
SOURCES = "sources.json"
LABELS = "labels.npy"


def field_names(layout: Layout) -> dict[str, str]:
    """Array name -> FFCV field name (FFCV allows 16 bytes; teacher names are longer): 'latents', teacher
    i's tokens 'f<i>', its scales 's<i>' (int8 teachers), in the order of the file."""
    index = {t: i for i, t in enumerate(layout.teachers)}
    return {"latents": "latents", **{f"features/{t}": f"f{i}" for t, i in index.items()},
            **{f"{SCALES_GROUP}/{t}": f"s{index[t]}" for t in layout.quantized_teachers}}


def variant_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """The shape of one (row, variant) of every array (:meth:`Layout.variant_shapes`)."""
    return {k: shape for k, (shape, _) in layout.variant_shapes().items()}


def array_dtypes(layout: Layout) -> dict[str, np.dtype]:
    """The dtype of every array as read: the layout's, little-endian."""
    return {k: np.dtype(dtype).newbyteorder("<") for k, (_, dtype) in layout.variant_shapes().items()}


def _field_dtype(dtype: np.dtype) -> np.dtype:
    """How an array's values are stored in an FFCV field: float16 as its int16 bit patterns (FFCV's loader
    hangs on float16 fields), int8 and float32 as they are."""
    return np.dtype("<i2") if dtype == np.float16 else dtype


def _field_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of an array's FFCV field: a 1-D array (scales (T,)) is stored as (T, 1), because FFCV's
    decoder of 1-D fields leaves numba dispatchers whose finalizer fails ("Exception ignored ... KeyError")
    when collected; read back in the array's own shape."""
    return (*shape, 1) if len(shape) == 1 else tuple(shape)


def _page_size(layout: Layout) -> int:
    """The .beton's page: a power of two (at least 8 MiB) that holds at least two whole samples."""
    shapes, dtypes, names = variant_shapes(layout), array_dtypes(layout), field_names(layout)
    largest = max(int(np.prod(shapes[k])) * dtypes[k].itemsize for k in names) * (len(shapes) + 1)
    page = 1 << 23
    while page < 2 * largest:
        page <<= 1
    return page


def beton_bytes(layout: Layout) -> int:
    """At least the size of the .beton FFCV writes for ``layout``: the header, field descriptors and per-sample
    metadata padded to a page, then whole pages of samples (FFCV never splits a sample between pages)."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.types import FieldDescType, HeaderType, get_metadata_type

    shapes, dtypes, names = variant_shapes(layout), array_dtypes(layout), field_names(layout)
    page, samples = _page_size(layout), layout.num_rows * layout.variants
    fields = [NDArrayField(_field_dtype(dtypes[k]), _field_shape(shapes[k])) for k in names] + [IntField()]
    head = HeaderType.itemsize + FieldDescType.itemsize * len(fields) + get_metadata_type(fields).itemsize * samples
    sample = sum(int(np.prod(shapes[k])) * dtypes[k].itemsize for k in names)
    per_page = page // sample
    return -(-head // page) * page + -(-samples // per_page) * page


def _expected_fields(layout: Layout) -> dict[str, tuple[str, tuple[int, ...]]]:
    """FFCV field name -> (stored dtype, shape) of every field the manifest's layout implies, label last."""
    shapes, dtypes = variant_shapes(layout), array_dtypes(layout)
    out = {field: (_field_dtype(dtypes[k]).str, _field_shape(shapes[k])) for k, field in field_names(layout).items()}
    out["label"] = ("int", ())
    return out


def _field_descriptors(descriptors: np.ndarray) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """The fields a .beton's header describes, as :func:`_expected_fields` spells them (None: unreadable)."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.types import TYPE_ID_HANDLER
    from ffcv.utils import decode_null_terminated_string

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        for desc in descriptors:
            name = decode_null_terminated_string(desc["name"])
            handler = TYPE_ID_HANDLER.get(int(desc["type_id"]))
            if handler is IntField:
                out[name] = ("int", ())
            elif handler is NDArrayField:
                field = NDArrayField.from_binary(desc["arguments"])
                out[name] = (np.dtype(field.dtype).str, tuple(int(d) for d in field.shape))
            else:
                out[name] = (f"type {int(desc['type_id'])}", ())
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError, IndexError):
        return None
    return out
