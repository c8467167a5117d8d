"""User generators for the plugin tests: one good, four broken."""

import numpy as np


def rotations(rng, count, *, scale=1.0):
    """Random SO(2) rotations, with their angle as meta."""
    theta = scale * rng.uniform(0, 2 * np.pi, count)
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2), [{"theta": t} for t in theta]


def wrong_shape(rng, count):
    return np.zeros((count, 2, 3))


def with_nan(rng, count):
    out = np.stack([np.eye(2)] * count)
    out[-1, 0, 0] = np.nan
    return out


def not_unitary(rng, count):
    return 2 * np.stack([np.eye(3)] * count)


def raises(rng, count):
    """A bug in the user's code."""
    return count // 0


def slow_haar(rng, count, *, dim=2, delay=0.0):
    """Haar U(dim), taking ``delay`` seconds a task: long runs with little data, for walltime tests."""
    import time

    from unidask.generators.haar import haar

    time.sleep(delay)
    return haar(rng, count, dim=dim)


def held_haar(rng, count, *, dim=2, hold="", delay=0.25):
    """Haar U(dim), each task taking ``delay`` seconds while the file ``hold`` exists: a run that
    goes on, task by task, until its watcher is done with it (at most tasks x delay / workers)."""
    import os
    import time

    from unidask.generators.haar import haar

    if hold and os.path.exists(hold):
        time.sleep(delay)
    return haar(rng, count, dim=dim)
