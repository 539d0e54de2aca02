"""cart-release-worker: releases stock reservations for cart-abandon events."""

__version__ = "0.1.0"
