"""Pretrained weights by name and on the Hugging Face Hub.

* :mod:`moco.hub.registry`: the authors' released MoCo v1/v2/v3 checkpoints (URL, checksum,
  network, the authors' linear top-1); :func:`moco.hub.load.load_pretrained` downloads one
  into the user cache and returns the ready backbone with its preprocessing;
* :mod:`moco.hub.hf`: a run's backbone as a Hugging Face Hub model folder
  (``model.safetensors``, ``config.json`` that timm reads too, a ``README.md`` model card
  generated from the run) and :func:`moco.hub.hf.from_pretrained` to load one back;
* ``hubconf.py`` at the repository root: ``torch.hub.load(REPO, "mocov2_r50_800ep")``.
"""
