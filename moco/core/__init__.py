"""The paper's parts: MoCo (Algorithm 1), the queue, InfoNCE, the momentum update, the
heads, shuffling BN (SplitBatchNorm, one device and across processes), the backbones and the
other mechanisms of MoCo v1 Figure 2 (end-to-end, memory bank).

No configuration, files or I/O in here, and no import from the rest of the package (a test
keeps it so: tests/package/test_layout.py); devices, dtypes and generators come in as arguments.
"""
