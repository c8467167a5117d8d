"""Scheduler preload that adds the unidask page to a scheduler started outside unidask:
``dask scheduler --preload unidask.preload`` (the job scripts do). Importing it is enough:
Dask imports preloads before it builds the dashboard."""

import dask.config

from .core.daskapi import withstand_floods
from .views.dashboard import install

# this process is the job's `dask scheduler`: its own Dask config is unidask's to set
dask.config.set(install())
withstand_floods()
