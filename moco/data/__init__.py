"""Input: image sources (folders, CIFAR batches, tar shards, the folder index), decoding, the
decoded-image cache, augmentations and the training / evaluation loaders.
"""
