"""datagen: build segment-swapping training pairs (Shen et al., CVPR 2022) as WebDataset shards."""
__version__ = "0.1.0"
