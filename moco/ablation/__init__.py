"""Ablation grids (``moco ablate``): the grid file, the runs, the cost of a step and the
report.
"""
