"""General helpers below the data pipeline, evaluation and the engine: the atomic write, logs,
memory and path checks, the run lock, signals, the runtime (device, precision, workers), the
settings declaration, checkpoint I/O, the multi-process context, the run log, downloads."""
