"""The GPU data path (data.decode=gpu): FFCV reads the stored bytes, the GPU decodes each image once and cuts every
view of it in fused kernels (kernels/crop.py).

    host (FFCV threads)   ImageBytesDecoder: per sample [16-byte header | stored bytes], no decoding
    host -> device        one upload of the batch buffer (raw pixels) and nvJPEG's batched decode (JPEGs)
    device                Ragged images -> random_resized_crops + ViewAugment.sample (per view, per sample)
                          -> crop_views: [B, 3, S, S] normalised views, channels-last

Raw-pixel betons skip decoding altogether; JPEG betons are decoded by torchvision.io.decode_jpeg on CUDA (batched,
once per image however many views are cut). Mixed betons (write_mode proportion/smart) work: each image says its mode.
The header holds (byte count, height, width, mode) as little-endian int32.
"""
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import memcpy
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from kernels.crop import Crops, Ragged, crop_views, random_resized_crops

HEADER = 16  # bytes: int32 byte count, height, width, mode


def max_image_bytes(path):
    """The largest stored sample of a beton (an upper bound for its images' bytes)."""
    from ffcv.reader import Reader
    return int(Reader(path).alloc_table["size"].max())


class ImageBytesDecoder(SimpleRGBImageDecoder):
    """FFCV decoder for an RGBImageField that copies the stored bytes (raw pixels or JPEG) of each sample after a
    header; output uint8 [B, HEADER + max_bytes]. (A subclass of FFCV's image decoder only because the Loader
    accepts nothing else as an image field's first operation.)"""

    def __init__(self, max_bytes):
        super().__init__()
        self.max_bytes = int(max_bytes)

    def declare_state_and_memory(self, previous_state):
        shape = (HEADER + self.max_bytes,)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                AllocationQuery(shape, np.dtype("<u1")))

    def generate_code(self):
        mem_read = self.memory_read
        my_memcpy = Compiler.compile(memcpy)
        my_range = Compiler.get_iterator()
        max_bytes = self.max_bytes

        def decode(batch_indices, destination, metadata, storage_state):
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                n = min(data.shape[0], max_bytes)
                out = destination[dst_ix]
                height, width, mode = np.int64(field["height"]), np.int64(field["width"]), np.int64(field["mode"])
                for byte in range(4):  # little-endian int32s
                    out[byte] = (n >> (8 * byte)) & 255
                    out[4 + byte] = (height >> (8 * byte)) & 255
                    out[8 + byte] = (width >> (8 * byte)) & 255
                    out[12 + byte] = (mode >> (8 * byte)) & 255
                my_memcpy(data[:n], out[HEADER:HEADER + n])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def upload(batch, device):
    """uint8 [B, HEADER + M] from ImageBytesDecoder -> Ragged images on `device` (one decode per JPEG)."""
    import torchvision.io as tio
    B, row = batch.shape
    header = batch[:, :HEADER].contiguous().view(torch.int32).long()                 # [B, 4] on the host
    n, h, w, mode = header.unbind(1)
    if bool((n > row - HEADER).any()):
        raise ValueError("an image's bytes were cut: ImageBytesDecoder's max_bytes is too small for this beton")
    flat = batch.to(device, non_blocking=True).reshape(-1)                           # raw images stay where they are
    offset = torch.arange(B) * row + HEADER
    strides = [torch.ones(B, dtype=torch.long), 3 * w, torch.full((B,), 3)]        # HWC
    jpg = (mode == IMAGE_MODES["jpg"]).nonzero().view(-1).tolist()
    if jpg:
        decoded = tio.decode_jpeg([batch[i, HEADER:HEADER + int(n[i])] for i in jpg], device=device,
                                  mode=tio.ImageReadMode.RGB)                         # [3, h, w] each
        sizes = torch.tensor([d.numel() for d in decoded])
        offset[jpg] = flat.numel() + torch.cumsum(sizes, 0) - sizes
        flat = torch.cat([flat] + [d.reshape(-1) for d in decoded])
        for i, d in zip(jpg, decoded):
            h[i], w[i] = d.shape[1], d.shape[2]
            strides[0][i], strides[1][i], strides[2][i] = d.shape[1] * d.shape[2], d.shape[2], 1   # CHW
    return Ragged(flat, *(t.to(device, non_blocking=True) for t in (offset, h, w, *strides)))


def sample_views(heights, widths, augments, size, scale, ratio=(3 / 4, 4 / 3), generator=None, flip_prob=0.5):
    """Parameters of V = len(augments) views of each of B images, view-major (view v of image b is n = v B + b):
    Crops (random_resized_crops) and the colour dict of each view's ViewAugment.sample, concatenated."""
    B, V = heights.shape[0], len(augments)
    crops = random_resized_crops(heights.repeat(V), widths.repeat(V), scale, ratio, generator, flip_prob)
    crops = crops._replace(src=torch.arange(B, device=heights.device).repeat(V))
    params = [aug.sample(B, size, generator, heights.device) for aug in augments]
    color = {k: torch.cat([p[k] for p in params]) for k in params[0] if k != "kernel_size"}
    color["kernel_size"] = params[0]["kernel_size"]
    return crops, color


class GPUViews:
    """Cuts V views per image (each with its own ViewAugment) from Ragged images, on the images' device."""

    def __init__(self, augments, scale, ratio=(3 / 4, 4 / 3), flip_prob=0.5, out_dtype=torch.bfloat16,
                 backend="auto"):
        self.augments, self.scale, self.ratio = tuple(augments), tuple(scale), tuple(ratio)
        self.flip_prob, self.out_dtype, self.backend = flip_prob, out_dtype, backend

    def __call__(self, images, size, generator=None):
        """Returns a tuple of V tensors [B, 3, size, size] (normalised, channels-last)."""
        B, V = images.height.shape[0], len(self.augments)
        crops, color = sample_views(images.height, images.width, self.augments, size, self.scale, self.ratio,
                                    generator, self.flip_prob)                            # view-major
        mean, std = self.augments[0].mean, self.augments[0].std
        out = crop_views(images, crops, color, size, mean, std, self.out_dtype, self.backend)
        return tuple(out[v * B:(v + 1) * B] for v in range(V))


__all__ = ["Crops", "GPUViews", "ImageBytesDecoder", "max_image_bytes", "upload"]
