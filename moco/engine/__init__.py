"""Running a pretraining: the configuration (each setting declared once), the runtime
(device, precision, workers), the training loop and its step, the run folder and checkpoints,
multi-process runs.
"""
