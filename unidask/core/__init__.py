"""The ground floor: errors, files on disk, words for numbers, progress, malloc, the calls into
distributed beyond its public API. Knows nothing of runs."""
