"""An FFCV decoder that decodes each image once and cuts every view from it (CPU data path).

Plain FFCV gets two views of an image from two pipelines on the same field, and each pipeline decodes the whole
JPEG again: two views cost two decodes. `MultiViewRandomResizedCropDecoder` decodes once into a scratch buffer
and draws `num_views` independent RandomResizedCrops (per sample, per view), each resized to `output_size` and
flipped with probability `flip_prob`.

Output per batch: uint8 [B, V, H, W, 3]. Usage:

    pipelines = {"image": [MultiViewRandomResizedCropDecoder((224, 224), num_views=2), ToTensor()], ...}
    for views, labels in loader:       # views: [B, 2, 224, 224, 3] uint8
        v1, v2 = views.unbind(1)

The crop sampler is FFCV's (torchvision's algorithm: up to 10 tries of area-scale and log-ratio, then a centre
crop fallback); scale=(c_min, 1) is the paper's crop-size knob. Raw-pixel betons skip the decode entirely.
"""
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler


class MultiViewRandomResizedCropDecoder(SimpleRGBImageDecoder):
    def __init__(self, output_size, num_views=2, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob=0.5):
        super().__init__()
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
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
                (AllocationQuery(out_shape, u8),  # the views
                 AllocationQuery((max_height * max_width * np.uint64(3),), u8)))  # one decoded image per sample

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        scale, ratio, num_views, flip_prob = self.scale, self.ratio, self.num_views, self.flip_prob

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:  # the one decode of this image
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for v in range(num_views):
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    view = destination[dst_ix, v]  # [H, W, 3]
                    resize_crop_c(image, i, i + h, j, j + w, view)
                    if np.random.rand() < flip_prob:
                        view[:] = view[:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
