"""An FFCV decoder that decodes each image once and cuts every view from it (CPU data path).

Plain FFCV gets two views of an image from two pipelines on the same field, and each pipeline decodes the whole
JPEG again: two views cost two decodes. `MultiViewRandomResizedCropDecoder` decodes once into a scratch buffer
and draws `num_views` independent RandomResizedCrops (per sample, per view), each resized to `output_size` and
flipped with probability `flip_prob`.

Multi-crop: with `local_views` L > 0 the same decode also gives L local crops at `local_size` with scale
`local_scale` (DINO/SwAV's small crops; LoGo's local pair). Views of two sizes cannot share one [V, H, W, 3] array,
so each sample's row is then flat: the V global views' bytes, then the L local views' bytes; `split_views` reads
them back as [B, V, H, W, 3] and [B, L, h, w, 3] without a copy. The crops are drawn in that order (globals first),
so with L = 0 every crop is what it was before local views existed.

Output per batch: uint8 [B, V, H, W, 3] (no local views) or uint8 [B, V·H·W·3 + L·h·w·3]. Usage:

    pipelines = {"image": [MultiViewRandomResizedCropDecoder((224, 224), num_views=2), ToTensor()], ...}
    for views, labels in loader:       # views: [B, 2, 224, 224, 3] uint8
        v1, v2 = views.unbind(1)

`interpolation`: "area" resizes with FFCV's `resize_crop` (OpenCV INTER_AREA, antialiased; FFCV's choice);
"bilinear" uses `bilinear_resize_crop` below (OpenCV INTER_LINEAR semantics, no antialiasing; ~2x faster on
the CPU: 0.19 ms against 0.42 ms for a 300x300 -> 224x224 crop, measured on a 2-core AMD EPYC).

The crop sampler is FFCV's (torchvision's algorithm: up to 10 tries of area-scale and log-ratio, then a centre
crop fallback); scale=(c_min, 1) is the paper's crop-size knob. Raw-pixel betons skip the decode entirely.
"""
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler


def bilinear_resize_crop(source, start_row, end_row, start_col, end_col, destination):
    """Bilinear resize of source[start_row:end_row, start_col:end_col] ([h, w, 3] uint8) into destination
    ([H, W, 3] uint8), pixel centres aligned (OpenCV INTER_LINEAR; within 1 of cv2.resize). Same signature as
    ffcv.libffcv.resize_crop, so either can be compiled into the decoder."""
    h, w = end_row - start_row, end_col - start_col
    out_h, out_w = destination.shape[0], destination.shape[1]
    scale_y, scale_x = h / out_h, w / out_w
    col0 = np.empty(out_w, np.int64)  # left source column of each output column
    col1 = np.empty(out_w, np.int64)
    frac_x = np.empty(out_w, np.float32)
    for x in range(out_w):
        fx = max((x + 0.5) * scale_x - 0.5, 0.0)
        x0 = min(int(fx), w - 1)
        col0[x], col1[x], frac_x[x] = start_col + x0, start_col + min(x0 + 1, w - 1), fx - x0
    for y in range(out_h):
        fy = max((y + 0.5) * scale_y - 0.5, 0.0)
        y0 = min(int(fy), h - 1)
        wy = np.float32(fy - y0)
        row0, row1 = source[start_row + y0], source[start_row + min(y0 + 1, h - 1)]
        for x in range(out_w):
            a, b, t = col0[x], col1[x], frac_x[x]
            for c in range(3):
                upper = np.float32(row0[a, c]) + t * (np.float32(row0[b, c]) - np.float32(row0[a, c]))
                lower = np.float32(row1[a, c]) + t * (np.float32(row1[b, c]) - np.float32(row1[a, c]))
                destination[y, x, c] = np.uint8(upper + wy * (lower - upper) + np.float32(0.5))


