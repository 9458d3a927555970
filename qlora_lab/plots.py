"""Plots for the labs: each function draws one figure from measured results and returns it.

Conventions: functions take plain data (dicts, lists, tensors), create their own figure
with matplotlib's object API (`fig, ax = plt.subplots(...)`), label axes with units, and
return the figure, so notebooks show it and tests can inspect it without a display.
matplotlib is imported inside the functions: importing this module costs nothing.
Sections below are in lab order.
"""
