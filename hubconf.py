"""torch.hub entry points: one plain function per released MoCo checkpoint (``moco zoo list``).

    model = torch.hub.load("OWNER/REPO", "mocov2_r50_800ep")            # from GitHub
    model = torch.hub.load("/path/to/checkout", "mocov2_r50_800ep", source="local")
    feats = model(model.transform(img).unsqueeze(0))                    # [1, 2048]

Each function takes ``pretrained=True`` (False: the same network at random initialisation),
``num_classes=None`` (an int: a fresh Linear head) and the keyword arguments of
``moco.load_pretrained`` (``device``, ``file``, ``mirror``, ``progress``). The functions are
generated from the registry (``moco/hub/registry.py``), one per entry; ``torch.hub.list``
shows them and ``torch.hub.help`` their descriptions.
"""

from moco.hub.load import hub_entries

dependencies = ["torch", "torchvision"]

globals().update(hub_entries())
