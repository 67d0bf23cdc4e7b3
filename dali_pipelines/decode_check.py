"""DALI's CPU image decoder as a yes/no check, one encoded image at a time (used by the index scan).

PIL and DALI's decoders (libjpeg-turbo, libpng, libwebp through nvImageCodec) do not reject exactly the
same damaged files, and a DALI pipeline stops for good on the first image it cannot decode. The scan
therefore decodes every image PIL accepted once more with DALI, so an index never lists one that
would stop a DALI run. A failed run leaves the pipeline unusable: the next check builds a new one.
"""
from __future__ import annotations

import numpy as np


class DaliDecodeCheck:
    """``check(data) -> None`` when DALI's CPU decoder reads ``data``, else the first line of its error."""

    def __init__(self):
        self._pipe = None
        self._encoded = None  # (n,) uint8: the image the next run decodes

    def __call__(self, data: bytes) -> str | None:
        self._encoded = np.frombuffer(data, dtype=np.uint8)
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.run()
        except RuntimeError as error:
            self._pipe = None
            # DALI's message is "... encountered:\n\n<what failed>\nCurrent pipeline object is no longer valid."
            cause = str(error).rpartition("encountered:")[2].replace("Current pipeline object is no longer valid.", "")
            return " ".join(cause.split()) or type(error).__name__
        return None

    def _build(self):
        from nvidia.dali import fn, pipeline_def

        from .augment import decode_whole

        # Synchronous, one sample: run() decodes exactly the image set just before it.
        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                      exec_pipelined=False)
        def decode():
            encoded = fn.external_source(source=lambda: [self._encoded], batch=True)
            return decode_whole(encoded, decoder_device="cpu")  # the loaders' decoder settings

        pipe = decode()
        pipe.build()
        return pipe
