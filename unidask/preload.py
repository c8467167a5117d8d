"""Scheduler preload that adds the unidask page to a scheduler started outside unidask:
``dask scheduler --preload unidask.preload`` (the job scripts do). Importing it is enough:
Dask imports preloads before it builds the dashboard."""

from .dashboard import install

install()
