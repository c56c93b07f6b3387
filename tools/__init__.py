"""Helpers of the make targets that are not DVC stages: the time estimate before `make repro` and the quick experiment of `make quick`."""
