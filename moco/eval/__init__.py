"""Using a pretrained encoder: loading any MoCo checkpoint, kNN, linear classification,
embeddings, export to torchvision / detectron2 / safetensors / timm.
"""
