"""Data: images in, tensors out.

- ``imageio``: decoding one image safely (bombs, truncation, EXIF, draft mode).
- ``datasets``: ``ImageDataset`` (items with keys and labels), readers, collate and loader.
- ``sources``: building a dataset from ``DataConfig``, one ``DATA_SOURCES`` entry per source.
- ``preprocess``: the backbone's own preprocessing resolved to transforms.
- ``gpudecode``: batched JPEG decoding on the GPU (nvJPEG).
- ``mnist_5k.npz``: the 5,000 bundled MNIST digits.
"""
