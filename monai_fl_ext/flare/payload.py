"""A FLARE filter that records how many bytes of model data a task result carries, as it arrived."""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

WIRE_BYTES = "wire_bytes"


def array_bytes(obj) -> int:
    """Bytes of every numpy array or tensor inside ``obj`` (nested dicts, lists)."""
    if isinstance(obj, dict):
        return sum(array_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(array_bytes(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    nbytes = getattr(obj, "nbytes", None)  # torch tensors
    return int(nbytes) if isinstance(nbytes, int) else 0


class PayloadMeter(Filter):
    """Puts the result's model payload size (data plus quantisation state) into its meta as ``wire_bytes``.

    Placed before the dequantiser on the server, it measures what the site actually sent.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # an error reply carries no model
            return shareable
        dxo.set_meta_prop(WIRE_BYTES, array_bytes(dxo.data) + array_bytes(dxo.get_meta_prop("quant_state", {})))
        return dxo.update_shareable(shareable)
