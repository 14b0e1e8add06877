"""The embedded run on one machine (``make run``): debug pages off by default, everything local."""

from config.settings.base import *  # noqa: F403
