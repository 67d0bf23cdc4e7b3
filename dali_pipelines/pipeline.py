"""The DALI pipeline: indexed WebDataset shards -> (pixels, caption bytes padded, caption length, source padded,
source length).

Samples are sharded by **global** rank (``shard_id=rank, num_shards=world_size``) over the good
samples listed in the ``.idx`` files that ``python -m bmc_fast.data.index`` writes, so a bad sample
never reaches the decoder. Captions leave the pipeline as raw UTF-8 bytes, zero-padded to the
batch's longest, with their lengths; the host tokenises them (``dali_loader.DaliLoader``). The source is the
reader's ``source_info`` of each sample (``<shard path>:<offset>:<member name>``), the same way: its name in
``--audit-samples`` files.
"""
from __future__ import annotations

from bmc_fast.data.samples import IMAGE_EXTENSIONS

from .augment import clip_augment

READER_NAME = "Reader"
IMAGE_EXT = ";".join(IMAGE_EXTENSIONS)  # one output: whichever image member the sample has (the index holds one)


def build_pipeline(shards: list[str], index_paths: list[str], *, image_size: int, train: bool, batch_size: int,
                   num_threads: int, device_id: int | None, rank: int = 0, world_size: int = 1, seed: int = 0,
                   pad_last_batch: bool = False, flip: bool = False, half: bool = False,
                   shuffle_buffer: int = 1000, checkpoint: bytes | None = None):
    """A built ``nvidia.dali.Pipeline``; ``device_id=None`` runs it on CPU, an int on that GPU (mixed decode).

    ``pad_last_batch``: end every epoch exactly at the rank's last sample (for one-pass iteration).
    Checkpointing is on (DALI's own: the reader's position and every random operator's state);
    ``checkpoint`` (from ``DALIGenericIterator.checkpoints()``) continues a saved stream.
    """
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed + rank,
                  prefetch_queue_depth=2, enable_checkpointing=True)
    def clip_pipeline():
        encoded, caption = fn.readers.webdataset(
            paths=shards, index_paths=index_paths, ext=[IMAGE_EXT, "txt"], missing_component_behavior="error",
            shard_id=rank, num_shards=world_size, random_shuffle=train, initial_fill=shuffle_buffer,
            pad_last_batch=pad_last_batch, name=READER_NAME)
        pixels = clip_augment(encoded, image_size=image_size, train=train, flip=flip, half=half,
                              decoder_device="cpu" if device_id is None else "mixed")
        source = fn.get_property(encoded, key="source_info")  # uint8 bytes of the reader's source_info
        return pixels, fn.pad(caption, fill_value=0), caption.shape(), fn.pad(source, fill_value=0), source.shape()

    pipe = clip_pipeline(checkpoint=checkpoint)
    pipe.build()
    return pipe


def build_stream_pipeline(source, *, image_size: int, train: bool, batch_size: int, num_threads: int,
                          device_id: int | None, half: bool = False):
    """A built pipeline that decodes and augments what ``source`` hands it (``stream_loader``): each call of
    ``source()`` returns a batch as (encoded images, crop anchors (x, y), crop shapes (width, height)), each a list
    of numpy arrays, and raises ``StopIteration`` at the end. The crop windows come from the stream (train: its
    RandomResizedCrop; eval: the whole image), so the graph holds no random state of its own."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=2)
    def stream_pipeline():
        encoded, anchor, shape = fn.external_source(source=source, num_outputs=3, batch=True,
                                                    dtype=[types.UINT8, types.FLOAT, types.FLOAT])
        return clip_augment(encoded, image_size=image_size, train=train, half=half, window=(anchor, shape),
                            decoder_device="cpu" if device_id is None else "mixed")

    pipe = stream_pipeline()
    pipe.build()
    return pipe