class MultiViewRandomResizedCropDecoder(SimpleRGBImageDecoder):
    def __init__(self, output_size, num_views=2, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob=0.5,
                 interpolation="area", seed=None, local_size=None, local_views=0, local_scale=(0.05, 0.14)):
        super().__init__()
        if local_views < 0 or (local_views and local_size is None):
            raise ValueError(f"local_views must be >= 0 and needs local_size, got {local_views}, {local_size}")
        if not (0 < local_scale[0] <= local_scale[1] <= 1):
            raise ValueError(f"local_scale must satisfy 0 < min <= max <= 1, got {local_scale}")
        self.local_views = int(local_views)
        self.local_size = tuple(int(s) for s in local_size) if local_views else (1, 1)
        self.local_scale = np.array(local_scale, dtype=np.float64)
        # seed: None draws from the threads' RNGs (not reproducible); an int makes each sample's crops a function of
        # (seed, sample index, first and last index of its batch, its slot), so a RANDOM-order epoch (seeded) gives
        # the same views on every run whatever the thread scheduling: what exact resumption needs.
        self.seed = -1 if seed is None else int(seed) % 4294967291
        if interpolation not in ("area", "bilinear"):
            raise ValueError(f"interpolation must be 'area' or 'bilinear', got {interpolation!r}")
        self.interpolation = interpolation
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not (0 <= flip_prob <= 1):
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.output_size = tuple(int(s) for s in output_size)  # (H, W)
        self.num_views = int(num_views)
        self.scale = np.array(scale, dtype=np.float64)
        self.ratio = np.array(ratio, dtype=np.float64)
        self.flip_prob = float(flip_prob)

    def declare_state_and_memory(self, previous_state):
        max_width = np.uint64(self.metadata["width"].max())
        max_height = np.uint64(self.metadata["height"].max())
        out_shape = (self.num_views, self.output_size[0], self.output_size[1], 3)
        if self.local_views:  # flat rows: the global views' bytes, then the local views'
            out_shape = (int(np.prod(out_shape)) + self.local_views * self.local_size[0] * self.local_size[1] * 3,)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
                (AllocationQuery(out_shape, u8),  # the views
                 AllocationQuery((max_height * max_width * np.uint64(3),), u8)))  # one decoded image per sample

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop if self.interpolation == "area" else bilinear_resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        ratio, num_views, flip_prob, seed = self.ratio, self.num_views, self.flip_prob, self.seed
        # every view of a sample as (height, width, byte offset in its row, scale min, scale max): globals, locals
        sizes = [(self.output_size, self.scale)] * num_views + [(self.local_size, self.local_scale)] * self.local_views
        layout, offset = np.zeros((len(sizes), 5)), 0
        for v, ((height, width), (lo, hi)) in enumerate(sizes):
            layout[v] = height, width, offset, lo, hi
            offset += height * width * 3
        prime = 4294967291  # largest prime below 2**32: keeps every product below 2**63

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            rows = destination.reshape(destination.shape[0], -1)  # each sample's views, flat
            for dst_ix in my_range(len(batch_indices)):
                sample = batch_indices[dst_ix]
                field = metadata[sample]
                if seed >= 0:
                    h = (seed * 1000003 + sample) % prime
                    h = (h * 1000003 + batch_indices[0]) % prime
                    h = (h * 1000003 + batch_indices[len(batch_indices) - 1]) % prime
                    np.random.seed((h * 1000003 + dst_ix) % prime)
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:  # the one decode of this image
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for v in range(layout.shape[0]):
                    out_h, out_w, start = int(layout[v, 0]), int(layout[v, 1]), int(layout[v, 2])
                    i, j, h, w = get_crop_c(height, width, layout[v, 3:5], ratio)
                    view = rows[dst_ix, start:start + out_h * out_w * 3].reshape(out_h, out_w, 3)
                    resize_crop_c(image, i, i + h, j, j + w, view)
                    if np.random.rand() < flip_prob:
                        view[:] = view[:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def split_views(batch, num_views, size, local_views, local_size):
    """A batch of MultiViewRandomResizedCropDecoder rows (a tensor or array) -> (global views [B, V, H, W, 3], local
    views [B, L, h, w, 3] or None), views of the same memory (no copy). Rows without local views pass through."""
    if not local_views:
        return batch, None
    B, (H, W), (h, w) = batch.shape[0], size, local_size
    n = num_views * H * W * 3
    if batch.shape[1:] != (n + local_views * h * w * 3,):
        raise ValueError(f"rows of {tuple(batch.shape[1:])} bytes do not hold {num_views} views of {H}x{W} and "
                         f"{local_views} of {h}x{w}")
    return (batch[:, :n].reshape(B, num_views, H, W, 3), batch[:, n:].reshape(B, local_views, h, w, 3))


def join_views(views, local_views=None):
    """The inverse of split_views on tensors: global views [B, V, H, W, 3] and local views [B, L, h, w, 3] (or
    None) -> the decoder's rows (loader-format batches for tests and benchmarks)."""
    import torch
    if local_views is None:
        return views
    return torch.cat([views.flatten(1), local_views.flatten(1)], 1)
