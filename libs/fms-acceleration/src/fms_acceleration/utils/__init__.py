"""Helpers for plugin authors (the reference's `fms_acceleration.utils`)."""

from .test_utils import *  # noqa: F403 - the reference re-exports its test helpers here
